"""Training-time overhead of SplineCamCallback on the CPU: ``fit()`` wall time with and without it, side by side.

Setups (issue "The callback must not slow the run it watches"):

* ``mlp``: two-moons MLP 2 -> 64 x 4 -> 1 (ReLU), batch 128, 2000 Adam steps, a snapshot every 100 steps, frames
  on, the default slices chosen from the data;
* ``cnn``: Conv-ReLU-MaxPool x2 + two Linear layers on scikit-learn's 8x8 digits (1x8x8), batch 64, 1000 steps,
  a snapshot every 100 steps, default settings.

Each configuration runs without and with the callback alternately (``--repeats`` times, medians), in this one
process, with the given torch thread counts for training. Printed per run: fit seconds, the ratio, snapshots
computed during fit and deferred to ``replay``, training-thread milliseconds per snapshot (copy + any wait),
worker seconds per snapshot and the largest slice's regions.

Usage::

    python benchmarks/bench_callback_overhead.py                 # mlp and cnn, 1 and 2 threads, plus sweeps
    python benchmarks/bench_callback_overhead.py --quick         # a smoke test of the script
    python benchmarks/bench_callback_overhead.py --setups mlp --threads 2 --no-sweeps
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from bench_local import small_cnn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from splinecam_lightning.callback import SplineCamCallback
from splinecam_lightning.demo import make_moons


class Net(L.LightningModule):
    def __init__(self, net: nn.Module, loss: str) -> None:
        super().__init__()
        self.net = net
        self.loss = loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        if self.loss == "bce":
            loss = nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), y)
        else:
            loss = nn.functional.cross_entropy(out, y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def mlp(width: int, depth: int = 4) -> nn.Module:
    layers: list[nn.Module] = []
    d = 2
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 1))


def cnn() -> nn.Module:
    """The digits CNN of issue 7: the same net as ``bench_local.small_cnn``."""
    return small_cnn()


def data(setup: str) -> tuple[TensorDataset, int]:
    if setup == "mlp":
        x, y = make_moons(4096, seed=0)
        return TensorDataset(x, y), 128
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(y)), 64


def run(setup: str, steps: int, every: int | None, out: Path, width: int = 64, **cb_kw) -> dict:
    L.seed_everything(0, verbose=False)
    ds, bs = data(setup)
    loader = DataLoader(ds, batch_size=bs, shuffle=True)
    model = Net(mlp(width) if setup == "mlp" else cnn(), "bce" if setup == "mlp" else "ce")
    cb = None
    if every is not None:
        cb = SplineCamCallback(every_n_train_steps=every, dirpath=out, module="net", **cb_kw)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb] if cb else [],
    )
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    res = {"seconds": time.perf_counter() - t0}
    if cb is not None:
        hist = cb.history
        res["done"] = len(hist)
        res["deferred"] = len(cb.pending_steps)
        res["skipped"] = len(cb.skipped_steps)
        res["wait_ms"] = 1e3 * statistics.median([h["waited"] for h in hist]) if hist else float("nan")
        res["overhead_s"] = cb.overhead_seconds
        res["worker_s"] = statistics.median([h["worker_seconds"] for h in hist]) if hist else float("nan")
        regions = [s["num_regions"] for h in hist for s in h["slices"].values()]
        res["max_regions"] = int(max(regions)) if regions else 0
    return res


def compare(setup: str, steps: int, every: int, repeats: int, tmp: Path, label: str, **kw) -> None:
    base, withc = [], []
    last: dict = {}
    for i in range(repeats):
        base.append(run(setup, steps, None, tmp / f"b{i}", **kw)["seconds"])
        last = run(setup, steps, every, tmp / f"{setup}_{label}_{i}", **kw)
        withc.append(last["seconds"])
    b, w = statistics.median(base), statistics.median(withc)
    print(
        f"  {label:<28} without {b:6.2f} s | with {w:6.2f} s | x{w / b:5.2f} | snapshots done {last['done']:3d}, "
        f"deferred {last['deferred']:3d}, skipped {last['skipped']} | training thread "
        f"{last['wait_ms']:6.2f} ms/snapshot ({last['overhead_s']:.2f} s in all) | worker "
        f"{last['worker_s']:.3f} s/snapshot | max regions "
        f"{last['max_regions']}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="mlp,cnn")
    ap.add_argument("--threads", default="1,2", help="torch threads of training, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-sweeps", action="store_true")
    ap.add_argument("--quick", action="store_true", help="200 steps, 1 repeat, no sweeps")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    repeats = 1 if args.quick else args.repeats
    print(
        f"torch {torch.__version__}, lightning {L.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, repeats {repeats} (medians), callback defaults unless stated"
    )
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            print(f"training with {threads} torch thread(s)")
            for setup in args.setups.split(","):
                steps = 200 if args.quick else (2000 if setup == "mlp" else 1000)
                compare(setup, steps, 100, repeats, tmp, f"{setup} every 100")
            if args.quick or args.no_sweeps or "mlp" not in args.setups:
                continue
            for every in (50, 200):
                compare("mlp", 2000, every, repeats, tmp, f"mlp every {every}")
            for width in (32, 128):
                compare("mlp", 2000, 100, repeats, tmp, f"mlp width {width}", width=width)
            compare("mlp", 2000, 100, repeats, tmp, "mlp max_overhead=None", max_overhead=None)


if __name__ == "__main__":
    main()
