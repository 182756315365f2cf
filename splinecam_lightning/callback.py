"""Lightning callback that snapshots the exact linear-region partition of a network while it trains."""

from __future__ import annotations

import collections
import csv
import datetime
import io
import math
import operator
import os
import queue
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from splinecam_lightning.errors import SplineCamWarning
from splinecam_lightning.slice_selection import choose_slices, collect_samples, preserve_rng
from splinecam_lightning.slices import Slice

__all__ = ["SplineCamCallback", "SplineCamWarning"]

_STATE_VERSION = 1
_FRAME_RE = re.compile(r"^(\d+)\.png$")
_MAIN_STATS = ("num_regions", "mean_area", "mean_eccentricity", "boundary_length")


@dataclass
class _SnapshotJob:
    step: int
    epoch: int
    model: Any  # a PreparedModel: private traced copy, safe to use from the worker thread
    slices: list[Slice]
    waited: float  # seconds the training thread spent on this snapshot


@dataclass
class _SnapshotResult:
    step: int
    epoch: int
    waited: float = 0.0
    per_slice: dict[str, dict[str, float]] = field(default_factory=dict)
    frames: dict[str, Path] = field(default_factory=dict)
    errors: list[tuple[str, BaseException]] = field(default_factory=list)


class _Worker:
    """Runs snapshot jobs inline or on one low-priority background thread with a bounded queue.

    A job computes the exact partitions from a :class:`~splinecam_lightning.engine.PreparedModel` (copied and
    traced on the training thread) and draws the frames. ``submit`` blocks while the queue is full, so nothing
    is dropped; ``flush`` waits until every submitted job is done. ``fn`` never raises: it packs errors into
    its result. Results are collected for the main thread, which does all logger calls.

    Tracing (``torch.fx`` patches ``nn.Module.__call__`` process-wide while it runs) happens only on the
    training thread and only after ``flush``, so it never overlaps with the worker's module calls.
    """

    def __init__(self, fn: Callable[[_SnapshotJob], _SnapshotResult], max_queue: int) -> None:
        self._fn = fn
        self._queue: queue.Queue[_SnapshotJob | None] = queue.Queue(maxsize=max(1, max_queue))
        self._done: collections.deque[_SnapshotResult] = collections.deque()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        _lower_thread_priority()
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._done.append(self._fn(job))
            finally:
                self._queue.task_done()

    def submit(self, job: _SnapshotJob) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="splinecam-snapshots", daemon=True)
            self._thread.start()
        self._queue.put(job)

    def run_inline(self, job: _SnapshotJob) -> None:
        self.flush()  # keep results in step order
        self._done.append(self._fn(job))

    def flush(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None

    def pop_done(self) -> list[_SnapshotResult]:
        out = []
        while self._done:
            out.append(self._done.popleft())
        return out


def _lower_thread_priority(niceness: int = 10) -> None:
    """Make the calling thread yield the CPU to training (Linux: a thread id is a valid ``PRIO_PROCESS`` target).

    Only this thread's scheduling priority changes; thread counts and numerics of training are untouched.
    """
    get_id = getattr(threading, "get_native_id", None)
    if get_id is None or not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return
    try:
        tid = get_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
    except OSError:
        pass


def _safe_name(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._")
    return s or "slice"


def _unique_names(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        base = _safe_name(n)
        cand, k = base, 1
        while cand in out:
            cand = f"{base}_{k}"
            k += 1
        out.append(cand)
    return out


class SplineCamCallback(Callback):
    """Snapshot the exact linear-region partition of 2D slices while training, log it, and make videos.

    At each snapshot the callback computes the exact partition of every slice with
    :func:`~splinecam_lightning.engine.compute_partition` (on a private float64 eval-mode copy: BatchNorm uses
    running statistics and Dropout is off; the training module, its gradients, train/eval mode, the optimizer
    and every RNG state are left untouched), logs its statistics, and writes one PNG frame per slice. At the
    end of fit, and also when fit stops on an exception, it makes one mp4 per slice and a plot of the
    statistics.

    **When.** A snapshot is taken at the start of training (step 0, before any optimizer step, or the resumed
    step), on the schedule, and once more at the end of fit; never during the sanity check, and at most once
    per ``trainer.global_step`` (so gradient accumulation does not repeat snapshots). The schedule is exactly
    one of ``every_n_train_steps``, ``every_n_epochs`` or ``train_time_interval``; with none of them,
    ``every_n_train_steps=100``.

    **Which slices.** ``slices`` if given; otherwise they are chosen at the start of training from the
    training data: ``num_slices`` planes through three samples from different classes (``data0``, ``data1``,
    ...) and ``num_local_slices`` randomly oriented squares around a sample (``local0``, ...), all drawn with
    a private ``torch.Generator`` seeded with ``seed`` (the global RNG is never consumed). The slices are
    saved in the callback's checkpoint state, so a resumed run uses the same slices and continues the same
    frames and videos.

    **Files** (under ``dirpath``):

    * ``<slice>/<step:08d>.png``: one frame per slice per snapshot, written as it is made;
    * ``<slice>.mp4``: the H.264 video of a slice's frames (end of fit, or on exception);
    * ``stats.csv``: every statistic of every slice at every snapshot (rewritten after each snapshot);
    * ``stats.png``: statistics against step.

    Frames in a slice folder that do not belong to this run's history (left by an earlier run, or written
    after the checkpoint a run resumes from) are moved to ``<slice>/_superseded/``, never deleted.

    **Logged keys** (through ``logger.log_metrics(..., step=trainer.global_step)`` on every attached logger,
    global rank zero only):

    * ``splinecam/<slice>/<stat>`` for each statistic of :meth:`Partition.stats`: ``num_regions``,
      ``mean_area``, ``std_area``, ``mean_eccentricity``, ``mean_eccentricity_paper``, ``mean_vertices``,
      ``boundary_length`` (see :func:`splinecam_lightning.stats.partition_stats` for definitions);
    * ``splinecam/<slice>/seconds``: seconds the exact partition of that slice took;
    * ``splinecam/mean/<stat>``: each statistic averaged over the slices of the snapshot;
    * ``splinecam/snapshot_seconds``: seconds the snapshot took in all (copy, partitions of all slices);
    * ``splinecam/snapshot_wait_seconds``: seconds the training thread spent on it (copying and tracing the
      module, and waiting for the previous snapshot if it was still running).

    With a ``WandbLogger`` also: ``splinecam/frame/<slice>`` (``wandb.Image`` at the snapshot's step),
    ``splinecam/stats_table`` (``wandb.Table`` with one row per slice per snapshot, logged at the end),
    ``splinecam/stats_plot`` (``wandb.Image``) and ``splinecam/video/<slice>`` (``wandb.Video`` of the mp4).
    With a ``TensorBoardLogger``: the scalars, ``splinecam/frame/<slice>`` images and the stats plot. CSV and
    other loggers: scalars. No logger: files only.

    **Failures.** An unsupported model (e.g. GELU, LayerNorm) raises
    :class:`~splinecam_lightning.engine.UnsupportedModelError` at fit start, before any training step,
    whatever ``on_error`` says. A snapshot that fails later (e.g. more regions than ``max_regions``, NaN
    weights) gives a :class:`SplineCamWarning` naming the cause and training continues; with
    ``on_error="raise"`` the exception propagates and stops training.

    **Distributed.** Under DDP every rank validates the model and chooses the same slices, but only global
    rank zero computes, writes and logs. The callback calls no collective operation.

    Example::

        from lightning.pytorch.loggers import WandbLogger
        from splinecam_lightning import Slice, SplineCamCallback

        cb = SplineCamCallback(slices=[Slice.from_vertices(square, name="square")], every_n_train_steps=100,
                               module="net")
        trainer = L.Trainer(callbacks=[cb], logger=WandbLogger(project="splinecam", offline=True))

    Args:
        slices: Slices to watch. ``None`` chooses them from the training data at the start of training.
        every_n_train_steps: Snapshot when ``trainer.global_step`` is a multiple of this.
        every_n_epochs: Snapshot at the end of every ``n``-th training epoch.
        train_time_interval: Snapshot when at least this much time (a ``timedelta`` or seconds) has passed
            since the previous snapshot, checked after each optimizer step.
        dirpath: Folder for frames, videos and statistics.
        module: The network to analyse: ``None`` for the LightningModule itself, an attribute path of it
            (``"net"``, ``"model.backbone"``), a callable ``f(pl_module) -> nn.Module``, or an ``nn.Module``.
        input_shape: Per-sample input shape the network expects (e.g. ``(3, 16, 16)``); inferred from the
            training data when slices are chosen from it, otherwise flat inputs are assumed.
        num_slices: Number of three-sample slices chosen from the data.
        num_local_slices: Number of local slices (``Slice.around``) chosen from the data.
        local_radius: Half-width of local slices; default 10% of the data's root-mean-square spread.
        slice_margin: Margin of three-sample slices (see :meth:`Slice.through_points`).
        pool_size: Number of training samples the slices are chosen from.
        seed: Seed of the callback's private generator.
        compute_device: Device for the exact computation; default the module's device (GPU when it is on one).
        max_regions: A slice with more regions than this fails (see ``on_error``) instead of using all memory.
        color_by: Frame colouring: ``"slope"`` (norm of the region's slope, as in the paper's videos),
            ``"random"`` or ``"class"``.
        color_range: ``(vmin, vmax)`` of the slope colour scale. Default: from the first snapshot, ``(smallest
            positive slope / 3, color_headroom * largest slope)`` on the log scale, or ``(0, color_headroom *
            largest slope)`` on the linear one; kept for the whole run (and in checkpoints) so all frames share
            one scale.
        color_scale: ``"log"`` (default: slopes grow by orders of magnitude while training) or ``"linear"``.
        color_headroom: Factor above the first snapshot's largest slope norm for the default colour range;
            default 1000 on the log scale, 1.5 on the linear one.
        frame_size: Frame width and height in pixels, a multiple of 16.
        fps: Frames per second of the videos.
        write_frames: Write PNG frames (needed for videos and image logging).
        log_frames: Send frames to image-capable loggers (W&B, TensorBoard).
        make_videos: Make the mp4 videos and the statistics plot at the end of fit and on exception.
        background: Compute partitions and draw frames on one low-priority background thread (bounded queue,
            flushed before the next snapshot, at checkpoints, the end of fit, on exception and at teardown, so
            nothing is lost). The training thread only copies and traces the module. ``False`` does everything
            on the training thread.
        max_queue: Snapshots whose frames may wait for the worker before training blocks.
        on_error: ``"warn"`` to warn and continue when a snapshot fails, ``"raise"`` to stop training at the
            failing snapshot's step (snapshots then run synchronously).

    Raises:
        ValueError: More than one schedule argument, or an invalid argument value.
    """

    def __init__(
        self,
        slices: Sequence[Slice] | None = None,
        *,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        train_time_interval: datetime.timedelta | float | None = None,
        dirpath: str | os.PathLike[str] = "splinecam",
        module: str | nn.Module | Callable[[LightningModule], nn.Module] | None = None,
        input_shape: Sequence[int] | None = None,
        num_slices: int = 2,
        num_local_slices: int = 1,
        local_radius: float | None = None,
        slice_margin: float = 0.2,
        pool_size: int = 256,
        seed: int = 0,
        compute_device: str | torch.device | None = None,
        max_regions: int = 200_000,
        color_by: Literal["slope", "random", "class"] = "slope",
        color_range: tuple[float, float] | None = None,
        color_scale: Literal["log", "linear"] = "log",
        color_headroom: float | None = None,
        frame_size: int = 512,
        fps: float = 8,
        write_frames: bool = True,
        log_frames: bool = True,
        make_videos: bool = True,
        background: bool = True,
        max_queue: int = 4,
        on_error: Literal["warn", "raise"] = "warn",
    ) -> None:
        given = [
            n
            for n, v in (
                ("every_n_train_steps", every_n_train_steps),
                ("every_n_epochs", every_n_epochs),
                ("train_time_interval", train_time_interval),
            )
            if v is not None
        ]
        if len(given) > 1:
            raise ValueError(
                f"give at most one of every_n_train_steps, every_n_epochs, train_time_interval; got {given}"
            )
        if not given:
            every_n_train_steps = 100
        if every_n_train_steps is not None and (not isinstance(every_n_train_steps, int) or every_n_train_steps < 1):
            raise ValueError(f"every_n_train_steps must be a positive int, got {every_n_train_steps!r}")
        if every_n_epochs is not None and (not isinstance(every_n_epochs, int) or every_n_epochs < 1):
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        interval_s: float | None = None
        if train_time_interval is not None:
            interval_s = (
                train_time_interval.total_seconds()
                if isinstance(train_time_interval, datetime.timedelta)
                else float(train_time_interval)
            )
            if not (interval_s > 0 and math.isfinite(interval_s)):
                raise ValueError(f"train_time_interval must be positive, got {train_time_interval!r}")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if color_by not in ("slope", "random", "class"):
            raise ValueError(f"color_by must be 'slope', 'random' or 'class', got {color_by!r}")
        if not isinstance(frame_size, int) or frame_size <= 0 or frame_size % 16:
            raise ValueError(f"frame_size must be a positive multiple of 16, got {frame_size!r}")
        if num_slices < 0 or num_local_slices < 0:
            raise ValueError("num_slices and num_local_slices must be >= 0")
        if slices is None and num_slices + num_local_slices == 0:
            raise ValueError("no slices given and num_slices + num_local_slices == 0: nothing to watch")
        if color_range is not None:
            color_range = (float(color_range[0]), float(color_range[1]))
            if not color_range[1] > color_range[0]:
                raise ValueError(f"color_range must be (vmin, vmax) with vmin < vmax, got {color_range}")
        if not (fps > 0):
            raise ValueError(f"fps must be positive, got {fps}")
        if module is not None and not (isinstance(module, (str, nn.Module)) or callable(module)):
            raise ValueError("module must be None, an attribute path, an nn.Module or a callable")

        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.train_time_interval = interval_s
        self.dirpath = Path(dirpath)
        self.module = module
        self.input_shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
        self.num_slices = int(num_slices)
        self.num_local_slices = int(num_local_slices)
        self.local_radius = local_radius
        self.slice_margin = float(slice_margin)
        self.pool_size = int(pool_size)
        self.seed = int(seed)
        self.compute_device = compute_device
        self.max_regions = int(max_regions)
        self.color_by = color_by
        if color_scale not in ("log", "linear"):
            raise ValueError(f"color_scale must be 'log' or 'linear', got {color_scale!r}")
        self.color_scale = color_scale
        if color_headroom is None:
            color_headroom = 1000.0 if color_scale == "log" else 1.5
        if not color_headroom >= 1.0:
            raise ValueError(f"color_headroom must be >= 1, got {color_headroom}")
        self.color_headroom = float(color_headroom)
        self.frame_size = frame_size
        self.fps = fps
        self.write_frames = bool(write_frames)
        self.log_frames = bool(log_frames)
        self.make_videos = bool(make_videos)
        self.on_error = on_error

        self._slices: list[Slice] | None = None
        if slices is not None:
            slices = list(slices)
            if not slices:
                raise ValueError("slices is an empty list")
            for s in slices:
                if not isinstance(s, Slice):
                    raise TypeError(f"slices must be Slice objects, got {type(s).__name__}")
            names = _unique_names([s.name for s in slices])
            self._slices = [
                Slice.from_state_dict({**s.state_dict(), "name": n}) for s, n in zip(slices, names, strict=True)
            ]
        self._color_range = color_range
        self._history: list[dict[str, Any]] = []
        self._done_steps: set[int] = set()
        self._frames_written = 0
        self._shape_from_data: tuple[int, ...] | None = None

        self.background = bool(background)
        self._worker = _Worker(self._run_job, max_queue)
        self._pending_errors: list[tuple[str, BaseException]] = []
        self._sinks: list[Any] = []
        self._checked = False
        self._active = False
        self._is_zero = True
        self._last_seen_step: int | None = None
        self._last_snapshot_time = 0.0
        self._started = False
        self._finished = False

    # ------------------------------------------------------------------ public views
    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=str(self.dirpath))

    @property
    def slices(self) -> list[Slice] | None:
        """The watched slices (``None`` until they are chosen from the data)."""
        return None if self._slices is None else list(self._slices)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per snapshot: ``{"step", "epoch", "seconds", "slices": {name: stats}}``."""
        return list(self._history)

    @property
    def snapshot_steps(self) -> list[int]:
        """Global steps at which snapshots were taken, in order."""
        return [int(h["step"]) for h in self._history]

    @property
    def color_range(self) -> tuple[float, float] | None:
        """The slope colour scale shared by all frames (fixed at the first snapshot)."""
        return self._color_range

    # ------------------------------------------------------------------ helpers
    def _warn(self, msg: str) -> None:
        warnings.warn(msg, SplineCamWarning, stacklevel=3)

    def _fail(self, what: str, err: BaseException) -> None:
        """Warn about ``err`` and go on, or re-raise it with ``on_error="raise"``."""
        if self.on_error == "raise":
            raise err
        self._warn(f"SplineCam: {what}: {type(err).__name__}: {err}")

    def _resolve_module(self, pl_module: LightningModule) -> nn.Module:
        m: Any
        if self.module is None:
            m = pl_module
        elif isinstance(self.module, nn.Module):
            m = self.module
        elif isinstance(self.module, str):
            try:
                m = operator.attrgetter(self.module)(pl_module)
            except AttributeError as e:
                raise AttributeError(
                    f"SplineCamCallback(module={self.module!r}): {type(pl_module).__name__} has no such attribute"
                ) from e
        else:
            m = self.module(pl_module)
        if not isinstance(m, nn.Module):
            raise TypeError(f"SplineCamCallback: the module to analyse must be an nn.Module, got {type(m).__name__}")
        return m

    def _effective_input_shape(self) -> tuple[int, ...] | None:
        return self.input_shape if self.input_shape is not None else self._shape_from_data

    def _check(self, module: nn.Module) -> None:
        from splinecam_lightning.engine import check_model

        check_model(module, input_shape=self._effective_input_shape())
        self._checked = True

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finished = False
            self._active = False
            self._started = False
            self._is_zero = bool(trainer.is_global_zero)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validate the module on every rank, so an unsupported model fails before any work."""
        from splinecam_lightning.engine import UnsupportedModelError

        self._is_zero = bool(trainer.is_global_zero)
        self._checked = False
        module = self._resolve_module(pl_module)  # a wrong `module` argument fails here
        try:
            self._check(module)
        except UnsupportedModelError:
            raise
        except Exception:
            # Most likely the input shape is unknown yet; checked again once the data is seen.
            self._checked = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Choose slices if needed (every rank alike), finish validation, and take the first snapshot."""
        from splinecam_lightning.engine import UnsupportedModelError

        if self._slices is None or (self.input_shape is None and self._shape_from_data is None):
            gen = torch.Generator().manual_seed(self.seed)
            source = trainer.train_dataloader
            try:
                if source is None:
                    raise ValueError("there is no training dataloader")
                pool = self.pool_size if self._slices is None else 1
                x, y, shape = collect_samples(source, pool_size=pool, generator=gen)
            except Exception as e:
                if self._slices is None:
                    raise ValueError(
                        f"SplineCamCallback: no slices given and none can be chosen from the training data ({e}); "
                        "pass `slices=`"
                    ) from e
                shape = None  # only the input shape was wanted: flat inputs are assumed
            if shape is not None and (self._slices is None or math.prod(shape) == self._slices[0].input_dim):
                self._shape_from_data = shape
                self._checked = False  # check again, now with a forward pass at this shape
            if self._slices is None:
                self._slices = choose_slices(
                    x,
                    y,
                    num_slices=self.num_slices,
                    num_local_slices=self.num_local_slices,
                    local_radius=self.local_radius,
                    margin=self.slice_margin,
                    generator=gen,
                )
        if not self._checked:
            try:
                self._check(self._resolve_module(pl_module))
            except UnsupportedModelError:
                raise
            except Exception as e:
                self._fail("the model cannot be partitioned (check input_shape/module)", e)
                return
        self._active = True
        if not self._is_zero:
            return
        from splinecam_lightning.sinks import make_sinks

        self._sinks = make_sinks(trainer.loggers)
        self._last_seen_step = trainer.global_step
        self._last_snapshot_time = time.monotonic()
        self._set_aside_stale_frames()
        self._started = True
        self._snapshot(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not (self._active and self._is_zero) or trainer.sanity_checking:
            return
        self._drain()
        step = trainer.global_step
        if step == self._last_seen_step:
            return  # no optimizer step since the last check (gradient accumulation)
        self._last_seen_step = step
        if self.every_n_train_steps is not None:
            due = step % self.every_n_train_steps == 0
        elif self.train_time_interval is not None:
            due = time.monotonic() - self._last_snapshot_time >= self.train_time_interval
        else:
            due = False
        if due:
            self._snapshot(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self._active and self._is_zero) or self.every_n_epochs is None:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._snapshot(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self._active and self._is_zero):
            return
        self._snapshot(trainer, pl_module)
        self._finish(trainer, raise_errors=True)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Save what exists: flush frames, then make videos and the plot from the frames written so far."""
        if not self._is_zero:
            return
        try:
            self._finish(trainer, raise_errors=False)
        except Exception as e:  # never mask the original exception
            self._warn(f"SplineCam: could not finish after {type(exception).__name__}: {type(e).__name__}: {e}")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        try:
            self._worker.flush()
            self._drain(raise_errors=False)
            errors, self._pending_errors = self._pending_errors, []
            for what, e in errors:
                self._warn(f"SplineCam: {what}: {type(e).__name__}: {e}")
        finally:
            self._worker.close()
            self._active = False

    # ------------------------------------------------------------------ snapshot
    def _snapshot(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Take the snapshot of ``trainer.global_step`` (at most once per step).

        On the training thread: wait for the previous snapshot's job, log its results, then copy and trace the
        module (:func:`~splinecam_lightning.engine.prepare_model`, a private float64 eval-mode copy) inside
        ``torch.no_grad()`` and an RNG guard. The exact partitions, statistics and frames are computed by the
        worker from that copy (see ``background``), so training does not wait for them.
        """
        from splinecam_lightning.engine import prepare_model

        step = int(trainer.global_step)
        if step in self._done_steps or not self._slices:
            return
        self._done_steps.add(step)
        t0 = time.perf_counter()
        self._worker.flush()  # never trace while the worker runs modules
        self._drain()
        try:
            with preserve_rng(), torch.no_grad():
                prep = prepare_model(
                    self._resolve_module(pl_module),
                    input_shape=self._effective_input_shape(),
                    device=self.compute_device,
                )
        except Exception as e:
            self._pending_errors.append((f"snapshot at step {step} failed", e))
            self._drain()
            return
        job = _SnapshotJob(step, int(trainer.current_epoch), prep, list(self._slices), time.perf_counter() - t0)
        if self.background:
            self._worker.submit(job)
            if self.on_error == "raise":  # a failure must stop training at this step, so wait for the result
                self._worker.flush()
                self._drain()
        else:
            self._worker.run_inline(job)
            self._drain()
        self._last_snapshot_time = time.monotonic()

    def _run_job(self, job: _SnapshotJob) -> _SnapshotResult:
        """Compute partitions and statistics, then draw frames (worker thread or inline); never raises."""
        from splinecam_lightning.engine import compute_partition
        from splinecam_lightning.render import save_frame

        res = _SnapshotResult(job.step, job.epoch, job.waited)
        parts: dict[str, Any] = {}
        with torch.no_grad():
            for s in job.slices:
                ts = time.perf_counter()
                try:
                    # The prepared model carries the input shape.
                    part = compute_partition(job.model, s, max_regions=self.max_regions)
                    stats = {k: float(v) for k, v in part.stats().items()}
                except Exception as e:
                    res.errors.append((f"snapshot of slice '{s.name}' at step {job.step} failed", e))
                    continue
                parts[s.name] = part
                res.per_slice[s.name] = dict(stats, seconds=time.perf_counter() - ts)
        job.model = None  # free the copy before drawing
        if parts and self._color_range is None and self.color_by == "slope":
            # Jobs run one at a time in step order, so the first snapshot's scale is fixed before any other.
            self._color_range = self._default_color_range(parts)
        if self.write_frames:
            for name, part in parts.items():
                stats = res.per_slice[name]
                title = (
                    f"{name} | step {job.step} | {int(stats.get('num_regions', part.num_regions))} regions | "
                    f"boundary {stats.get('boundary_length', float('nan')):.3g}"
                )
                kwargs: dict[str, Any] = {"color_by": self.color_by, "size_px": self.frame_size, "title": title}
                if self.color_by == "slope":
                    kwargs["color_range"] = self._color_range
                    kwargs["color_scale"] = self.color_scale
                path = self.dirpath / name / f"{job.step:08d}.png"
                try:
                    save_frame(part, path, **kwargs)
                except Exception as e:
                    res.errors.append((f"frame of slice '{name}' at step {job.step} failed", e))
                    continue
                res.frames[name] = path
        return res

    def _default_color_range(self, parts: dict[str, Any]) -> tuple[float, float]:
        norms = torch.cat([p.slope_norms for p in parts.values() if p.num_regions])
        norms = norms[torch.isfinite(norms)]
        vmax = float(norms.max()) if norms.numel() else 0.0
        if self.color_scale == "log":
            # Slopes grow by orders of magnitude early in training: leave room (default 1000x) above.
            pos = norms[norms > 0]
            vmin = float(pos.min()) if pos.numel() else 1e-6
            vmax = vmax if vmax > 0 else 1.0
            return (vmin / 3.0, vmax * self.color_headroom)
        return (0.0, self.color_headroom * vmax if vmax > 0 and math.isfinite(vmax) else 1.0)

    def _drain(self, raise_errors: bool = True) -> None:
        """Log finished snapshots (main thread only), then report pending errors."""
        for res in self._worker.pop_done():
            self._pending_errors.extend(res.errors)
            if res.per_slice:
                seconds = res.waited + sum(v.get("seconds", 0.0) for v in res.per_slice.values())
                record = {
                    "step": res.step,
                    "epoch": res.epoch,
                    "seconds": seconds,
                    "waited": res.waited,
                    "slices": res.per_slice,
                }
                self._history.append(record)
                self._log_scalars(record)
                self._write_stats_csv()
            if not res.frames:
                continue
            self._frames_written += 1
            if self.log_frames:
                frames = {f"splinecam/frame/{n}": p for n, p in res.frames.items()}
                for sink in self._sinks:
                    try:
                        sink.log_frames(frames, step=res.step)
                    except Exception as e:
                        self._pending_errors.append((f"logging frames to {type(sink.logger).__name__} failed", e))
        if raise_errors:
            errors, self._pending_errors = self._pending_errors, []
            for what, e in errors:
                self._fail(what, e)

    def _metrics(self, record: dict[str, Any]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        per_slice = record["slices"]
        keys: list[str] = []
        for name, stats in per_slice.items():
            for k, v in stats.items():
                metrics[f"splinecam/{name}/{k}"] = float(v)
                if k != "seconds" and k not in keys:
                    keys.append(k)
        for k in keys:
            vals = [float(s[k]) for s in per_slice.values() if k in s]
            metrics[f"splinecam/mean/{k}"] = sum(vals) / len(vals)
        metrics["splinecam/snapshot_seconds"] = float(record["seconds"])
        metrics["splinecam/snapshot_wait_seconds"] = float(record.get("waited", record["seconds"]))
        return metrics

    def _log_scalars(self, record: dict[str, Any]) -> None:
        metrics = self._metrics(record)
        for sink in self._sinks:
            try:
                sink.log_scalars(metrics, step=record["step"])
            except Exception as e:
                self._fail(f"logging scalars to {type(sink.logger).__name__} failed", e)

    # ------------------------------------------------------------------ files
    def _write_stats_csv(self) -> None:
        if not self._history:
            return
        cols: list[str] = []
        rows = []
        for rec in self._history:
            for name, stats in rec["slices"].items():
                for k in stats:
                    if k not in cols:
                        cols.append(k)
                rows.append((rec["step"], rec["epoch"], name, stats))
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step", "epoch", "slice", *cols])
        for step, epoch, name, stats in rows:
            w.writerow([step, epoch, name, *[stats.get(c, "") for c in cols]])
        path = self.dirpath / "stats.csv"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(buf.getvalue())
            os.replace(tmp, path)
        except OSError as e:
            self._warn(f"SplineCam: could not write {path}: {e}")

    def _set_aside_stale_frames(self) -> None:
        """Move frames that are not part of this run's history out of the video folders (never delete)."""
        if not self._slices:
            return
        keep = self._done_steps
        moved = 0
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        for s in self._slices:
            folder = self.dirpath / s.name
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                m = _FRAME_RE.match(p.name)
                if m is None or int(m.group(1)) in keep:
                    continue
                dest = folder / "_superseded" / stamp / p.name
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(p, dest)
                    moved += 1
                except OSError as e:
                    self._warn(f"SplineCam: could not move stale frame {p}: {e}")
        if moved:
            self._warn(
                f"SplineCam: moved {moved} frame(s) that are not part of this run's history to "
                f"'<slice>/_superseded/{stamp}/' under {self.dirpath}"
            )

    def _plot_history(self) -> list[dict[str, Any]]:
        out = []
        for rec in self._history:
            row: dict[str, Any] = {"step": rec["step"]}
            per = rec["slices"]
            for k in _MAIN_STATS:
                vals = [s[k] for s in per.values() if k in s]
                if vals:
                    row[f"mean/{k}"] = sum(vals) / len(vals)
            row["snapshot_seconds"] = rec["seconds"]
            for name, s in per.items():
                if "num_regions" in s:
                    row[f"{name}/num_regions"] = s["num_regions"]
            out.append(row)
        return out

    def _finish(self, trainer: Trainer, raise_errors: bool) -> None:
        """Flush frames, then write videos and the statistics plot and hand them to the loggers."""
        if self._finished or not self._started:
            return  # nothing of this fit to save (e.g. it failed before training started)
        self._finished = True
        errors: list[tuple[str, BaseException]] = []

        def fail(what: str, e: BaseException) -> None:
            errors.append((what, e))

        self._worker.flush()
        self._drain(raise_errors=False)
        errors.extend(self._pending_errors)
        self._pending_errors = []
        self._write_stats_csv()
        step = int(trainer.global_step)
        videos: dict[str, Path] = {}
        plot: Path | None = None
        if self.make_videos and self._slices:
            from splinecam_lightning.video import make_video, plot_stats

            for s in self._slices:
                folder = self.dirpath / s.name
                if not (folder.is_dir() and any(_FRAME_RE.match(p.name) for p in folder.iterdir())):
                    continue
                try:
                    videos[s.name] = make_video(folder, self.dirpath / f"{s.name}.mp4", fps=self.fps, pattern="*.png")
                except Exception as e:
                    fail(f"video of slice '{s.name}' failed", e)
            if self._history:
                try:
                    plot = plot_stats(self._plot_history(), self.dirpath / "stats.png")
                except Exception as e:
                    fail("statistics plot failed", e)
        for sink in self._sinks:
            try:
                if videos:
                    sink.log_videos({f"splinecam/video/{k}": v for k, v in videos.items()}, step=step)
                if plot is not None:
                    sink.log_plot("splinecam/stats_plot", plot, step=step)
                if self._history:
                    cols, rows = self._table()
                    sink.log_table("splinecam/stats_table", cols, rows, step=step)
                sink.flush()
            except Exception as e:
                fail(f"logging videos/table to {type(sink.logger).__name__} failed", e)
        # Errors are reported last, so that the videos exist even when one of them stops training.
        for what, e in errors:
            if raise_errors:
                self._fail(what, e)
            else:
                self._warn(f"SplineCam: {what}: {type(e).__name__}: {e}")

    def _table(self) -> tuple[list[str], list[list[Any]]]:
        stat_cols: list[str] = []
        for rec in self._history:
            for stats in rec["slices"].values():
                for k in stats:
                    if k not in stat_cols:
                        stat_cols.append(k)
        rows = [
            [rec["step"], name, *[stats.get(c) for c in stat_cols]]
            for rec in self._history
            for name, stats in rec["slices"].items()
        ]
        return ["step", "slice", *stat_cols], rows

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Slices, statistics history, colour range and frame counter (plain Python values and tensors).

        Waits for snapshots still running on the worker, so a checkpoint holds every snapshot taken before it.
        """
        self._worker.flush()
        self._drain(raise_errors=False)
        return {
            "version": _STATE_VERSION,
            "slices": None if self._slices is None else [s.state_dict() for s in self._slices],
            "history": [{**rec, "slices": {n: dict(s) for n, s in rec["slices"].items()}} for rec in self._history],
            "done_steps": sorted(self._done_steps),
            "color_range": None if self._color_range is None else list(self._color_range),
            "frames_written": self._frames_written,
            "input_shape": None if self._shape_from_data is None else list(self._shape_from_data),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the restored slices replace the constructor's."""
        if state_dict.get("slices") is not None:
            self._slices = [Slice.from_state_dict(dict(s)) for s in state_dict["slices"]]
        self._history = [
            {**rec, "slices": {n: dict(s) for n, s in rec["slices"].items()}} for rec in state_dict.get("history", [])
        ]
        self._done_steps = {int(s) for s in state_dict.get("done_steps", [r["step"] for r in self._history])}
        cr = state_dict.get("color_range")
        if cr is not None:
            self._color_range = (float(cr[0]), float(cr[1]))
        self._frames_written = int(state_dict.get("frames_written", 0))
        shape = state_dict.get("input_shape")
        if shape is not None:
            self._shape_from_data = tuple(int(s) for s in shape)
