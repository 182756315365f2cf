"""The paper's architecture comparison: exact partition statistics of an MLP, a CNN and a ResNet on digits.

Three small networks are trained on scikit-learn's bundled 8x8 digits: an MLP, a CNN with max pooling
and a small ResNet (basic residual blocks with BatchNorm). Around the same test digits, each is cut by the same
randomly oriented squares ``Slice.around(x, radius)`` (one batched ``local_complexity`` call per model), and the
exact partitions are compared per architecture: regions per square, mean region area and mean eccentricity
(mean, median and std over points). Writes ``architecture_comparison.png`` (one box plot per statistic) and
``summary.json``. Nothing is downloaded.

Run::

    python examples/architecture_comparison.py            # about 2 minutes on 2 CPU cores
    python examples/architecture_comparison.py --quick    # smoke test
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
import digits_cnn  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from splinecam_lightning import local_complexity  # noqa: E402

DEFAULTS = {"steps": 300, "points": 50, "radius": 0.1, "width": 64, "channels": 4, "lr": 3e-3}
QUICK = {"steps": 20, "points": 3, "radius": 0.05, "width": 8, "channels": 2}
STATS = ("num_regions", "mean_area", "mean_eccentricity")
LABELS = {
    "num_regions": "regions per square",
    "mean_area": "mean region area",
    "mean_eccentricity": "mean eccentricity",
}


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm, a 1x1 projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """``(1, 8, 8) -> conv3-BN-ReLU (c) -> block(c) -> block(2c, stride 2) -> global avg pool -> linear -> 10``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(c, c), BasicBlock(c, 2 * c, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def make_models(width: int, channels: int) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """``name -> (network, input shape)`` for the three architectures."""
    return {
        "mlp": (_common.mlp(64, width, 2, 10), (64,)),
        "cnn": (digits_cnn.make_cnn((channels, 2 * channels)), (1, 8, 8)),
        "resnet": (SmallResNet(channels), (1, 8, 8)),
    }


def train(net: nn.Module, shape: tuple[int, ...], x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> float:
    """Train ``net`` for ``args.steps`` Adam steps (no loggers); returns the seconds taken."""
    t0 = time.perf_counter()
    model = _common.Classifier(net, task="multiclass", lr=args.lr)
    loader = _common.step_loader(TensorDataset(x.reshape(-1, *shape), y), args.batch_size, args.steps, args.seed)
    with _common.quiet():
        _common.make_trainer(args.steps, [], [], progress=not args.no_progress).fit(model, loader)
    net.eval()  # BatchNorm uses its running statistics from here on, as the engine does
    return time.perf_counter() - t0


def plot_stats(values: dict[str, dict[str, torch.Tensor]], labels: Sequence[str], path: Path, title: str) -> Path:
    """One panel per statistic: a box plot of its per-point values for each architecture (tick ``labels``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(STATS))
    for ax, stat in zip(axes, STATS, strict=True):
        data = [v[stat].numpy() for v in values.values()]
        ax.boxplot(data, tick_labels=list(labels), showmeans=True)
        ax.tick_params(axis="x", labelsize=8)
        if stat != "mean_eccentricity":
            ax.set_yscale("log")  # region counts and areas span orders of magnitude between architectures
        ax.set_title(LABELS[stat])
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    fig.clear()
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help=f"Adam steps per model ({DEFAULTS['steps']})")
    p.add_argument("--points", type=int, default=DEFAULTS["points"], help="test digits to put squares around")
    p.add_argument("--radius", type=float, default=DEFAULTS["radius"], help="half-width of the squares")
    p.add_argument("--width", type=int, default=DEFAULTS["width"], help="MLP width (2 hidden layers)")
    p.add_argument("--channels", type=int, default=DEFAULTS["channels"], help="first conv width of CNN and ResNet")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="examples_out/architecture_comparison", help="output folder")
    p.add_argument("--no-progress", action="store_true")
    return _common.parse_with_quick(p, argv, QUICK)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the summary (also written to ``summary.json``) plus ``models`` and ``local``
    (name -> trained network, name -> :class:`~splinecam_lightning.LocalComplexity`)."""
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = _digits.load_digits_data(args.seed)
    points = x_te[torch.randperm(len(x_te), generator=torch.Generator().manual_seed(args.seed))[: args.points]]
    torch.manual_seed(args.seed)
    models = make_models(args.width, args.channels)
    rows: dict[str, Any] = {}
    values: dict[str, dict[str, torch.Tensor]] = {}
    local = {}
    for name, (net, shape) in models.items():
        secs = train(net, shape, x_tr, y_tr, args)
        with torch.no_grad():
            acc = float((net(x_te.reshape(-1, *shape)).argmax(1) == y_te).float().mean())
        # The same generator seed gives every model the same squares: the comparison is point by point.
        lc = local_complexity(
            net, points, args.radius, input_shape=shape, generator=torch.Generator().manual_seed(args.seed)
        )
        local[name] = lc
        values[name] = {k: getattr(lc, k) for k in STATS}
        summ = lc.summary()
        rows[name] = {
            "parameters": sum(p.numel() for p in net.parameters()),
            "test_accuracy": acc,
            "train_seconds": secs,
            "partition_seconds": lc.seconds,
            "total_regions": int(lc.num_regions.sum()),
            **{k: summ[k] for k in STATS},
            "per_point": {k: v.tolist() for k, v in values[name].items()},
        }
    plot = plot_stats(
        values,
        [f"{n}\n{r['parameters']} params\nacc {r['test_accuracy']:.2f}" for n, r in rows.items()],
        out / "architecture_comparison.png",
        f"digits, {args.points} test points, squares of radius {args.radius}, {args.steps} steps per model",
    )
    summary = {
        "steps": args.steps,
        "points": args.points,
        "radius": args.radius,
        "seed": args.seed,
        "architectures": rows,
        "plot": str(plot),
        "seconds": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    head = f"{'model':<8}{'params':>8}{'acc':>7}{'part. s':>9}"
    for k in STATS:
        head += f"  {LABELS[k] + ' mean/median/std':>38}"
    print("\n" + head)
    for name, r in rows.items():
        line = f"{name:<8}{r['parameters']:>8}{r['test_accuracy']:>7.3f}{r['partition_seconds']:>9.2f}"
        for k in STATS:
            s = r[k]
            line += f"  {s['mean']:>12.4g} {s['median']:>12.4g} {s['std']:>12.4g}"
        print(line)
    _common.print_paths("outputs", {"plot": plot, "summary": out / "summary.json"})
    print(f"{summary['seconds']:.0f} s")
    return {**summary, "out": out, "models": {k: v[0] for k, v in models.items()}, "local": local}


if __name__ == "__main__":
    main()
