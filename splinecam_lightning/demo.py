"""The demo training behind ``splinecam-lightning demo``: a two-moons MLP watched by :class:`SplineCamCallback`.

Everything here is small and CPU friendly. :func:`run_demo` trains the classifier with the callback attached,
logs to W&B in offline mode by default (and to a CSV logger), and returns the paths of what it wrote.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from splinecam_lightning.layers import mlp

__all__ = ["MoonsClassifier", "QUICK", "DEFAULTS", "demo_slices", "make_moons", "run_demo"]

#: Default settings of :func:`run_demo`.
DEFAULTS: dict[str, Any] = {
    "steps": 2000,
    "width": 32,
    "depth": 4,
    "every": 100,
    "frame_size": 512,
    "batch_size": 128,
    "lr": 3e-3,
}
#: Tiny settings for smoke tests (``--quick``).
QUICK: dict[str, Any] = {
    "steps": 60,
    "width": 8,
    "depth": 2,
    "every": 20,
    "frame_size": 128,
    "batch_size": 64,
    "lr": 1e-2,
}

# The data's bounding box plus a margin: the "moons" slice.
_DOMAIN = ((-1.6, -1.1), (2.6, -1.1), (2.6, 1.6), (-1.6, 1.6))


def make_moons(n: int = 2048, noise: float = 0.12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved half circles (the scikit-learn "two moons"), generated with a private torch generator.

    Args:
        n: Number of points.
        noise: Standard deviation of the Gaussian noise added to every point.
        seed: Seed of the generator.

    Returns:
        ``(x (n, 2) float32, y (n,) float32 in {0, 1})``.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * math.pi
    y = (torch.arange(n) % 2).float()[torch.randperm(n, generator=g)]
    upper = torch.stack([torch.cos(t), torch.sin(t)], 1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
    x = torch.where(y[:, None] == 1, lower, upper) + noise * torch.randn(n, 2, generator=g)
    return x.float(), y


class MoonsClassifier(L.LightningModule):
    """ReLU MLP ``2 -> width x depth -> 1`` (kept as ``self.net``) trained with BCE on two moons.

    Args:
        width: Hidden width.
        depth: Number of hidden layers.
        lr: Adam learning rate.
    """

    def __init__(self, width: int = 32, depth: int = 4, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(2, width, depth, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x).squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
        acc = ((logits > 0).float() == y).float().mean()
        self.log("train/loss", loss)
        self.log("train/acc", acc)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def demo_slices() -> list:
    """The two slices the demo watches: the whole data domain and a zoom on the moons' overlap."""
    from splinecam_lightning.slices import Slice

    x, _ = make_moons(6, seed=123)  # a few points shown as anchors on the full view
    whole = Slice(origin=torch.zeros(2), basis=torch.eye(2), domain=torch.tensor(_DOMAIN), anchors=x[:3], name="moons")
    zoom = Slice.square((0.5, 0.25), 0.55, name="zoom")
    return [whole, zoom]


