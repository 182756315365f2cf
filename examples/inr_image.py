"""A ReLU MLP fitting a grayscale photo as an implicit neural representation (pixel coordinates -> intensity).

The image is Grace Hopper's portrait bundled with matplotlib (``matplotlib.cbook.get_sample_data``; nothing is
downloaded), downsampled. The input space is the 2D image plane ``[-1, 1]^2`` itself, so the slice is the whole
image. :class:`SplineCamCallback` watches the network ``x -> f(x) - level`` (the fitted MLP followed by a fixed
shift), so the red "decision boundary" of every frame is the ``level`` set of the fitted intensity: the
contour of the image at that grey level. Frames, an mp4, the statistics plot, an offline W&B run and a
``reconstruction.png`` (target | fit | final partition) are written under ``--out``.

Run::

    python examples/inr_image.py             # a few minutes on 2 CPU cores
    python examples/inr_image.py --quick     # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from splinecam_lightning import Slice, compute_partition
from splinecam_lightning.callback import SplineCamCallback
from splinecam_lightning.render import render_partition

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def load_image(size: int) -> np.ndarray:
    """Grace Hopper, grayscale in ``[0, 1]``, centre-cropped to a square and resized to ``size x size``."""
    import matplotlib.cbook as cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        img = Image.open(f).convert("L")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        img = img.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.float32) / 255.0


def pixel_coords(size: int) -> torch.Tensor:
    """``(size*size, 2)`` pixel centres in ``[-1, 1]^2``, row-major, ``v`` pointing up (row 0 at ``v ~ 1``)."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    u = c[None, :].expand(size, size)
    v = -c[:, None].expand(size, size)
    return torch.stack([u.reshape(-1), v.reshape(-1)], 1)


class LevelShift(nn.Module):
    """``y -> y - level`` as a frozen ``nn.Linear(1, 1)``, so the level set becomes the zero level set."""

    def __init__(self, level: float) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)
        with torch.no_grad():
            self.lin.weight.fill_(1.0)
            self.lin.bias.fill_(-float(level))
        self.lin.requires_grad_(False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.lin(y)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--width", type=int, default=48, help="hidden width (default 48)")
    p.add_argument("--depth", type=int, default=4, help="hidden layers (default 4)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument("--every", type=int, default=200, help="snapshot interval (default 200)")
    p.add_argument("--level", type=float, default=0.5, help="grey level whose level set is drawn (default 0.5)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--frame-size", type=int, default=512)
    p.add_argument("--color-max", type=float, default=8.0, help="top of the slope-norm colour scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="examples_out/inr_image")
    p.add_argument("--no-wandb", action="store_true", help="CSV logging only")
    p.add_argument("--no-progress", action="store_true")
    quick = {"size": 24, "width": 12, "depth": 2, "steps": 60, "every": 30, "frame_size": 128}
    return _common.parse_with_quick(p, argv, quick)


def _figure(target: np.ndarray, fit: np.ndarray, part_img: np.ndarray, path: Path, psnr: float) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, im, title in zip(
        axes,
        (target, np.clip(fit, 0, 1), part_img),
        ("target", f"fit (PSNR {psnr:.1f} dB)", "final partition + level set"),
        strict=True,
    ):
        ax.imshow(im, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title)
        ax.set_axis_off()
    fig.savefig(path)
    fig.clear()
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns output paths and final numbers."""
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    target = load_image(args.size)
    coords = pixel_coords(args.size)
    values = torch.from_numpy(target.reshape(-1, 1))
    torch.manual_seed(args.seed)
    net = _common.mlp(2, args.width, args.depth, 1)
    model = _common.Classifier(net, task="regression", lr=args.lr)
    shift = LevelShift(args.level)
    image_slice = Slice.square((0.0, 0.0), 1.0, name="image")
    cb = SplineCamCallback(
        max_overhead=None,  # finish every snapshot before fit returns
        slices=[image_slice],
        every_n_train_steps=args.every,
        dirpath=out / "splinecam",
        module=lambda pl: nn.Sequential(pl.net, shift),  # the level set becomes the drawn boundary
        frame_size=args.frame_size,
        color_range=(0.0, args.color_max),
        color_scale="linear",
        seed=args.seed,
    )
    batch = min(args.batch_size, len(coords))
    loader = _common.step_loader(TensorDataset(coords, values), batch, args.steps, args.seed)
    with _common.quiet():
        run_dir = _common.fit(model, loader, [cb], out, "inr-image", args)

    net.eval()
    with torch.no_grad():
        fit = net(coords).reshape(args.size, args.size).numpy()
    mse = float(np.mean((fit - target) ** 2))
    psnr = 10 * math.log10(1.0 / max(mse, 1e-12))
    final = compute_partition(nn.Sequential(net, shift), image_slice)
    part_img = render_partition(final, size_px=args.frame_size, color_by="random", show_anchors=False) / 255.0
    recon = _figure(target, fit, part_img, out / "reconstruction.png", psnr)
    stats = final.stats()
    result = {
        "frames": out / "splinecam" / "image",
        "video": out / "splinecam" / "image.mp4",
        "stats_plot": out / "splinecam" / "stats.png",
        "reconstruction": recon,
        "wandb_run_dir": run_dir,
        "psnr": psnr,
        "num_regions": final.num_regions,
        "level_set_length": float(stats["boundary_length"]),
        "snapshots": len(cb.history),
        "seconds": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    _common.print_paths(
        f"INR fit of a {args.size}x{args.size} image: PSNR {psnr:.1f} dB, {final.num_regions} regions, "
        f"level-{args.level:g} set length {result['level_set_length']:.2f}, {result['seconds']:.0f} s",
        {k: result[k] for k in ("frames", "video", "stats_plot", "reconstruction", "wandb_run_dir")},
    )
    if run_dir:
        print(f"\nupload the offline W&B run with: wandb sync {run_dir}")
    return result


if __name__ == "__main__":
    main()
