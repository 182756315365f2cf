"""Small helpers shared by the example scripts: a generic LightningModule, loggers, a trainer, a progress bar.

The examples import this file as ``_common`` (it sits next to them, so ``python examples/<name>.py`` finds it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from splinecam_lightning.demo import StepBar, quiet_lightning  # noqa: F401  (StepBar re-exported)
from splinecam_lightning.layers import mlp  # noqa: F401  (re-exported for the examples)

__all__ = [
    "Classifier",
    "StepBar",
    "finish_wandb",
    "make_loggers",
    "make_trainer",
    "mlp",
    "parse_with_quick",
    "print_paths",
    "quiet",
    "save_image_grid",
    "step_loader",
]


class Classifier(L.LightningModule):
    """Wraps a network as ``self.net`` and trains it with Adam.

    Args:
        net: The network.
        task: ``"binary"`` (one logit, BCE), ``"multiclass"`` (cross-entropy) or ``"regression"`` (MSE).
        lr: Learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(self, net: nn.Module, task: str = "binary", lr: float = 3e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        if task not in ("binary", "multiclass", "regression"):
            raise ValueError(f"unknown task {task!r}")
        self.net = net
        self.task = task
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if self.task == "binary":
            loss = nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), y.float())
            acc = ((out.squeeze(1) > 0).long() == y.long()).float().mean()
            self.log("train/acc", acc)
        elif self.task == "multiclass":
            loss = nn.functional.cross_entropy(out, y.long())
            self.log("train/acc", (out.argmax(1) == y).float().mean())
        else:
            loss = nn.functional.mse_loss(out, y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def parse_with_quick(
    p: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict[str, Any]
) -> argparse.Namespace:
    """Add ``--quick`` to ``p``, parse ``argv`` and, with ``--quick``, override the arguments named in ``quick``."""
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in quick.items():
            setattr(args, k, v)
    return args


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's banner and data-loader advice, and wandb's run summary; W&B offline unless set."""
    defaults = {k: v for k, v in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true")) if k not in os.environ}
    with mock.patch.dict(os.environ, defaults), quiet_lightning():
        yield


def make_loggers(out: Path, name: str, use_wandb: bool, config: dict[str, Any] | None = None) -> list[Any]:
    """A CSV logger and, with ``use_wandb``, an offline W&B logger (``wandb sync`` uploads it later)."""
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="csv_logs")]
    if use_wandb:
        from lightning.pytorch.loggers import WandbLogger

        loggers.insert(
            0,
            WandbLogger(project="splinecam-lightning", name=name, save_dir=str(out), offline=True, config=config or {}),
        )
    return loggers


def finish_wandb(loggers: Sequence[Any]) -> Path | None:
    """Close the W&B run of ``loggers`` (if any) and return its run folder."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            run_dir = Path(lg.experiment.dir).parent
            import wandb

            wandb.finish()
            return run_dir
    return None


def make_trainer(steps: int, callbacks: Sequence[Callback], loggers: Sequence[Any], progress: bool = True) -> L.Trainer:
    """A CPU trainer for ``steps`` optimizer steps, with one step-level progress bar."""
    return L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=list(loggers) or False,
        callbacks=[*callbacks, StepBar(steps, enabled=progress)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
    )


def fit(
    model: L.LightningModule,
    loader: Any,
    callbacks: Sequence[Callback],
    out: Path,
    run_name: str,
    args: Any,
    config: dict[str, Any] | None = None,
) -> Path | None:
    """Train ``model`` for ``args.steps`` steps with CSV (+ offline W&B) logging; return the W&B run folder."""
    loggers = make_loggers(out, run_name, not args.no_wandb, config=config if config is not None else vars(args))
    trainer = make_trainer(args.steps, callbacks, loggers, progress=not args.no_progress)
    try:
        trainer.fit(model, loader)
    finally:
        run_dir = finish_wandb(loggers)  # close the run even if training failed, so its files are complete
    return run_dir


def step_loader(dataset: Any, batch_size: int, steps: int, seed: int) -> Any:
    """A loader whose single epoch holds all ``steps`` batches (sampled with replacement, seeded).

    Lightning does some work at every epoch boundary; with tiny datasets that would dominate training time.
    """
    from torch.utils.data import DataLoader, RandomSampler

    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, replacement=True, num_samples=steps * batch_size, generator=g)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def save_image_grid(
    images: Any,
    path: Path,
    ncols: int = 8,
    titles: Sequence[str] | None = None,
    cmap: str = "gray_r",
    vrange: tuple[float, float] | None = None,
) -> Path:
    """Save ``(n, H, W)`` images as a grid PNG (matplotlib object API, Agg)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    imgs = np.asarray(images, dtype=np.float64)
    n = imgs.shape[0]
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(1.2 * ncols, 1.3 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    vmin, vmax = vrange if vrange is not None else (float(imgs.min()), float(imgs.max()))
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < n:
            ax.imshow(imgs[i], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    fig.clear()
    return path


def print_paths(title: str, paths: dict[str, Any]) -> None:
    """Print ``name: path`` lines under a title."""
    print(f"\n{title}")
    width = max((len(k) for k in paths), default=0)
    for k, v in paths.items():
        print(f"  {k:<{width}}  {v}")
