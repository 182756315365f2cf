"""Batched local complexity against a loop of ``compute_partition`` over the same squares, side by side.

For each case: ``N`` squares ``Slice.around(points[i], radius)`` around random points, partitioned exactly
(1) by one ``local_complexity`` call and (2) by looping ``compute_partition`` over ``result.slices``. Both use
the same prepared model; the per-point region counts must be identical (asserted). The batched time includes
building the ``N`` slices, the loop's does not. Prints sizes, seconds (best of ``--repeats`` after a warm-up),
regions/s and the speed-up.

    python benchmarks/bench_local.py                      # both cases, torch's default threads
    python benchmarks/bench_local.py --cases mlp --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from bench_engine import mlp
from torch import nn

from splinecam_lightning import compute_partition, local_complexity, prepare_model


def small_cnn() -> nn.Sequential:
    """conv8-relu-pool-conv16-relu-pool-fc32-relu-fc10 on 1x8x8 (digits-sized)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def cases(selected: set[str], n: int):
    if "mlp" in selected:
        torch.manual_seed(0)
        pts = torch.randn(n, 784, generator=torch.Generator().manual_seed(1))
        yield (
            "mlp",
            f"784->200x4->10 ReLU MLP, {n} N(0,1) points, r=0.5, seeds 0/1/2",
            mlp([784] + [200] * 4 + [10]),
            pts,
            0.5,
            None,
        )
    if "cnn" in selected:
        torch.manual_seed(0)
        pts = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        yield (
            "cnn",
            f"CNN conv8-pool-conv16-pool-fc32-fc10 on 1x8x8, {n} U(0,1) points, r=0.05, seeds 0/1/2",
            small_cnn(),
            pts,
            0.05,
            (1, 8, 8),
        )


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["mlp", "cnn"])
    ap.add_argument("--points", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats} after a warm-up")
    head = f"{'case':<5} {'method':<22} {'points':>6} {'regions':>8} {'seconds':>8} {'regions/s':>10} {'speed-up':>8}"
    print(head)
    for case in cases(set(args.cases), args.points):
        run_case(*case, repeats=args.repeats)


def run_case(name: str, desc: str, net: nn.Module, pts: torch.Tensor, r: float, shape, repeats: int) -> None:
    prep = prepare_model(net, input_shape=shape)

    def batched():
        return local_complexity(prep, pts, r, input_shape=shape, generator=torch.Generator().manual_seed(2))

    lc = batched()  # warm-up; also gives the slices for the loop
    slices = lc.slices

    def loop():
        return [compute_partition(prep, s, input_shape=shape).num_regions for s in slices]

    loop()  # warm-up
    t_loop, counts = best_of(loop, repeats)
    t_b, lc = best_of(batched, repeats)
    assert lc.num_regions.long().tolist() == counts, "batched and looped region counts differ"
    total = int(lc.num_regions.sum())
    n = len(lc.slices)
    print(f"{name:<5} {'loop compute_partition':<22} {n:>6} {total:>8} {t_loop:>8.3f} {total / t_loop:>10.0f}")
    print(
        f"{name:<5} {'local_complexity':<22} {n:>6} {total:>8} {t_b:>8.3f} {total / t_b:>10.0f} {t_loop / t_b:>7.1f}x"
    )
    med, mx = int(lc.num_regions.median()), int(lc.num_regions.max())
    print(f"      {desc}; regions per point: median {med}, max {mx}", flush=True)


if __name__ == "__main__":
    main()