class StepBar(Callback):
    """One tqdm bar over all optimizer steps, with the loss (Lightning's own bar restarts every epoch)."""

    def __init__(self, total: int, desc: str = "training", enabled: bool = True) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.bar: Any = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()
        self.bar = tqdm(
            total=self.total, desc=self.desc, unit="step", disable=not self.enabled, mininterval=0.2 if tty else 10
        )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if self.bar is None:
            return
        step = min(self.total, int(trainer.global_step))
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and step % 10 == 0:
            self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's start-up banner and the single-process data loader advice."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*number of training batches.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def run_demo(
    *,
    steps: int | None = None,
    width: int | None = None,
    depth: int | None = None,
    every: int | None = None,
    out: str | os.PathLike[str] = "splinecam_out",
    seed: int = 0,
    quick: bool = False,
    wandb: bool = True,
    wandb_online: bool = False,
    frame_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a two-moons MLP with :class:`~splinecam_lightning.callback.SplineCamCallback` and return its outputs.

    Args:
        steps: Optimizer steps.
        width: Hidden width of the MLP.
        depth: Number of hidden layers.
        every: Snapshot interval in steps.
        out: Output folder.
        seed: Seed of data, weights and slices.
        quick: Tiny settings for tests (:data:`QUICK`); explicit arguments still win.
        wandb: Log to Weights & Biases (plus CSV). ``False`` logs to CSV only.
        wandb_online: Stream to the W&B server instead of writing an offline run.
        frame_size: Frame size in pixels (multiple of 16).
        progress: Show a progress bar.

    Returns:
        Paths: ``out``, ``frames`` (slice name -> frame folder), ``videos`` (slice name -> mp4), ``stats_plot``,
        ``stats_csv``, ``checkpoint``, ``csv_metrics`` and, with W&B, ``wandb_run_dir``; plus ``history``
        (the callback's snapshot records) and ``final_loss``.

    Raises:
        ValueError: A setting is out of range.
    """
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from splinecam_lightning.callback import SplineCamCallback
    from splinecam_lightning.render import check_frame_size

    cfg = dict(QUICK if quick else DEFAULTS)
    for k, v in (("steps", steps), ("width", width), ("depth", depth), ("every", every), ("frame_size", frame_size)):
        if v is not None:
            cfg[k] = v
    for k in ("steps", "width", "depth", "every"):
        if not isinstance(cfg[k], int) or cfg[k] < 1:
            raise ValueError(f"{k} must be a positive integer, got {cfg[k]!r}")
    check_frame_size(cfg["frame_size"], "frame size")

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dirpath = out / "splinecam"

    wandb_env = {}
    if not wandb_online and wandb:
        wandb_env["WANDB_MODE"] = "offline"
    if "WANDB_SILENT" not in os.environ:  # wandb's run summary is noise next to the paths the CLI prints
        wandb_env["WANDB_SILENT"] = "true"
    with quiet_lightning(), mock.patch.dict(os.environ, wandb_env):
        L.seed_everything(seed, verbose=False)
        x, y = make_moons(2048 if not quick else 512, seed=seed)
        loader = DataLoader(
            TensorDataset(x, y),
            batch_size=cfg["batch_size"],
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        model = MoonsClassifier(width=cfg["width"], depth=cfg["depth"], lr=cfg["lr"])
        cb = SplineCamCallback(
            max_overhead=None,  # finish every snapshot before fit returns
            slices=demo_slices(),
            every_n_train_steps=cfg["every"],
            dirpath=dirpath,
            module="net",
            seed=seed,
            frame_size=cfg["frame_size"],
            # Default colours: log scale fixed at step 0 with 1000x headroom, as slopes grow ~1000x in training.
            fps=8,
        )
        loggers: list[Any] = [CSVLogger(save_dir=str(out), name="csv_logs")]
        wandb_logger = None
        if wandb:
            from lightning.pytorch.loggers import WandbLogger

            wandb_logger = WandbLogger(
                project="splinecam-lightning",
                save_dir=str(out),
                offline=not wandb_online,
                config={**cfg, "seed": seed},
            )
            loggers.insert(0, wandb_logger)
        trainer = L.Trainer(
            max_steps=cfg["steps"],
            max_epochs=-1,
            accelerator="cpu",
            devices=1,
            logger=loggers,
            callbacks=[cb, StepBar(cfg["steps"], enabled=progress)],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            log_every_n_steps=10,
        )
        wandb_dir: Path | None = None
        try:
            trainer.fit(model, loader)
            if wandb_logger is not None:
                wandb_dir = Path(wandb_logger.experiment.dir).parent
        finally:
            if wandb_logger is not None:
                import wandb as _wandb

                _wandb.finish()
        ckpt = out / "demo.ckpt"
        trainer.save_checkpoint(ckpt)

    names = [s.name for s in cb.slices or []]
    result: dict[str, Any] = {
        "out": out,
        "frames": {n: dirpath / n for n in names},
        "videos": {n: dirpath / f"{n}.mp4" for n in names if (dirpath / f"{n}.mp4").exists()},
        "stats_plot": dirpath / "stats.png" if (dirpath / "stats.png").exists() else None,
        "stats_csv": dirpath / "stats.csv" if (dirpath / "stats.csv").exists() else None,
        "checkpoint": ckpt,
        "csv_metrics": Path(loggers[-1].log_dir) / "metrics.csv",
        "wandb_run_dir": wandb_dir,
        "history": cb.history,
        "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "config": {**cfg, "seed": seed},
    }
    return result
