"""Lightning callback that snapshots the exact linear-region partition of a network while it trains."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import operator
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from splinecam_lightning._files import atomic_path
from splinecam_lightning.archive import ColorRangeTracker
from splinecam_lightning.errors import OutputChoiceError, SplineCamWarning, UnsupportedModelError
from splinecam_lightning.outputs import RunOutputs
from splinecam_lightning.render import check_frame_size
from splinecam_lightning.scheduling import BACKLOG_POLICIES, OverheadBudget, SnapshotSchedule
from splinecam_lightning.slice_selection import choose_slices, collect_samples, preserve_rng, reads_by_index
from splinecam_lightning.slices import Slice
from splinecam_lightning.worker import SnapshotResult, SnapshotSettings, SnapshotWorker, WeightLayout, save_weights

__all__ = ["SplineCamCallback", "SplineCamWarning"]

_STATE_VERSION = 2
_COLOR_BY = ("slope", "random", "class")


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

    **What the training thread does.** At fit start the network is copied (float64, eval mode: BatchNorm uses
    running statistics, Dropout is off) and traced **once** with ``torch.fx`` (the graph does not change while
    training). At each snapshot the training thread only copies the parameters and buffers into a preallocated
    shared-memory slot: a few milliseconds, no tracing, no pickling. A worker process (a fresh interpreter, so it
    is CUDA-safe and never re-runs your script) loads them into its traced copy, computes the exact partitions
    (:func:`~splinecam_lightning.engine.compute_partition`), their statistics and the frames, writes the frames,
    and sends the statistics back; the training process logs each result when it arrives, at the step it was
    taken. The training module, its gradients, modes, the optimizer and every RNG state are never touched.

    **Threads and priority.** The worker uses ``worker_threads`` torch threads (default 1) and runs under
    ``SCHED_IDLE`` on Linux (niceness 19 elsewhere): it only gets CPU time that training leaves idle, and with one
    thread its OpenMP pool never waits on a preempted sibling. Training keeps its own thread count. On a machine
    whose cores training saturates, the worker falls behind instead of slowing training; see ``on_backlog``.

    **Backlog.** At most ``max_queue`` snapshots (and ``max_queue_bytes`` of weights) are queued or running. A
    snapshot due while all are taken follows ``on_backlog``:

    * ``"defer"`` (default): its weights are written to ``<dirpath>/snapshots/<step>.pt`` and it is computed at the
      end of fit;
    * ``"wait"``: training waits for a free slot;
    * ``"skip"``: it is dropped.

    Skipped and deferred steps are logged (``splinecam/skipped_snapshots``, ``splinecam/deferred_snapshots``) and
    listed (:attr:`skipped_steps`, :attr:`deferred_steps`). At the end of fit (and on an exception) the callback
    finishes the queued and deferred snapshots while the time it has cost the training thread stays within
    ``max_overhead`` of the training time (``None``, or ``on_backlog="wait"``: finish everything). What is left is
    saved to ``<dirpath>/snapshots/`` with ``pending.json``; ``splinecam-lightning replay DIR`` computes it later
    and remakes the statistics and videos. Nothing is lost; a warning says what is pending. When nothing is pending, the
    videos and the statistics plot are always made at the end of fit.

    **When.** A snapshot is taken at the start of training (step 0, or the resumed step), on the schedule, and at
    the end of fit; never during the sanity check, and at most once per ``trainer.global_step``. The schedule is
    one of ``every_n_train_steps``, ``every_n_epochs``, ``train_time_interval``, ``at_steps`` or ``log_spaced``;
    with none of them, ``every_n_train_steps=100``.

    **Which slices.** ``slices`` if given; otherwise chosen at the start of training from the training data:
    ``num_slices`` planes through three samples of different classes and ``num_local_slices`` random squares
    around a sample, drawn with a private ``torch.Generator`` seeded with ``seed``. Slices are saved in the
    callback's checkpoint state, so a resumed run continues the same slices and frames.

    **Files** (under ``dirpath``): ``<slice>/<step:08d>.png`` frames (written by the worker as made),
    ``<slice>.mp4`` videos, ``stats.csv``, ``stats.png``, and ``snapshots/`` for deferred work. Frames that do not
    belong to this run's history are moved to ``<slice>/_superseded/``, never deleted.

    **Logged keys** (``logger.log_metrics(..., step=<snapshot step>)`` on every logger, global rank zero):
    ``splinecam/<slice>/<stat>`` for each statistic of :meth:`Partition.stats` and ``splinecam/<slice>/seconds``;
    ``splinecam/mean/<stat>``; ``splinecam/snapshot_wait_seconds`` (the training thread's real time for the
    snapshot: the weight copy plus any wait), ``splinecam/worker_seconds`` (the worker's time for it),
    ``splinecam/snapshot_seconds`` (both), ``splinecam/backlog`` (snapshots queued or running when it was taken)
    and ``splinecam/overhead_seconds`` (training-thread seconds the callback has cost so far, including waits at
    checkpoints). W&B also gets frames, a table, the stats plot and the videos; TensorBoard scalars and images.

    **Failures.** An unsupported model raises :class:`~splinecam_lightning.errors.UnsupportedModelError` at fit
    start whatever ``on_error`` says. A snapshot that fails later warns (:class:`SplineCamWarning`) and training
    continues; with ``on_error="raise"`` the exception stops training at the failing snapshot's step (each
    snapshot is then waited for).

    **Distributed.** Under DDP the slices are spread over the ranks: each rank's worker computes its share on its
    own device. Results are gathered to global rank zero, which logs and writes them; every rank calls the gather
    at the same steps (each snapshot step and the end of fit), and nothing else is collective except, for
    ``train_time_interval``, a broadcast of rank zero's decision after each step.

    Args:
        slices: Slices to watch; ``None`` chooses them from the training data.
        every_n_train_steps: Snapshot when ``trainer.global_step`` is a multiple of this.
        every_n_epochs: Snapshot at the end of every ``n``-th training epoch.
        train_time_interval: Snapshot when at least this much time (``timedelta`` or seconds) has passed.
        at_steps: Snapshot at exactly these global steps.
        log_spaced: Snapshot at about this many steps (``True``: 30) evenly spaced on a log axis up to the last
            step of the run (needs ``max_steps`` or ``max_epochs``).
        dirpath: Folder for frames, videos, statistics and deferred snapshots.
        module: The network to analyse: ``None`` for the LightningModule itself, an attribute path (``"net"``), a
            callable ``f(pl_module) -> nn.Module``, or an ``nn.Module``.
        input_shape: Per-sample input shape (e.g. ``(3, 16, 16)``); inferred from the data when slices come from it.
        output: For a network whose forward returns a tuple, list or dict (``return logits, features``): the
            index or key of the value to partition (only what it depends on is computed).
        num_slices: Number of three-sample slices chosen from the data.
        num_local_slices: Number of local squares chosen from the data.
        local_radius: Half-width of local slices; default 10% of the data's root-mean-square spread.
        slice_margin: Margin of three-sample slices (see :meth:`Slice.through_points`); the default 0.05 keeps
            the plane close to its three samples, which also keeps default snapshots cheap.
        pool_size: Number of training samples the slices are chosen from.
        seed: Seed of the callback's private generator.
        compute_device: Device of the exact computation; default the module's device.
        max_regions: A slice with more regions than this fails (see ``on_error``) instead of using all memory.
        class_pieces: Also count the connected pieces of each class's decision region (``decision_pieces``,
            ``pieces_class_<c>``); off by default because it can cost more than the partition itself.
        color_by: ``"slope"`` (norm of the region's slope), ``"random"`` or ``"class"``.
        color_range: ``(vmin, vmax)`` of the slope colour scale, fixed for the run. Default: frames drawn during
            training use the best scale known at the time (robust area-weighted percentiles of the snapshots so
            far, only ever widened: :class:`~splinecam_lightning.archive.ColorRangeTracker`), and the end-of-fit
            videos are redrawn from the partition archive with one scale fitted to the whole run, so they never
            saturate.
        color_scale: ``"log"`` (default) or ``"linear"``.
        save_partitions: Archive each snapshot's partition (``<slice>/partitions/<step>.npz``, compressed) for
            the end-of-fit videos and ``splinecam-lightning render``.
        frame_size: The frame's longer side in pixels, a multiple of 16 (the other side follows the slice's aspect).
        fps: Frames per second of the videos.
        write_frames: Write PNG frames (needed for videos and image logging).
        log_frames: Send frames to image-capable loggers.
        make_videos: Make the videos and the statistics plot at the end of fit and on exception.
        background: Compute in the worker process. ``False`` computes on the training thread (slow; for
            debugging and tests).
        max_queue: Snapshots that may be queued or running in the worker at once.
        max_queue_bytes: Bound on the weight slots' memory; lowers ``max_queue`` for big models (at least one).
        on_backlog: ``"defer"``, ``"wait"`` or ``"skip"`` (see **Backlog**).
        max_overhead: Fraction of training time the callback may cost the training thread in all (setup, weight
            copies, waits and the end of fit); ``None`` finishes every snapshot, video and plot before ``fit``
            returns. Wall-clock overhead also includes the worker's contention for caches and memory bandwidth (a
            few percent in ``benchmarks/bench_callback_overhead.py``).
        worker_threads: torch threads of the worker process (default 1).
        local: Also track exact local complexity (:class:`~splinecam_lightning.local.LocalConfig`): at each
            snapshot, the partitions of squares of ``radius`` around ``count`` training and/or validation points
            (drawn once at fit start with the callback's generator, or ``points``), in one batched engine pass per
            split, logged as ``splinecam/local/<split>/<stat>`` (mean across points; ``_median`` and ``_std``
            beside it) and plotted against a log step axis in ``stats.png``. Pair it with ``log_spaced``.
        on_error: ``"warn"`` or ``"raise"``.

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
        at_steps: Sequence[int] | None = None,
        log_spaced: int | bool | None = None,
        dirpath: str | os.PathLike[str] = "splinecam",
        module: str | nn.Module | Callable[[LightningModule], nn.Module] | None = None,
        input_shape: Sequence[int] | None = None,
        output: int | str | None = None,
        num_slices: int = 2,
        num_local_slices: int = 1,
        local_radius: float | None = None,
        slice_margin: float = 0.05,
        pool_size: int = 256,
        seed: int = 0,
        compute_device: str | torch.device | None = None,
        max_regions: int = 200_000,
        class_pieces: bool = False,
        color_by: Literal["slope", "random", "class"] = "slope",
        color_range: tuple[float, float] | None = None,
        color_scale: Literal["log", "linear"] = "log",
        save_partitions: bool = True,
        frame_size: int = 512,
        fps: float = 8,
        write_frames: bool = True,
        log_frames: bool = True,
        make_videos: bool = True,
        background: bool = True,
        max_queue: int = 4,
        max_queue_bytes: int = 1 << 30,
        on_backlog: Literal["defer", "wait", "skip"] = "defer",
        max_overhead: float | None = 0.05,
        worker_threads: int = 1,
        local: Any = None,
        on_error: Literal["warn", "raise"] = "warn",
    ) -> None:
        self.schedule = SnapshotSchedule(every_n_train_steps, every_n_epochs, train_time_interval, at_steps, log_spaced)
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if on_backlog not in BACKLOG_POLICIES:
            raise ValueError(f"on_backlog must be one of {BACKLOG_POLICIES}, got {on_backlog!r}")
        if color_by not in _COLOR_BY:
            raise ValueError(f"color_by must be 'slope', 'random' or 'class', got {color_by!r}")
        if color_scale not in ("log", "linear"):
            raise ValueError(f"color_scale must be 'log' or 'linear', got {color_scale!r}")
        check_frame_size(frame_size, "frame_size")
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
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be a positive int, got {max_queue!r}")
        if not isinstance(worker_threads, int) or worker_threads < 1:
            raise ValueError(f"worker_threads must be a positive int, got {worker_threads!r}")
        if not isinstance(max_regions, int) or max_regions < 1:
            raise ValueError(f"max_regions must be a positive int, got {max_regions!r}")
        if local_radius is not None and not local_radius > 0:
            raise ValueError(f"local_radius must be positive (or None: chosen from the data), got {local_radius!r}")
        if not slice_margin >= 0:
            raise ValueError(f"slice_margin must be >= 0, got {slice_margin!r}")
        if not isinstance(pool_size, int) or pool_size < 3:
            raise ValueError(f"pool_size must be an int >= 3 (a plane needs three samples), got {pool_size!r}")
        if compute_device is not None and torch.device(compute_device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"compute_device={compute_device!r}, but CUDA is not available here")
        if input_shape is not None and slices is not None:
            for s in slices:
                if isinstance(s, Slice) and math.prod(input_shape) != s.input_dim:
                    raise ValueError(
                        f"input_shape={tuple(input_shape)} has {math.prod(input_shape)} values per sample, but slice "
                        f"'{s.name}' lies in a space of {s.input_dim} dimensions"
                    )
        self._budget = OverheadBudget(max_overhead)  # validates max_overhead

        self.dirpath = Path(dirpath)
        self.module = module
        self.input_shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
        from splinecam_lightning.tracing import check_output_choice

        check_output_choice(output)
        self.output = output
        self.num_slices = int(num_slices)
        self.num_local_slices = int(num_local_slices)
        self.local_radius = local_radius
        self.slice_margin = float(slice_margin)
        self.pool_size = int(pool_size)
        self.seed = int(seed)
        self.compute_device = compute_device
        self.max_regions = int(max_regions)
        self.class_pieces = bool(class_pieces)
        self.color_by = color_by
        self.color_scale = color_scale
        self.save_partitions = bool(save_partitions)
        self.frame_size = frame_size
        self.fps = fps
        self.write_frames = bool(write_frames)
        self.log_frames = bool(log_frames)
        self.make_videos = bool(make_videos)
        self.background = bool(background)
        self.max_queue = max_queue
        self.max_queue_bytes = int(max_queue_bytes)
        self.on_backlog = on_backlog
        self.max_overhead = max_overhead
        self.worker_threads = worker_threads
        if local is not None:
            from splinecam_lightning.local import LocalConfig

            if not isinstance(local, LocalConfig):
                raise TypeError(f"local must be a LocalConfig, got {type(local).__name__}")
        self.local = local
        self._local_points: dict[str, torch.Tensor] | None = None
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
        self._fixed_color_range = color_range is not None
        self._history: list[dict[str, Any]] = []
        self._done_steps: set[int] = set()
        self._skipped: list[int] = []
        self._deferred: dict[int, int] = {}  # step -> epoch, weights in <dirpath>/snapshots/
        self._pending_out: list[int] = []  # steps left for `replay` at the end of the last fit
        self._deferred_done: set[int] = set()  # deferred steps computed at the end of this fit
        self._fit_start_seconds = 0.0
        self._shape_from_data: tuple[int, ...] | None = None
        self._colors = ColorRangeTracker(color_scale)  # the scale of frames drawn on this thread (inline mode)

        self._outputs: RunOutputs | None = None
        self._worker: SnapshotWorker | None = None
        self._prepared: Any = None
        self._layout: WeightLayout | None = None
        self._settings: SnapshotSettings | None = None
        self._step_info: dict[int, dict[str, float]] = {}  # step -> training-thread figures of that snapshot
        self._partial: dict[int, list[SnapshotResult]] = {}  # step -> results gathered from ranks so far
        self._outbox: list[SnapshotResult] = []  # results of this rank not yet gathered to rank zero
        self._pending_errors: list[tuple[str, BaseException]] = []
        self._checked = False
        self._active = False
        self._is_zero = True
        self._rank, self._world = 0, 1
        self._last_seen_step: int | None = None
        self._started = False
        self._finished = False
        self._worker_lost: str | None = None  # why the worker process stopped during this fit
        self._restored = False  # load_state_dict ran since the last fit
        self._await_batch = False  # set-up waits for the first training batch (iterable loaders)
        self._checkpointed: set[int] = set()  # deferred steps a checkpoint listed: their weight files stay

    # ------------------------------------------------------------------ public views
    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=str(self.dirpath))

    @property
    def every_n_train_steps(self) -> int | None:
        return self.schedule.every_n_train_steps

    @property
    def slices(self) -> list[Slice] | None:
        """The watched slices (``None`` until they are chosen from the data)."""
        return None if self._slices is None else list(self._slices)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per computed snapshot, in step order (see :class:`~splinecam_lightning.outputs.RunOutputs`)."""
        return list(self._history)

    @property
    def snapshot_steps(self) -> list[int]:
        """Global steps of the computed snapshots, in order."""
        return [int(h["step"]) for h in self._history]

    @property
    def skipped_steps(self) -> list[int]:
        """Steps whose snapshot was dropped because the worker was behind (``on_backlog="skip"``)."""
        return list(self._skipped)

    @property
    def deferred_steps(self) -> list[int]:
        """Steps whose snapshot was deferred to the end of fit (``on_backlog="defer"``), in order."""
        return sorted(set(self._deferred) | set(self._pending_out) | self._deferred_done)

    @property
    def pending_steps(self) -> list[int]:
        """Steps saved under ``<dirpath>/snapshots/`` for ``splinecam-lightning replay`` by the last fit."""
        return list(self._pending_out)

    @property
    def overhead_seconds(self) -> float:
        """Seconds the callback held the training thread during the last fit."""
        return self._budget.spent

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

    def _needs_samples(self) -> bool:
        """Whether set-up reads training samples: to choose the slices, or to learn the input shape."""
        return self._slices is None or (self.input_shape is None and self._shape_from_data is None)

    def _finishes_everything(self) -> bool:
        """``max_overhead=None`` or ``on_backlog="wait"``: every snapshot is waited for, whatever it costs."""
        return self.max_overhead is None or self.on_backlog == "wait"

    def _room(self, t0: float, unlimited: bool) -> float:
        """Seconds a wait that began at ``t0`` may still take within the ``max_overhead`` budget."""
        return math.inf if unlimited else self._budget.remaining() - (time.perf_counter() - t0)

    def _effective_input_shape(self) -> tuple[int, ...] | None:
        """Given, else seen in the data, else flat inputs of the slices' dimension (probed at fit start)."""
        if self.input_shape is not None:
            return self.input_shape
        if self._shape_from_data is not None:
            return self._shape_from_data
        return (self._slices[0].input_dim,) if self._slices else None

    def _prepare(self, module: nn.Module) -> Any:
        """Copy and trace the module (the only trace of the fit); hints at ``module=`` for a LightningModule."""
        from splinecam_lightning.engine import prepare_model

        try:
            with preserve_rng(), torch.no_grad():
                return prepare_model(
                    module, input_shape=self._effective_input_shape(), device=self.compute_device, output=self.output
                )
        except Exception as e:
            if isinstance(self.module, str) and isinstance(e, UnsupportedModelError) and " at '" in str(e):
                # Module paths in the message are relative to the analysed module: make them the user's.
                raise type(e)(str(e).replace(" at '", f" at '{self.module}.")) from e
            chose = isinstance(e, OutputChoiceError) and self.output is not None  # about the choice, not the module
            if self.module is None and isinstance(module, LightningModule) and not chose:
                hint = (
                    " (SplineCamCallback analyses the whole LightningModule, calling its forward with one input "
                    "tensor; if the network is a submodule, pass module='net' or the attribute path of it)"
                )
                try:
                    better = type(e)(f"{e}{hint}")
                except Exception:
                    raise e from None
                raise better from e
            raise

    def _choose_local_points(self, trainer: Trainer, train_batches: Any = None) -> dict[str, torch.Tensor]:
        """Each split's points for local complexity: given, or drawn once from its data with a private generator
        (for the training split, from ``train_batches`` where the loader is not read by index)."""
        cfg = self.local
        given = cfg.points
        out: dict[str, torch.Tensor] = {}
        for i, split in enumerate(cfg.splits):
            pts = given.get(split) if isinstance(given, dict) else given
            if pts is None:
                gen = torch.Generator().manual_seed(self.seed + 1 + i)
                try:
                    with preserve_rng():
                        if split == "train":
                            source = trainer.train_dataloader if train_batches is None else train_batches
                        else:
                            if trainer.val_dataloaders is None:
                                trainer.fit_loop.epoch_loop.val_loop.setup_data()
                            source = trainer.val_dataloaders
                        if source is None:
                            raise ValueError(f"there is no {split} dataloader")
                        pts, _, _ = collect_samples(source, pool_size=cfg.count, generator=gen)
                except Exception as e:
                    self._warn(f"SplineCam: no {split} points for local complexity ({e}); that split is skipped")
                    continue
            out[split] = torch.as_tensor(pts, dtype=torch.float64).reshape(len(pts), -1)[: cfg.count].cpu()
        return out

    def _owned_slices(self) -> list[Slice]:
        return [s for i, s in enumerate(self._slices or []) if i % self._world == self._rank]

    def _owner_ranks(self) -> int:
        return max(1, min(self._world, len(self._slices or [])))

    def _distributed(self) -> bool:
        if self._world <= 1:
            return False
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._await_batch = False
            self._finished = False
            self._active = False
            self._started = False
            self._is_zero = bool(trainer.is_global_zero)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validate the module on every rank, so an unsupported model fails before any work."""
        t0 = time.perf_counter()
        self._is_zero = bool(trainer.is_global_zero)
        self._rank, self._world = int(trainer.global_rank), int(trainer.world_size)
        self._checked = False
        module = self._resolve_module(pl_module)  # a wrong `module` argument fails here
        try:
            self._prepared = self._prepare(module)
            self._checked = self._effective_input_shape() is not None or self._slices is not None
        except UnsupportedModelError:
            raise
        except Exception:
            self._prepared = None  # most likely the input shape is unknown yet; checked once the data is seen
        self._fit_start_seconds = time.perf_counter() - t0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Choose slices if needed (every rank alike), trace once, start the worker and take the first snapshot.

        All of it runs on the training thread and counts in ``splinecam/overhead_seconds``. Under
        ``fast_dev_run`` (a smoke test: Lightning suppresses logging and checkpointing) the model was checked at
        fit start and nothing more is done, so an earlier run's outputs in ``dirpath`` stay as they are.
        """
        if trainer.fast_dev_run:
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info("SplineCam: fast_dev_run: the model was checked; no snapshots are taken")
            return
        needs_data = self._needs_samples() or (self.local is not None and self._local_points is None)
        if needs_data and trainer.train_dataloader is not None and not reads_by_index(trainer.train_dataloader):
            # An iterable loader is never read here (that would consume or advance what training sees): the
            # first batch training draws from it is used instead, before its optimizer step.
            self._await_batch = True
            return
        self._begin(trainer, pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._await_batch:
            self._await_batch = False
            self._begin(trainer, pl_module, batch)

    def _begin(self, trainer: Trainer, pl_module: LightningModule, batch: Any = None) -> None:
        """Set-up and the first snapshot, with samples from the training loader or, given, from ``batch``."""
        t_setup = time.perf_counter()
        from_batch = batch is not None
        source = iter([batch]) if from_batch else trainer.train_dataloader
        self._start_new_history_if_restarted(int(trainer.global_step))
        if self._needs_samples():
            gen = torch.Generator().manual_seed(self.seed)
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
                if shape != self._shape_from_data:
                    self._checked = False
                self._shape_from_data = shape
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
            if from_batch and self._world > 1:  # each rank saw its own batch: rank zero's choice for all
                self._slices, self._shape_from_data = trainer.strategy.broadcast(
                    (self._slices, self._shape_from_data), src=0
                )
        if self.local is not None and self._local_points is None:
            self._local_points = self._choose_local_points(trainer, iter([batch]) if from_batch else None)
        module = self._resolve_module(pl_module)
        if not self._checked or self._prepared is None or self._prepared.input_shape != self._effective_input_shape():
            try:
                self._prepared = self._prepare(module)
            except UnsupportedModelError:
                raise
            except Exception as e:
                self._fail("the model cannot be partitioned (check input_shape/module)", e)
                return
        self._checked = True
        self._active = True
        self._settings = SnapshotSettings(
            slices=self._owned_slices(),
            dirpath=str(self.dirpath),
            max_regions=self.max_regions,
            pieces=self.class_pieces,
            write_frames=self.write_frames,
            color_by=self.color_by,
            color_scale=self.color_scale,
            save_partitions=self.save_partitions,
            color_range=self._color_range,
            fixed_color_range=self._fixed_color_range,
            frame_size=self.frame_size,
            local=None
            if not self._local_points or self._rank != 0
            else {
                "points": self._local_points,
                "radius": float(self.local.radius),
                "sampled": bool(self.local.sampled),
                "seed": self.seed,
            },
        )
        self._layout = WeightLayout(module, self._prepared.graph_module)
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if max_steps is None and self.schedule.log_spaced is not None:
            max_steps = trainer.estimated_stepping_batches
        self.schedule.start(max_steps)
        outputs_sinks: list[Any] = []
        if self._is_zero:
            from splinecam_lightning.sinks import make_sinks

            outputs_sinks = make_sinks(trainer.loggers)
        self._outputs = RunOutputs(self.dirpath, outputs_sinks, self._fail)
        self._outputs.history = self._history
        if self._is_zero:
            keep = self._done_steps | set(self._deferred)
            moved = self._outputs.set_aside_stale_frames([s.name for s in self._slices], keep)
            if moved:
                self._warn(
                    f"SplineCam: moved {moved} frame(s) that are not part of this run's history to "
                    f"'<slice>/_superseded/' under {self.dirpath}"
                )
            moved = self._outputs.set_aside_stale_snapshots(set(self._deferred))
            if moved:
                self._warn(
                    f"SplineCam: moved {moved} file(s) of an earlier fit's deferred snapshots to "
                    f"{self._snapshot_dir() / '_superseded'} (this run's `replay` will not use them)"
                )
        self._pending_out = []
        self._deferred_done = set()
        self._worker_lost = None
        self._checkpointed = set(self._deferred)  # a resumed run's deferred steps are listed in its checkpoint
        self._colors = ColorRangeTracker(self.color_scale)
        if self.background and self._settings.slices:
            slots = max(1, min(self.max_queue, self.max_queue_bytes // max(1, self._layout.nbytes)))
            self._worker = SnapshotWorker(
                self._prepared, self._layout, self._settings, slots=slots, threads=self.worker_threads
            )
            self._worker.start()
            # The worker has its own copy; keep the parent's on the CPU (for deferred files), off the GPU.
            self._prepared = dataclasses.replace(
                self._prepared, graph_module=self._prepared.graph_module.to("cpu"), device=torch.device("cpu")
            )
        self._last_seen_step = trainer.global_step
        self._budget.start()
        self._budget.add(time.perf_counter() - t_setup + self._fit_start_seconds)
        self._started = True
        self._snapshot(trainer, pl_module)

    def _start_new_history_if_restarted(self, step: int) -> None:
        """A second fit whose step count starts below this callback's last snapshot (a new ``Trainer``, not a
        resume from a checkpoint) is a new run: its snapshots would all count as taken already."""
        if self._restored or not self._done_steps or step >= max(self._done_steps):
            return
        self._warn(
            f"SplineCam: this callback already took snapshots up to step {max(self._done_steps)} in an earlier fit "
            f"and training now starts at step {step}: starting a new history (the earlier fit's frames and deferred "
            f"snapshots under {self.dirpath} move to '_superseded/'); use one callback per run to keep both"
        )
        self._history.clear()
        self._done_steps = set()
        self._skipped = []
        self._deferred = {}
        self._step_info = {}
        if not self._fixed_color_range:
            self._color_range = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or trainer.sanity_checking:
            return
        t0 = time.perf_counter()
        self._collect()
        self._budget.add(time.perf_counter() - t0)
        self._raise_pending()
        step = trainer.global_step
        if step == self._last_seen_step:
            return  # no optimizer step since the last check (gradient accumulation)
        self._last_seen_step = step
        due = self.schedule.due_at_step(step)
        if self.schedule.by_time and self._distributed():
            due = bool(trainer.strategy.broadcast(due, src=0))  # wall clocks differ between ranks
        if due:
            self._snapshot(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active and self.schedule.due_at_epoch_end(trainer.current_epoch):
            self._snapshot(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active:
            return
        self._snapshot(trainer, pl_module)
        self._finish(trainer, raise_errors=True, collective=True)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Save what exists: finish or defer the backlog, then make videos and the plot from the frames so far.

        After a ``KeyboardInterrupt`` nothing more is computed, whatever ``max_overhead`` says: the backlog is
        saved for ``replay`` at once (which also makes the videos), so the user is not kept waiting."""
        try:
            interrupted = isinstance(exception, KeyboardInterrupt)
            self._finish(trainer, raise_errors=False, collective=False, interrupted=interrupted)
        except Exception as e:  # never mask the original exception
            self._warn(f"SplineCam: could not finish after {type(exception).__name__}: {type(e).__name__}: {e}")
        finally:
            self._stop_worker()
            self._restored = False

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        try:
            errors, self._pending_errors = self._pending_errors, []
            for what, e in errors:
                self._warn(f"SplineCam: {what}: {type(e).__name__}: {e}")
        finally:
            self._stop_worker()
            self._active = False
            self._restored = False

    # ------------------------------------------------------------------ snapshot
    def _snapshot(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Take the snapshot of ``trainer.global_step`` (at most once per step): copy weights and hand them over."""
        step = int(trainer.global_step)
        if step in self._done_steps or not self._slices:
            return
        self._done_steps.add(step)
        self.schedule.taken()
        epoch = int(trainer.current_epoch)
        t0 = time.perf_counter()
        status = "done"
        backlog = 0
        module = self._resolve_module(pl_module)
        self._check_worker()
        if self._settings is not None and self._settings.slices:
            worker = self._worker
            if worker is None and self._worker_lost is not None:  # never fall back to the training thread
                status = "skipped" if self.on_backlog == "skip" else "deferred"
                if status == "skipped":
                    self._skipped.append(step)
                else:
                    self._defer(module, step, epoch)
            elif worker is None:  # inline: compute on the training thread
                res = self._compute_inline(module, step, epoch)
                self._outbox.append(res)
            else:
                backlog = worker.pending
                if not worker.has_free_slot and self.on_backlog == "wait":
                    while not worker.has_free_slot and worker.alive:
                        self._outbox.extend(worker.poll(timeout=None))
                if worker.has_free_slot and worker.alive:
                    worker.submit(module, step, epoch, 0.0, backlog)
                    if self.on_error == "raise":  # a failure must stop training at this step
                        while step in worker.pending_steps() and worker.alive:
                            self._outbox.extend(worker.poll(timeout=None))
                elif self.on_backlog == "skip":
                    status = "skipped"
                    self._skipped.append(step)
                else:
                    status = "deferred"
                    self._defer(module, step, epoch)
                self._check_worker()
        waited = time.perf_counter() - t0
        self._budget.add(waited)
        self._step_info[step] = {"waited": waited, "backlog": backlog, "overhead_seconds": self._budget.spent}
        if status != "done":
            self._outbox.append(SnapshotResult(step, epoch, waited=waited, backlog=backlog, status=status))
        self._collect()
        if self._distributed():
            self._gather()
        self._raise_pending()

    def _compute_inline(self, module: nn.Module, step: int, epoch: int) -> SnapshotResult:
        from splinecam_lightning.worker import compute_snapshot, load_weights

        assert self._layout is not None and self._settings is not None
        with torch.no_grad():
            load_weights(self._prepared, self._layout.read(module))
        self._settings.color_range = self._color_range
        return compute_snapshot(self._prepared, step, epoch, self._settings, self._colors)

    def _snapshot_dir(self) -> Path:
        return self.dirpath / "snapshots"

    def _weights_file(self, step: int) -> Path:
        return self._snapshot_dir() / f"{step:08d}.pt"

    def _save_slot_weights(self, worker: SnapshotWorker) -> dict[int, int]:
        """Write the weights of the snapshots ``worker`` still holds to ``snapshots/`` (for ``replay`` or a resumed
        run; a file already there is the same step's); returns ``step -> epoch``."""
        saved = {}
        for step, epoch, weights in worker.slot_weights().values():
            if not self._weights_file(step).exists():
                save_weights(self._weights_file(step), weights, step, epoch)
            saved[step] = epoch
        return saved

    def _defer(self, module: nn.Module, step: int, epoch: int) -> None:
        assert self._layout is not None
        weights = {k: w.to("cpu") for k, w in self._layout.read(module).items()}
        save_weights(self._weights_file(step), weights, step, epoch)
        self._deferred[step] = epoch

    def _collect(self) -> None:
        """Take finished results from the worker; log them (rank zero, or gathered later under DDP)."""
        if self._worker is not None:
            self._outbox.extend(self._worker.poll(0.0))
            self._check_worker()
        if not self._distributed():
            outbox, self._outbox = self._outbox, []
            self._merge(outbox)

    def _check_worker(self) -> None:
        """If the worker process has stopped: save the snapshots it held for ``replay``, and warn once (later
        snapshots are deferred, or skipped with ``on_backlog="skip"``)."""
        worker = self._worker
        if worker is None or worker.alive:
            return
        for step, epoch in self._save_slot_weights(worker).items():
            self._deferred[step] = epoch
            self._outbox.append(SnapshotResult(step, epoch, status="deferred"))
        self._worker_lost = worker.error or "it exited"
        self._stop_worker(now=True)
        self._pending_errors.append(
            (
                "the worker process stopped; its snapshots and later ones are saved for `replay`",
                RuntimeError(self._worker_lost),
            )
        )

    def _gather(self) -> None:
        """Every rank calls this at the same steps: send this rank's results to rank zero."""
        import torch.distributed as dist

        outbox, self._outbox = self._outbox, []
        for r in outbox:
            r.errors = [(w, RuntimeError(f"{type(e).__name__}: {e}")) for w, e in r.errors]
        gathered: list[Any] | None = [None] * self._world if self._is_zero else None
        dist.gather_object(outbox, gathered, dst=0)
        if self._is_zero and gathered is not None:
            self._merge([r for part in gathered for r in (part or [])])

    def _merge(self, results: list[SnapshotResult], final: bool = False) -> None:
        """Log each step once all ranks that own slices have reported it (rank zero)."""
        for res in results:
            if res.color_range is not None:  # the worker's scale only widens; so does the union over ranks
                old = self._color_range or res.color_range
                self._color_range = (min(old[0], res.color_range[0]), max(old[1], res.color_range[1]))
            self._pending_errors.extend(res.errors)
            if res.status == "deferred" and res.step in self._deferred_done:
                continue
            self._partial.setdefault(res.step, []).append(res)
        for step in sorted(self._partial):
            parts = self._partial[step]
            if len(parts) < self._owner_ranks() and not final:
                continue
            del self._partial[step]
            self._record(step, parts)

    def _record(self, step: int, parts: list[SnapshotResult]) -> None:
        if not self._is_zero or self._outputs is None:
            return
        info = self._step_info.get(step, {})
        done = [r for r in parts if r.status == "done"]
        per_slice: dict[str, dict[str, float]] = {}
        frames: dict[str, str] = {}
        for r in done:
            per_slice.update(r.per_slice)
            frames.update(r.frames)
        waited = float(info.get("waited", max((r.waited for r in parts), default=0.0)))
        if per_slice:
            worker_s = sum(r.worker_seconds for r in done)
            record = {
                "step": step,
                "epoch": parts[0].epoch,
                "seconds": waited + worker_s,
                "waited": waited,
                "worker_seconds": worker_s,
                "backlog": float(info.get("backlog", max((r.backlog for r in parts), default=0))),
                "overhead_seconds": float(info.get("overhead_seconds", self._budget.spent)),
                "slices": per_slice,
            }
            self._outputs.add(record, frames, log_frames=self.log_frames)
        if any(r.status != "done" for r in parts):
            self._outputs.log_metrics(
                {
                    "splinecam/snapshot_wait_seconds": waited,
                    "splinecam/skipped_snapshots": float(len(self._skipped)),
                    "splinecam/deferred_snapshots": float(len(self.deferred_steps)),
                },
                step,
            )

    def _raise_pending(self) -> None:
        errors, self._pending_errors = self._pending_errors, []
        for what, e in errors:
            self._fail(what, e)

    # ------------------------------------------------------------------ end of fit
    def _finish(self, trainer: Trainer, raise_errors: bool, collective: bool, interrupted: bool = False) -> None:
        """Finish or save the backlog within the overhead budget, then make videos and the plot.

        With a worker, the videos and the plot are made by the worker too, while the budget lasts; everything
        here counts in :attr:`overhead_seconds`. ``interrupted``: compute nothing more, save the backlog and
        leave the videos to ``replay``.
        """
        if self._finished or not self._started:
            return
        self._finished = True
        t0 = time.perf_counter()
        unlimited = self._finishes_everything() and not interrupted

        def room() -> float:
            return 0.0 if interrupted else self._room(t0, unlimited)

        stopped: KeyboardInterrupt | None = None  # Ctrl-C while waiting here: save what is left, then re-raise
        self._check_worker()
        worker = self._worker
        left: list[int] = sorted(self._deferred)
        missing = [s for s in left if not self._weights_file(s).exists()]
        if missing:  # a checkpoint listed them, and the run that wrote it has finished and removed them since
            self._warn(f"SplineCam: the weights of deferred snapshots {missing} are gone from {self._snapshot_dir()}")
            for s in missing:
                self._deferred.pop(s)
            left = sorted(self._deferred)
        if worker is not None and worker.alive:
            submitted = room() > 0
            for step in left if submitted else []:
                worker.submit_file(self._weights_file(step), step, self._deferred[step])
            try:
                while worker.pending and worker.alive and room() > 0:
                    got = worker.poll(timeout=min(room(), 1.0))
                    for r in got:
                        if r.step in self._deferred and r.status == "done":
                            self._deferred_done.add(r.step)
                    self._outbox.extend(got)
            except KeyboardInterrupt as e:
                stopped, interrupted = e, True
            left = sorted(set(worker.pending_steps()) | (set() if submitted else set(left)))
            self._deferred.update(self._save_slot_weights(worker))
        elif (
            worker is None
            and self._worker_lost is None
            and not interrupted
            and left
            and self._settings is not None
            and self._settings.slices
        ):
            # Inline mode (a dead worker's snapshots are never redone on this thread).
            try:
                self._finish_deferred_inline(trainer, left, unlimited, t0)
            except KeyboardInterrupt as e:
                stopped, interrupted = e, True
            left = [s for s in left if s not in self._deferred_done]
        if not self._distributed():  # under DDP the ranks share these files: they stay
            # A file a checkpoint listed stays: a run resumed from that checkpoint computes it.
            for s in self._deferred_done - self._checkpointed:
                self._weights_file(s).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # only when empty: deferred work done, nothing left for replay
                self._snapshot_dir().rmdir()
        for s in self._deferred_done:
            self._deferred.pop(s, None)
        self._pending_out = sorted(left)
        if collective and self._distributed():
            self._gather()
        else:
            outbox, self._outbox = self._outbox, []
            self._merge(outbox)
        self._merge([], final=True)
        errors = list(self._pending_errors)
        self._pending_errors = []
        made = None
        if self._is_zero and self._outputs is not None:
            if self._pending_out or (interrupted and self.make_videos):
                self._write_replay_files(interrupted)
            names = [s.name for s in self._slices or []]
            final = None
            if self.save_partitions:  # with every snapshot done, the videos get the run-wide colour scale
                final = {"color_by": self.color_by, "color_scale": self.color_scale, "size_px": self.frame_size}
                if self._fixed_color_range:
                    final["color_range"] = self._color_range
            args = (names, self._outputs.plot_rows(), self.fps, self.make_videos, final)
            if interrupted:
                made = ({}, None, [])  # `replay` makes them
            elif worker is not None and worker.alive and not self._pending_out and self.make_videos:
                # Every snapshot is done: its video is always made (the time counts in overhead_seconds).
                try:
                    made = worker.make_files(args, timeout=math.inf)
                except KeyboardInterrupt as e:
                    stopped, made = e, ({}, None, [])
                    self._write_replay_files(interrupted=True)  # `replay` makes the videos
            elif worker is not None and not unlimited and self.make_videos:
                made = ({}, None, [])  # `replay` remakes them with the pending snapshots
            self._stop_worker(now=bool(left) or made is None)
            errors += self._outputs.finish(
                names, int(trainer.global_step), self.fps, self.make_videos, final_render=final, made=made
            )
        self._stop_worker()
        self._budget.add(time.perf_counter() - t0)
        if stopped is not None:
            raise stopped
        for what, e in errors:
            if raise_errors:
                self._fail(what, e)
            else:
                self._warn(f"SplineCam: {what}: {type(e).__name__}: {e}")

    def _finish_deferred_inline(self, trainer: Trainer, steps: list[int], unlimited: bool, t0: float) -> None:
        from splinecam_lightning.worker import compute_snapshot, load_weights

        for step in steps:
            if self._room(t0, unlimited) <= 0:
                break
            blob = torch.load(self._weights_file(step), map_location="cpu", weights_only=True)
            load_weights(self._prepared, blob["weights"])
            assert self._settings is not None
            res = compute_snapshot(self._prepared, step, blob["epoch"], self._settings, self._colors)
            self._outbox.append(res)
            self._deferred_done.add(step)

    def _write_replay_files(self, interrupted: bool = False) -> None:
        """``snapshots/model.pt`` (the traced copy and settings) and ``pending.json`` for ``replay``."""
        folder = self._snapshot_dir()
        folder.mkdir(parents=True, exist_ok=True)
        assert self._settings is not None
        settings = SnapshotSettings(**{**vars(self._settings), "slices": list(self._slices or [])})
        settings.color_range = self._color_range
        prep = self._prepared
        with atomic_path(folder / "model.pt") as tmp:
            torch.save({"graph_module": prep.graph_module, "input_shape": prep.input_shape, "settings": settings}, tmp)
        epochs = {str(s): self._deferred.get(s, 0) for s in self._pending_out}
        (folder / "pending.json").write_text(json.dumps({"steps": self._pending_out, "epochs": epochs}))
        if interrupted:
            why = "left when training was interrupted"
        elif self._worker_lost is not None:
            why = f"not computed: the worker process stopped ({self._worker_lost})"
        else:
            why = f"not finished within max_overhead={self.max_overhead}"
        steps = f"steps {self._pending_out[:10]}{' ...' if len(self._pending_out) > 10 else ''}"
        self._warn(
            f"SplineCam: {len(self._pending_out)} snapshot(s) ({steps}) {why}, saved to {folder}; run "
            f"`splinecam-lightning replay {self.dirpath}` to compute them and make the videos"
        )

    def _stop_worker(self, now: bool = False) -> None:
        if self._worker is None:
            return
        try:
            if now:
                self._worker.kill()
            else:
                self._worker.close()
        finally:
            self._worker = None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Slices, statistics history, colour range and deferred steps (plain Python values and tensors).

        Waits for the snapshots queued in the worker while the ``max_overhead`` budget lasts (the wait counts in
        ``splinecam/overhead_seconds``); those still running then are saved to ``<dirpath>/snapshots/`` and listed
        as deferred in the checkpoint, so a run resumed from it computes them. Training does not wait for them.
        The weight files of the steps a checkpoint lists stay in ``snapshots/`` after the fit, for such a resume.
        """
        t0 = time.perf_counter()
        deferred = dict(self._deferred)
        worker = self._worker
        if worker is not None:
            unlimited = self._finishes_everything()
            while worker.pending and worker.alive:
                room = self._room(t0, unlimited)
                if room <= 0:
                    break
                self._outbox.extend(worker.poll(timeout=None if unlimited else min(room, 1.0)))
            # Beyond the budget, the snapshots still running are saved as deferred work for a resumed run
            # (here the worker goes on with them).
            deferred.update(self._save_slot_weights(worker))
        self._checkpointed |= set(deferred)  # their weight files stay after this fit, for a resumed run
        if not self._distributed():
            self._collect()
        self._budget.add(time.perf_counter() - t0)
        return {
            "version": _STATE_VERSION,
            "slices": None if self._slices is None else [s.state_dict() for s in self._slices],
            "history": [{**rec, "slices": {n: dict(s) for n, s in rec["slices"].items()}} for rec in self._history],
            "done_steps": sorted(self._done_steps),
            "deferred": {int(k): int(v) for k, v in deferred.items()},
            "skipped": list(self._skipped),
            "color_range": None if self._color_range is None else list(self._color_range),
            "input_shape": None if self._shape_from_data is None else list(self._shape_from_data),
            "local_points": self._local_points,
            # What `replay --module-class` needs to find the same network in a checkpoint's module.
            "module": self.module if isinstance(self.module, str) else None,
            "output": self.output,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the restored slices replace the constructor's.

        Raises:
            ValueError: The state was written by a newer version of this callback.
        """
        self._restored = True
        version = int(state_dict.get("version", 1))
        if version > _STATE_VERSION:
            raise ValueError(
                f"SplineCamCallback state version {version} is newer than this library's ({_STATE_VERSION}); upgrade"
            )
        if state_dict.get("slices") is not None:
            self._slices = [Slice.from_state_dict(dict(s)) for s in state_dict["slices"]]
        self._history = [
            {**rec, "slices": {n: dict(s) for n, s in rec["slices"].items()}} for rec in state_dict.get("history", [])
        ]
        self._done_steps = {int(s) for s in state_dict.get("done_steps", [r["step"] for r in self._history])}
        self._deferred = {int(k): int(v) for k, v in state_dict.get("deferred", {}).items()}
        self._skipped = [int(s) for s in state_dict.get("skipped", [])]
        cr = state_dict.get("color_range")
        if cr is not None:
            self._color_range = (float(cr[0]), float(cr[1]))
        if state_dict.get("local_points") is not None:
            self._local_points = {k: torch.as_tensor(v) for k, v in state_dict["local_points"].items()}
        shape = state_dict.get("input_shape")
        if shape is not None:
            self._shape_from_data = tuple(int(s) for s in shape)
