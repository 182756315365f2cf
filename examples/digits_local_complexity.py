"""Exact local complexity of a digits MLP through training, on training and validation digits.

At log-spaced steps (training dynamics unfold on a log time axis) a small Lightning callback partitions the
squares ``Slice.around(x, radius)`` around a fixed set of training digits and of held-out digits, all of a
split in one batched ``local_complexity`` call, and logs ``splinecam/local/<split>/<stat>`` (mean over points,
plus ``_median`` and ``_std``). With ``--sampled`` (default on) it also logs the sampled statistic of the
grokking literature (units whose sign differs among the square's corners) next to the exact count of units
crossing the square. The plot ``local_complexity.png`` shows region counts and unit counts against the step on
a log axis. Nothing is downloaded.

The callback here is deliberately minimal, for the plot; ``SplineCamCallback(local=LocalConfig(...))`` logs the
same statistics from the library's callback.

Run::

    python examples/digits_local_complexity.py            # a few minutes on 2 CPU cores
    python examples/digits_local_complexity.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _digits  # noqa: E402
import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from splinecam_lightning import LocalConfig, local_complexity, log_spaced_steps, prepare_model  # noqa: E402

DEFAULTS = {"steps": 3000, "snapshots": 16, "count": 64, "radius": 0.5, "width": 64, "lr": 2e-3}
QUICK = {"steps": 40, "snapshots": 4, "count": 6, "radius": 0.3, "width": 12}


class LocalComplexityLogger(Callback):
    """Computes local complexity at the given global steps (and at step 0, before training) and logs it.

    Args:
        config: What to compute: radius, count, splits, sampled; ``config.points`` must hold one tensor per split.
        steps: Global steps at which to compute (sorted).
        seed: Seed of the squares' orientations (the same squares at every step).
    """

    def __init__(self, config: LocalConfig, steps: Sequence[int], seed: int = 0) -> None:
        self.config = config
        self.steps = set(int(s) for s in steps)
        self.seed = seed
        self.history: list[dict[str, Any]] = []

    def _snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step not in self.steps or any(h["step"] == step for h in self.history):
            return
        prep = prepare_model(pl_module.net)  # private float64 copy: training is not touched
        row: dict[str, Any] = {"step": step}
        metrics = {}
        for split in self.config.splits:
            pts = self.config.points[split]
            lc = local_complexity(
                prep,
                pts,
                self.config.radius,
                generator=torch.Generator().manual_seed(self.seed),
                sampled=self.config.sampled,
            )
            summ = lc.summary(flat=True)
            row[split] = {**summ, "seconds": lc.seconds}
            metrics.update({f"splinecam/local/{split}/{k}": v for k, v in summ.items()})
            metrics[f"splinecam/local/{split}/seconds"] = lc.seconds
        self.history.append(row)
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._snapshot(trainer, pl_module)


def plot_history(history: list[dict[str, Any]], splits: Sequence[str], path: Path, title: str) -> Path:
    """Regions per square (mean and median over points) and unit counts (exact and sampled) against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    colours = {"train": "tab:blue", "val": "tab:orange"}
    x = [h["step"] + 1 for h in history]  # step + 1, so that step 0 fits on the log axis
    for split in splits:
        c = colours.get(split)
        mean = [h[split]["num_regions"] for h in history]
        med = [h[split]["num_regions_median"] for h in history]
        ax1.plot(x, mean, "-o", ms=3, color=c, label=f"{split}: mean")
        ax1.plot(x, med, "--", color=c, alpha=0.7, label=f"{split}: median")
        ax2.plot(x, [h[split]["crossing_units"] for h in history], "-o", ms=3, color=c, label=f"{split}: exact units")
        if "sampled_units" in history[0][split]:
            s = [h[split]["sampled_units"] for h in history]
            ax2.plot(x, s, ":s", ms=3, color=c, label=f"{split}: sampled (corners)")
    ax1.set(xscale="log", xlabel="training step + 1", ylabel="exact regions per square", title=title)
    ax2.set(xscale="log", xlabel="training step + 1", ylabel="units crossing the square")
    ax2.set_title("exact units vs sampled (sign change at the 4 corners)", fontsize=9)
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    fig.clear()
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--snapshots", type=int, default=DEFAULTS["snapshots"], help="log-spaced snapshots (about)")
    p.add_argument("--count", type=int, default=DEFAULTS["count"], help="points per split")
    p.add_argument("--radius", type=float, default=DEFAULTS["radius"], help="half-width of the squares")
    p.add_argument("--width", type=int, default=DEFAULTS["width"], help="MLP width (3 hidden layers)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-sampled", action="store_true", help="skip the sampled statistic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="examples_out/digits_local_complexity")
    p.add_argument("--no-wandb", action="store_true", help="CSV logging only")
    p.add_argument("--no-progress", action="store_true")
    return _common.parse_with_quick(p, argv, QUICK)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the summary (also written to ``summary.json``)."""
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = _digits.load_digits_data(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    points = {
        "train": x_tr[torch.randperm(len(x_tr), generator=g)[: args.count]],
        "val": x_te[torch.randperm(len(x_te), generator=g)[: args.count]],
    }
    config = LocalConfig(radius=args.radius, count=args.count, points=points, sampled=not args.no_sampled)
    steps = log_spaced_steps(args.steps, args.snapshots)
    torch.manual_seed(args.seed)
    net = _common.mlp(64, args.width, 3, 10)
    model = _common.Classifier(net, task="multiclass", lr=args.lr)
    loader = _common.step_loader(TensorDataset(x_tr, y_tr), args.batch_size, args.steps, args.seed)
    cb = LocalComplexityLogger(config, steps, seed=args.seed)
    with _common.quiet():
        run_dir = _common.fit(model, loader, [cb], out, "digits-local-complexity", args)
    net.eval()
    with torch.no_grad():
        acc = float((net(x_te).argmax(1) == y_te).float().mean())
    plot = plot_history(
        cb.history,
        config.splits,
        out / "local_complexity.png",
        f"digits MLP 64->{args.width}x3->10, {args.count} points/split, r={args.radius}",
    )
    summary = {
        "test_accuracy": acc,
        "steps": args.steps,
        "snapshot_steps": [h["step"] for h in cb.history],
        "history": cb.history,
        "plot": str(plot),
        "wandb_run_dir": str(run_dir) if run_dir else None,
        "seconds": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    last = cb.history[-1]
    for split in config.splits:
        first = cb.history[0][split]["num_regions"]
        print(
            f"{split}: regions per square {first:.1f} at step 0 -> {last[split]['num_regions']:.1f} at {last['step']}"
        )
    _common.print_paths("outputs", {"plot": plot, "summary": out / "summary.json"})
    print(f"test accuracy {acc:.3f}; {summary['seconds']:.0f} s")
    if run_dir:
        print(f"upload the offline W&B run with: wandb sync {run_dir}")
    return {**summary, "out": out}


if __name__ == "__main__":
    main()
