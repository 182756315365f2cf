"""Per-logger output of :class:`~splinecam_lightning.callback.SplineCamCallback`.

One small sink per attached Lightning logger:

* every logger gets the scalars through ``logger.log_metrics(metrics, step=trainer.global_step)``;
* :class:`WandbSink` (``WandbLogger``) also logs frames as ``wandb.Image``, a ``wandb.Table`` of per-slice
  statistics, the statistics plot, and each video as ``wandb.Video`` from its mp4 file;
* :class:`TensorBoardSink` (``TensorBoardLogger``) also logs frames and the statistics plot as images;
* CSV and any other logger: scalars only.

``wandb`` and ``tensorboard`` are imported lazily, only when such a logger is attached. All sink methods are
called from the main process of global rank zero only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Sink", "TensorBoardSink", "WandbSink", "make_sinks"]

PathLike = str | os.PathLike[str]


class Sink:
    """Base sink: forwards scalars to ``logger.log_metrics``; the other outputs are ignored.

    Args:
        logger: A Lightning ``Logger``.
    """

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Log float metrics at ``step``."""
        self.logger.log_metrics(dict(metrics), step=step)

    def log_frames(self, frames: Mapping[str, PathLike], step: int) -> None:
        """Log frames (``log key -> PNG path``) made at ``step``. Ignored by scalar-only loggers."""

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """Log a table at ``step``. Ignored by loggers without tables."""

    def log_videos(self, videos: Mapping[str, PathLike], step: int) -> None:
        """Log mp4 videos (``log key -> path``) at ``step``. Ignored by loggers without video support."""

    def log_plot(self, key: str, path: PathLike, step: int) -> None:
        """Log a static image such as the statistics plot. Ignored by loggers without images."""

    def flush(self) -> None:
        """Persist buffered scalars where the logger buffers them (e.g. the CSV logger)."""
        save = getattr(self.logger, "save", None)
        if callable(save):
            save()


class WandbSink(Sink):
    """Weights & Biases: scalars, ``wandb.Image`` frames, a ``wandb.Table`` and ``wandb.Video`` files.

    Everything goes through ``WandbLogger.log_metrics``, which records ``trainer/global_step`` with each row,
    so the step slider of the media panels lines up with the scalars.
    """

    def log_frames(self, frames: Mapping[str, PathLike], step: int) -> None:
        import wandb

        payload = {k: wandb.Image(str(p), caption=k.rsplit("/", 1)[-1]) for k, p in frames.items()}
        if payload:
            self.logger.log_metrics(payload, step=step)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        import wandb

        table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        self.logger.log_metrics({key: table}, step=step)

    def log_videos(self, videos: Mapping[str, PathLike], step: int) -> None:
        import wandb

        payload = {k: wandb.Video(str(p), format="mp4") for k, p in videos.items()}
        if payload:
            self.logger.log_metrics(payload, step=step)

    def log_plot(self, key: str, path: PathLike, step: int) -> None:
        import wandb

        self.logger.log_metrics({key: wandb.Image(str(path))}, step=step)

    def flush(self) -> None:
        """W&B streams its records itself; nothing to do."""


class TensorBoardSink(Sink):
    """TensorBoard: scalars and images (``SummaryWriter.add_image``)."""

    def _add_image(self, tag: str, path: PathLike, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
        self.logger.experiment.add_image(tag, img, global_step=step, dataformats="HWC")

    def log_frames(self, frames: Mapping[str, PathLike], step: int) -> None:
        for k, p in frames.items():
            self._add_image(k, p, step)

    def log_plot(self, key: str, path: PathLike, step: int) -> None:
        self._add_image(key, path, step)

    def flush(self) -> None:
        exp = getattr(self.logger, "experiment", None)
        if exp is not None and hasattr(exp, "flush"):
            exp.flush()


def make_sinks(loggers: Sequence[Any]) -> list[Sink]:
    """One sink per logger, chosen by the logger's type."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    sinks: list[Sink] = []
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            sinks.append(WandbSink(lg))
        elif isinstance(lg, TensorBoardLogger):
            sinks.append(TensorBoardSink(lg))
        else:
            sinks.append(Sink(lg))  # scalars only (CSV and unknown loggers)
    return sinks
