"""Training-time overhead of SplineCamCallback on the CPU.

Setup (issue "SplineCamCallback"): two-moons MLP 2 -> 64 x 4 -> 1 (ReLU), batch 128, 2000 optimizer steps,
Adam; a snapshot every 100 steps with frames on (default slices chosen from the data: 2 three-sample slices
and 1 local slice, 512 px frames rendered on the background thread). Prints the training seconds with and
without the callback and the overhead, then sweeps snapshot frequency (every 50/100/200) and width
(32/64/128).

Usage::

    python benchmarks/bench_callback_overhead.py            # full run (several minutes on 2 cores)
    python benchmarks/bench_callback_overhead.py --quick    # 300 steps, a smoke test of the script
    python benchmarks/bench_callback_overhead.py --threads 1  # no OpenMP oversubscription on a busy box
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from splinecam_lightning.callback import SplineCamCallback


def moons(n: int, seed: int = 0, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * math.pi
    y = (torch.rand(n, generator=g) < 0.5).long()
    upper = torch.stack([torch.cos(t), torch.sin(t)], 1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
    x = torch.where(y[:, None] == 1, lower, upper) + noise * torch.randn(n, 2, generator=g)
    return x.float(), y.float()


class Moons(L.LightningModule):
    def __init__(self, width: int, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = 2
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.binary_cross_entropy_with_logits(self(x).squeeze(1), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def run(width: int, steps: int, every: int | None, out: Path, frame_size: int, background: bool) -> dict:
    L.seed_everything(0, verbose=False)
    x, y = moons(4096)
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
    callbacks = []
    cb = None
    if every is not None:
        cb = SplineCamCallback(
            every_n_train_steps=every,
            dirpath=out / f"w{width}_e{every}",
            module="net",
            frame_size=frame_size,
            background=background,
        )
        callbacks.append(cb)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    t0 = time.perf_counter()
    trainer.fit(Moons(width), loader)
    seconds = time.perf_counter() - t0
    res = {"width": width, "every": every, "seconds": seconds}
    if cb is not None:
        hist = cb.history
        res["snapshots"] = len(hist)
        res["snap_s"] = sum(h["seconds"] for h in hist) / max(1, len(hist))
        res["wait_s"] = sum(h.get("waited", h["seconds"]) for h in hist) / max(1, len(hist))
        regions = [s["num_regions"] for h in hist for s in h["slices"].values()]
        res["max_regions"] = max(regions) if regions else 0
        res["final_regions"] = {n: int(s["num_regions"]) for n, s in hist[-1]["slices"].items()} if hist else {}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="300 steps, main comparison only")
    ap.add_argument("--frame-size", type=int, default=512)
    ap.add_argument("--no-background", action="store_true", help="render frames on the training thread")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (on a loaded 2-core box the default 2 OpenMP threads oversubscribe badly)",
    )
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    steps = 300 if args.quick else args.steps
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(
        f"torch {torch.__version__}, lightning {L.__version__ if hasattr(L, '__version__') else '?'}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, steps {steps}, seed 0, frame {args.frame_size}px, "
        f"background={not args.no_background}"
    )
    bg = not args.no_background
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        base: dict[int, float] = {}

        def baseline(width: int) -> float:
            if width not in base:
                base[width] = run(width, steps, None, out, args.frame_size, bg)["seconds"]
                print(f"  baseline width {width:4d}: {base[width]:7.2f} s", flush=True)
            return base[width]

        def with_cb(width: int, every: int) -> None:
            b = baseline(width)
            r = run(width, steps, every, out, args.frame_size, bg)
            over = 100.0 * (r["seconds"] - b) / b
            print(
                f"  width {width:4d} every {every:4d}: {r['seconds']:7.2f} s  overhead {over:6.1f} %  "
                f"({r['snapshots']} snapshots, {r['wait_s'] * 1e3:5.0f} ms each on the training thread, "
                f"{r['snap_s'] * 1e3:6.0f} ms each in all, "
                f"max regions/slice {r['max_regions']:.0f}, final {r['final_regions']})",
                flush=True,
            )

        print("main setup: 2 -> 64 x 4 -> 1, batch 128, snapshot every 100 steps, frames on")
        with_cb(64, 100)
        if args.quick:
            return
        print("sweep: snapshot frequency (width 64)")
        for every in (50, 200):
            with_cb(64, every)
        print("sweep: width (every 100)")
        for width in (32, 128):
            with_cb(width, 100)


if __name__ == "__main__":
    main()
