"""Speed of frame rendering and of the partition archive, side by side in one run.

For partitions of random MLPs of growing size (printed: regions, frame shape), prints seconds per frame (best of
``--repeats``) for a bare frame (plot only) and a full one (title, axes, colour bar), regions per second, and
the time and size of ``Partition.save`` / ``Partition.load``.

    python benchmarks/bench_render.py
    python benchmarks/bench_render.py --nets 64x2 1024x1 --size 768
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from splinecam_lightning import Partition, Slice, compute_partition
from splinecam_lightning.render import render_partition


def best(repeats: int, fn, *args, **kwargs) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--nets", nargs="+", default=["16x2", "64x2", "128x2", "1024x1"], help="WIDTHxDEPTH of 2->W..W->1 MLPs"
    )
    ap.add_argument("--size", type=int, default=512, help="frame size (longer side)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    sl = Slice.box(-2.0, 2.0, -1.25, 1.25, name="bench")
    print(f"frame size {args.size}, torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"{'net':>7} {'regions':>8} {'shape':>10} {'bare s':>8} {'full s':>8} {'full reg/s':>11} "
          f"{'save s':>7} {'load s':>7} {'MB':>6}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.nets:
            w, depth = (int(v) for v in spec.split("x"))
            torch.manual_seed(w)
            layers: list[nn.Module] = [nn.Linear(2, w), nn.ReLU()]
            for _ in range(depth - 1):
                layers += [nn.Linear(w, w), nn.ReLU()]
            net = nn.Sequential(*layers, nn.Linear(w, 1))
            part = compute_partition(net, sl, max_regions=2_000_000)
            r = args.repeats
            bare = best(r, render_partition, part, size_px=args.size, show_axes=False, show_legend=False)
            img = render_partition(part, size_px=args.size, title="bench | step 0")
            full = best(r, render_partition, part, size_px=args.size, title="bench | step 0")
            path = Path(tmp) / f"{spec}.npz"
            save = best(r, part.save, path)
            load = best(r, Partition.load, path)
            print(
                f"{spec:>7} {part.num_regions:>8} {img.shape[1]:>4}x{img.shape[0]:<5} {bare:>8.3f} {full:>8.3f} "
                f"{part.num_regions / full:>11.0f} {save:>7.3f} {load:>7.3f} {path.stat().st_size / 1e6:>6.2f}"
            )


if __name__ == "__main__":
    main()
