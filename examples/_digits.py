"""Shared body of ``digits_mlp.py`` and ``digits_cnn.py``: train on scikit-learn's bundled 8x8 digits while
watching slices through three training digits, then sample the decision boundary between two classes."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common
import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from splinecam_lightning import Slice, compute_partition, sample_boundary
from splinecam_lightning.callback import SplineCamCallback
from splinecam_lightning.render import save_frame


def load_digits_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bundled 8x8 digits scaled to ``[0, 1]``, flat ``(n, 64)``: ``(x_train, y_train, x_test, y_test)``."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


def digit_slices(x: torch.Tensor, y: torch.Tensor, n: int, seed: int, margin: float) -> list[tuple[Slice, tuple]]:
    """``n`` slices, each the plane through three training digits of three different classes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        classes = torch.randperm(10, generator=g)[:3].tolist()
        pts = []
        for c in classes:
            idx = torch.nonzero(y == c)[:, 0]
            pts.append(x[idx[torch.randint(len(idx), (1,), generator=g)]].reshape(-1))
        name = "digits_" + "".join(str(c) for c in classes)
        out.append((Slice.through_points(*pts, margin=margin, name=name), tuple(classes)))
    return out


def parse_args(
    argv: Sequence[str] | None, description: str, defaults: dict[str, Any], quick: dict[str, Any]
) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=defaults["steps"], help=f"optimizer steps ({defaults['steps']})")
    p.add_argument("--every", type=int, default=defaults["every"], help=f"snapshot interval ({defaults['every']})")
    p.add_argument("--num-slices", type=int, default=defaults["num_slices"], help="slices through 3 digits")
    p.add_argument("--margin", type=float, default=defaults["margin"], help="slice margin around the 3 digits")
    p.add_argument("--samples", type=int, default=16, help="decision-boundary samples drawn per slice")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=defaults["lr"])
    p.add_argument("--frame-size", type=int, default=384, help="frame size in pixels (multiple of 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=defaults["out"], help="output folder")
    p.add_argument("--no-wandb", action="store_true", help="CSV logging only")
    p.add_argument("--no-progress", action="store_true")
    return _common.parse_with_quick(p, argv, quick)


def run(
    args: argparse.Namespace, make_net: Callable[[], nn.Module], input_shape: tuple[int, ...] | None, tag: str
) -> dict[str, Any]:
    """Train ``make_net()`` on digits with the callback, then sample each slice's two-class decision boundary.

    Returns:
        ``{"accuracy", "slices": [{name, classes, class_pair, num_regions, boundary_segments, frame, samples_png,
        tie_gap, on_pair}], "summary", "wandb_run_dir", ...}``.
    """
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_digits_data(args.seed)
    shape = input_shape or (64,)
    torch.manual_seed(args.seed)
    net = make_net()
    model = _common.Classifier(net, task="multiclass", lr=args.lr)
    loader = _common.step_loader(TensorDataset(x_tr.reshape(-1, *shape), y_tr), args.batch_size, args.steps, args.seed)
    slices = digit_slices(x_tr, y_tr, args.num_slices, args.seed, args.margin)
    cb = SplineCamCallback(
        max_overhead=None,  # finish every snapshot before fit returns
        slices=[s for s, _ in slices],
        every_n_train_steps=args.every,
        dirpath=out / "splinecam",
        module="net",
        input_shape=input_shape,
        color_by="class",
        frame_size=args.frame_size,
        seed=args.seed,
    )
    with _common.quiet():
        run_dir = _common.fit(model, loader, [cb], out, f"digits-{tag}", args)

    net.eval()
    with torch.no_grad():
        acc = float((net(x_te.reshape(-1, *shape)).argmax(1) == y_te).float().mean())

    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for s, classes in slices:
        # The slice's full decision boundary says which pairs of the three anchor classes meet in it.
        full = compute_partition(net, s, input_shape=input_shape)
        present = {tuple(sorted(p)) for p in full.boundary_classes.tolist()}
        candidates = [(classes[i], classes[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
        pair = next((p for p in candidates if tuple(sorted(p)) in present), candidates[0])
        part = compute_partition(net, s, input_shape=input_shape, class_pair=pair)
        frame = save_frame(
            part,
            out / f"{s.name}_boundary_{pair[0]}_{pair[1]}.png",
            color_by="class",
            size_px=args.frame_size,
            title=f"{s.name}: classes {classes}, boundary {pair[0]}|{pair[1]}, {part.num_regions} regions",
        )
        row: dict[str, Any] = {
            "name": s.name,
            "classes": list(classes),
            "class_pair": list(pair),
            "num_regions": part.num_regions,
            "boundary_segments": int(part.boundary.shape[0]),
            "pairs_in_slice": sorted(list(p) for p in present),
            "frame": str(frame),
            "samples_png": None,
            "tie_gap": None,
            "on_pair": None,
        }
        anchors = s.to_input(s.anchors).reshape(-1, 8, 8).numpy()
        titles = [f"anchor {c}" for c in classes]
        images = list(anchors)
        if part.boundary.shape[0] > 0:
            pts = sample_boundary(part, args.samples, generator=gen)  # (n, 64) float64 input points
            with torch.no_grad():
                logits = net.double()(pts.reshape(-1, *shape)).float()
                net.float()
            # On the boundary between a and b the two logits tie and no other class is larger.
            gap = (logits[:, pair[0]] - logits[:, pair[1]]).abs()
            top2 = logits.topk(2, dim=1).indices.sort(dim=1).values
            row["tie_gap"] = float(gap.max())
            row["on_pair"] = float((top2 == torch.tensor(sorted(pair))).all(1).float().mean())
            images += list(pts.reshape(-1, 8, 8).numpy())
            titles += [f"{pair[0]}|{pair[1]}"] * len(pts)
        grid = out / f"{s.name}_boundary_samples.png"
        row["samples_png"] = str(_common.save_image_grid(np.stack(images), grid, titles=titles, vrange=(0, 1)))
        rows.append(row)
    summary = {
        "model": tag,
        "test_accuracy": acc,
        "steps": args.steps,
        "slices": rows,
        "wandb_run_dir": str(run_dir) if run_dir else None,
        "seconds": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for r in rows:
        gap = "no boundary in this slice" if r["tie_gap"] is None else f"max |logit gap| {r['tie_gap']:.2e}"
        _common.print_paths(
            f"{r['name']} (classes {r['classes']}): {r['num_regions']} regions, boundary {r['class_pair']}: {gap}",
            {"partition": r["frame"], "samples": r["samples_png"], "frames": out / "splinecam" / r["name"]},
        )
    print(f"\ntest accuracy {acc:.3f}; summary: {out / 'summary.json'}; {summary['seconds']:.0f} s")
    if run_dir:
        print(f"upload the offline W&B run with: wandb sync {run_dir}")
    return {**summary, "accuracy": acc, "out": out}
