"""Region counts of random networks: the width sweep of one-hidden-layer nets, plus random MLP and CNN partitions.

**Width sweep.** A one-hidden-layer ReLU net ``R^2 -> R^n -> R`` cuts the plane along the ``n`` lines
``w_i . x + b_i = 0``. Inside a convex domain, lines in general position make exactly
``1 + k + I`` regions, where ``k`` lines cross the domain and ``I`` of their pairwise intersections lie in it;
this is at most ``1 + n + n(n-1)/2`` (all lines crossing, all intersections inside). The sweep counts the
regions exactly with :func:`compute_partition` for random nets (PyTorch's default initialisation) of growing
width, checks them against ``1 + k + I``, and plots them with the ``1 + n + n(n-1)/2`` reference line, as
the SplineCam paper's width sweep does (``width_sweep.png``, ``width_sweep.json``).

**Random partitions.** A random MLP ``2 -> 64 x 4 -> 1`` on ``[-1, 1]^2`` and a random CNN on a random 2D slice
of its ``(1, 16, 16)`` input space, rendered to PNGs.

Run::

    python examples/random_nets.py           # about a minute on 2 CPU cores
    python examples/random_nets.py --quick   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from splinecam_lightning import Slice, compute_partition
from splinecam_lightning.render import save_frame

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def arrangement_count(W: torch.Tensor, b: torch.Tensor, radius: float) -> tuple[int, int, int]:
    """``(1 + k + I, k, I)`` for the lines ``W x + b = 0`` in the square ``[-radius, radius]^2``.

    ``k`` counts lines that cross the open square, ``I`` pairwise intersections strictly inside it (general
    position assumed, as for random weights).
    """
    W = W.double()
    b = b.double()
    corners = torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=torch.float64) * radius
    vals = corners @ W.T + b  # (4, n)
    crosses = (vals.max(0).values > 0) & (vals.min(0).values < 0)
    k = int(crosses.sum())
    Wc, bc = W[crosses], b[crosses]
    inside = 0
    n = Wc.shape[0]
    if n > 1:
        i, j = torch.triu_indices(n, n, 1)
        A = torch.stack([Wc[i], Wc[j]], 1)  # (P, 2, 2)
        rhs = -torch.stack([bc[i], bc[j]], 1)
        det = torch.linalg.det(A)
        ok = det.abs() > 1e-12
        pts = torch.linalg.solve(A[ok], rhs[ok])
        inside = int((pts.abs().amax(1) < radius).sum())
    return 1 + k + inside, k, inside


def width_sweep(widths: Sequence[int], seeds: int, radius: float) -> list[dict[str, Any]]:
    """Exact region counts of random one-hidden-layer nets, with the arrangement formula for each."""
    from tqdm.auto import tqdm

    dom = Slice.square((0.0, 0.0), radius)
    rows = []
    for n, seed in tqdm([(n, s) for n in widths for s in range(seeds)], desc="width sweep", mininterval=0.5):
        torch.manual_seed(1000 * n + seed)
        net = nn.Sequential(nn.Linear(2, n), nn.ReLU(), nn.Linear(n, 1))
        part = compute_partition(net, dom)
        expected, k, inside = arrangement_count(net[0].weight.detach(), net[0].bias.detach(), radius)
        rows.append(
            {"width": n, "seed": seed, "regions": part.num_regions, "expected": expected, "crossing": k,
             "intersections": inside, "bound": 1 + n + n * (n - 1) // 2, "seconds": part.seconds}
        )  # fmt: skip
    return rows


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> Path:
    """Regions against width (log-log): measured mean +- std, the arrangement formula, and the bound."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    widths = sorted({r["width"] for r in rows})
    meas = np.array([[r["regions"] for r in rows if r["width"] == w] for w in widths], dtype=float)
    expd = np.array([np.mean([r["expected"] for r in rows if r["width"] == w]) for w in widths])
    dense = np.geomspace(min(widths), max(widths), 100)
    fig = Figure(figsize=(5.5, 4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.errorbar(widths, meas.mean(1), yerr=meas.std(1), fmt="o-", capsize=3, label="exact count (SplineCam)")
    ax.plot(widths, expd, "x--", ms=9, zorder=4, label="1 + k + I (lines crossing, intersections inside)")
    ax.plot(dense, 1 + dense + dense * (dense - 1) / 2, "k:", label="1 + n + n(n-1)/2 (general position bound)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width n of the hidden layer")
    ax.set_ylabel("number of linear regions")
    ax.set_title("Random one-hidden-layer ReLU nets on a 2D square")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    fig.clear()
    return path


def random_partitions(out: Path, quick: bool, size_px: int, seed: int) -> dict[str, Any]:
    """Render a random MLP's and a random CNN's partition."""
    torch.manual_seed(seed)
    width, depth, side, ch = (16, 2, 8, 2) if quick else (64, 4, 16, 4)
    mlp = _common.mlp(2, width, depth, 1)
    square = Slice.square((0.0, 0.0), 1.0, name="mlp")
    p_mlp = compute_partition(mlp, square)
    f_mlp = save_frame(
        p_mlp, out / "random_mlp.png", color_by="random", size_px=size_px,
        title=f"random MLP 2-{width}x{depth}-1: {p_mlp.num_regions} regions",
    )  # fmt: skip
    cnn = nn.Sequential(
        nn.Conv2d(1, ch, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(ch, ch, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(ch * (side // 2) ** 2, 1),
    )
    g = torch.Generator().manual_seed(seed)
    center = torch.rand(side * side, generator=g, dtype=torch.float64)
    sl = Slice.around(center, radius=0.5 if quick else 1.0, generator=g, name="cnn")
    p_cnn = compute_partition(cnn, sl, input_shape=(1, side, side))
    f_cnn = save_frame(
        p_cnn, out / "random_cnn.png", color_by="random", size_px=size_px,
        title=f"random CNN on (1,{side},{side}): {p_cnn.num_regions} regions",
    )  # fmt: skip
    return {"mlp_png": f_mlp, "mlp_regions": p_mlp.num_regions, "cnn_png": f_cnn, "cnn_regions": p_cnn.num_regions}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128, 256], help="hidden widths")
    p.add_argument("--seeds", type=int, default=5, help="random nets per width (default 5)")
    p.add_argument("--radius", type=float, default=1.0, help="half-width of the square domain (default 1)")
    p.add_argument("--frame-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="examples_out/random_nets")
    return _common.parse_with_quick(p, argv, {"widths": [2, 8, 32], "seeds": 2, "frame_size": 128})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the sweep rows and output paths."""
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = width_sweep(args.widths, args.seeds, args.radius)
    plot = plot_sweep(rows, out / "width_sweep.png")
    (out / "width_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    parts = random_partitions(out, args.quick, args.frame_size, args.seed)
    mismatches = [r for r in rows if r["regions"] != r["expected"]]
    print("\nwidth  regions (mean)  1+k+I (mean)  bound 1+n+n(n-1)/2")
    for w in args.widths:
        rs = [r for r in rows if r["width"] == w]
        print(
            f"{w:5d}  {np.mean([r['regions'] for r in rs]):14.1f}  {np.mean([r['expected'] for r in rs]):12.1f}"
            f"  {rs[0]['bound']:18d}"
        )
    print(f"exact counts equal to 1 + k + I: {len(rows) - len(mismatches)}/{len(rows)}")
    _common.print_paths(
        f"random nets ({time.perf_counter() - t0:.0f} s)",
        {"width sweep": plot, "sweep data": out / "width_sweep.json", "random MLP": parts["mlp_png"],
         "random CNN": parts["cnn_png"]},
    )  # fmt: skip
    return {"rows": rows, "plot": plot, "mismatches": mismatches, **parts}


if __name__ == "__main__":
    main()
