"""Snapshot work off the training thread: what a snapshot computes, and the process that computes it.

The training thread of :class:`~splinecam_lightning.callback.SplineCamCallback` only copies weights. Everything
else (exact partitions, statistics, frames) runs in :class:`SnapshotWorker`, a separate Python interpreter
started fresh (like multiprocessing's ``spawn``, so it is CUDA-safe) that never re-imports the user's script.

* The model is traced **once** at fit start (:func:`~splinecam_lightning.engine.prepare_model`); the traced
  float64 copy is pickled to the worker. Each snapshot then only copies the parameters and buffers into one of
  a few preallocated shared-memory *slots* (:class:`WeightLayout`) and sends the slot number: no pickling, no
  tracing and no allocation on the training thread. The slot files lose their names as soon as the worker has
  mapped them, so nothing is left in ``/dev/shm`` however the processes end.
* The worker runs under ``SCHED_IDLE`` (Linux; elsewhere niceness 19) with ``worker_threads`` torch threads
  (default 1), so it only uses CPU time that training leaves idle and never oversubscribes training's cores.
  While training waits for it (``on_backlog="wait"``, the end of fit, a checkpoint) it is lifted to normal
  priority for the wait, where the OS allows it (Linux, with ``CAP_SYS_NICE`` or a permissive ``RLIMIT_NICE``).
* :func:`compute_snapshot` is the one function that turns weights into statistics and frames; the worker, the
  inline mode and ``splinecam-lightning replay`` all call it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from splinecam_lightning import memory
from splinecam_lightning._files import atomic_path
from splinecam_lightning.archive import ColorRangeTracker, archive_path
from splinecam_lightning.slices import Slice

__all__ = [
    "SnapshotSettings",
    "SnapshotResult",
    "WeightLayout",
    "SnapshotWorker",
    "compute_snapshot",
    "load_weights",
    "save_weights",
]

_ALIGN = 64

# Freed memory the worker keeps between snapshots for the next one to reuse (the rest goes back to the OS).
try:
    _HELD_BETWEEN_JOBS = min(2 << 30, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8)
except (ValueError, OSError, AttributeError):
    _HELD_BETWEEN_JOBS = 1 << 30


@dataclass
class SnapshotSettings:
    """Everything a snapshot needs besides the weights (plain, picklable values)."""

    slices: list[Slice]
    dirpath: str
    max_regions: int = 200_000
    pieces: bool = False
    write_frames: bool = True
    color_by: str = "slope"
    color_scale: str = "log"
    color_range: tuple[float, float] | None = None
    fixed_color_range: bool = False  # the user's range: never widened
    frame_size: int = 512
    save_partitions: bool = True
    # Local complexity: {"points": {split: (N, D) tensor}, "radius": float, "sampled": bool, "seed": int}.
    local: dict[str, Any] | None = None


@dataclass
class SnapshotResult:
    """What one snapshot produced; errors are ``(what, exception)`` pairs, never raised in the worker."""

    step: int
    epoch: int
    waited: float = 0.0
    per_slice: dict[str, dict[str, float]] = field(default_factory=dict)
    frames: dict[str, str] = field(default_factory=dict)
    errors: list[tuple[str, BaseException]] = field(default_factory=list)
    worker_seconds: float = 0.0
    color_range: tuple[float, float] | None = None
    backlog: int = 0
    status: str = "done"  # "done", "skipped" or "deferred"


def compute_snapshot(
    model: Any, step: int, epoch: int, settings: SnapshotSettings, colors: ColorRangeTracker | None = None
) -> SnapshotResult:
    """Partitions, statistics, archive and frames of every slice of ``settings`` for a prepared model; never raises.

    Args:
        model: A :class:`~splinecam_lightning.engine.PreparedModel` holding the snapshot's weights.
        step, epoch: Where the snapshot was taken (frames are ``<dirpath>/<slice>/<step:08d>.png``, partitions
            ``<dirpath>/<slice>/partitions/<step:08d>.npz``).
        settings: What to compute and draw.
        colors: The run's slope colour scale so far (updated with this snapshot): frames use the best scale
            known at the time. Ignored when ``settings.fixed_color_range``.
    """
    from splinecam_lightning.engine import compute_partition
    from splinecam_lightning.render import save_frame

    t_start = time.perf_counter()
    res = SnapshotResult(step, epoch, color_range=settings.color_range)
    parts: dict[str, Any] = {}
    with torch.no_grad():
        for s in settings.slices:
            ts = time.perf_counter()
            try:
                part = compute_partition(model, s, max_regions=settings.max_regions)
                stats = {k: float(v) for k, v in part.stats(pieces=settings.pieces).items()}
            except Exception as e:
                res.errors.append((f"snapshot of slice '{s.name}' at step {step} failed", e))
                continue
            parts[s.name] = part
            res.per_slice[s.name] = dict(stats, seconds=time.perf_counter() - ts)
    if settings.local:
        _local_stats(model, step, settings.local, res)
    if parts and settings.color_by == "slope" and not settings.fixed_color_range and colors is not None:
        for part in parts.values():
            res.color_range = colors.add(part)
        if settings.color_range is not None:  # a resumed run's scale: keep frames comparable with earlier ones
            res.color_range = (
                min(res.color_range[0], settings.color_range[0]),
                max(res.color_range[1], settings.color_range[1]),
            )
    dirpath = Path(settings.dirpath)
    if settings.save_partitions:
        for name, part in parts.items():
            try:
                part.save(archive_path(dirpath, name, step))
            except Exception as e:
                res.errors.append((f"archive of slice '{name}' at step {step} failed", e))
    if settings.write_frames:
        for name, part in parts.items():
            stats = res.per_slice[name]
            title = (
                f"{name} | step {step} | {int(stats.get('num_regions', part.num_regions))} regions | "
                f"boundary {stats.get('boundary_length', float('nan')):.3g}"
            )
            kwargs: dict[str, Any] = {"color_by": settings.color_by, "size_px": settings.frame_size, "title": title}
            if settings.color_by == "slope":
                kwargs["color_range"] = res.color_range
                kwargs["color_scale"] = settings.color_scale
            path = dirpath / name / f"{step:08d}.png"
            try:
                save_frame(part, path, **kwargs)
            except Exception as e:
                res.errors.append((f"frame of slice '{name}' at step {step} failed", e))
                continue
            res.frames[name] = str(path)
    res.worker_seconds = time.perf_counter() - t_start
    return res


def _local_stats(model: Any, step: int, local: Mapping[str, Any], res: SnapshotResult) -> None:
    """Exact local complexity around each split's points (one batched engine pass per split), as the
    pseudo-slice ``local/<split>``: the mean, median and std across points of each statistic."""
    from splinecam_lightning.local import local_complexity

    for split, points in local["points"].items():
        ts = time.perf_counter()
        try:
            lc = local_complexity(
                model,
                points,
                local["radius"],
                generator=torch.Generator().manual_seed(int(local["seed"])),
                sampled=bool(local["sampled"]),
            )
        except Exception as e:
            res.errors.append((f"local complexity of the {split} points at step {step} failed", e))
            continue
        res.per_slice[f"local/{split}"] = dict(lc.summary(flat=True), seconds=time.perf_counter() - ts)


# ---------------------------------------------------------------------------------------------- weights
class WeightLayout:
    """Where each parameter and buffer of the analysed module lives in a flat byte buffer.

    Built once at fit start from the module's ``state_dict`` keys that the traced copy uses, with the module's own
    dtypes and shapes (the float64 conversion happens in the worker, off the training thread).
    """

    def __init__(self, module: torch.nn.Module, graph_module: torch.nn.Module) -> None:
        src = module.state_dict()
        # The traced copy has no torch.compile wrappers: `net._orig_mod.0.weight` is its `net.0.weight`.
        by_key = {k.replace("_orig_mod.", ""): k for k in src}
        entries, sources = [], []
        offset = 0
        for key, t in graph_module.state_dict().items():
            source = by_key.get(key, key)
            s = src.get(source)
            if s is None or tuple(s.shape) != tuple(t.shape):
                continue  # a constant of the traced graph: it does not change while training
            nbytes = s.numel() * s.element_size()
            entries.append((key, s.dtype, tuple(s.shape), offset, nbytes))
            sources.append(source)
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self.entries = entries
        self.sources = sources  # the module's own state_dict key of each entry
        self.nbytes = max(offset, _ALIGN)

    def read(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The module's current weights under the traced copy's keys (detached, not copied)."""
        src = module.state_dict()
        return {key: src[s].detach() for (key, *_), s in zip(self.entries, self.sources, strict=True)}

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Typed views into a ``uint8`` buffer of :attr:`nbytes` bytes, one per entry."""
        return [buffer[o : o + n].view(dt).view(shape) for _, dt, shape, o, n in self.entries]

    def copy_from(self, module: torch.nn.Module, views: Sequence[torch.Tensor]) -> None:
        """Copy the module's current weights into ``views`` (the only work done on the training thread)."""
        for w, v in zip(self.read(module).values(), views, strict=True):
            v.copy_(w)

    def as_dict(self, views: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: v for (key, *_), v in zip(self.entries, views, strict=True)}


def load_weights(model: Any, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` into a prepared model's traced copy (converting dtype and device)."""
    from splinecam_lightning.engine import refresh_hooked_weights

    target = model.graph_module.state_dict()
    with torch.no_grad():
        for k, v in weights.items():
            target[k].copy_(v)
    refresh_hooked_weights(model.graph_module)


def save_weights(path: Path, weights: Mapping[str, torch.Tensor], step: int, epoch: int) -> Path:
    """Write one weight snapshot (for deferred work and ``splinecam-lightning replay``) atomically."""
    with atomic_path(path) as tmp:
        torch.save({"step": step, "epoch": epoch, "weights": {k: v.clone() for k, v in weights.items()}}, tmp)
    return path


# ---------------------------------------------------------------------------------------------- process
def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _open_slot(path: str, nbytes: int) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def _unlink_slots(paths: Sequence[str]) -> None:
    """Remove the slots' names (mappings stay valid; a name already gone is fine)."""
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored meanwhile (from the main thread only, where signal handlers can be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _lower_own_priority() -> None:
    """Run only on CPU time that training leaves idle (Linux ``SCHED_IDLE``; elsewhere niceness 19)."""
    try:
        if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
    except OSError:
        pass
    try:
        os.nice(19)
    except (OSError, AttributeError):
        pass


def _set_policy(pid: int, policy: int) -> bool:
    """Set the scheduling policy of every thread of process ``pid`` (Linux); False where it was not allowed.

    Leaving ``SCHED_IDLE`` needs ``CAP_SYS_NICE`` or a permissive ``RLIMIT_NICE``; entering it never does.
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    ok = True
    for tid in tids:
        try:
            os.sched_setscheduler(int(tid), policy, os.sched_param(0))
        except OSError:  # the thread ended, or no permission
            ok = False
    return ok


class SnapshotWorker:
    """A worker process computing snapshots from weight slots in shared memory.

    Args:
        model: The :class:`~splinecam_lightning.engine.PreparedModel` traced at fit start (its weights are
            replaced by each job's).
        layout: The :class:`WeightLayout` of the analysed module.
        settings: Slices and drawing settings.
        slots: Number of weight slots: snapshots that may be queued or running at once.
        threads: torch intra-op threads of the worker.
        device: Where the worker computes (the model's device by default).
        low_priority: Run the worker under ``SCHED_IDLE`` / niceness 19.
    """

    def __init__(
        self,
        model: Any,
        layout: WeightLayout,
        settings: SnapshotSettings,
        *,
        slots: int,
        threads: int = 1,
        device: torch.device | str | None = None,
        low_priority: bool = True,
    ) -> None:
        self.layout = layout
        self.settings = settings
        self.threads = max(1, int(threads))
        self.device = torch.device(device) if device is not None else model.device
        self._model = model
        self._low_priority = low_priority
        self._paths = [
            os.path.join(_shm_dir(), f"splinecam-{os.getpid()}-{uuid.uuid4().hex[:12]}-{i}") for i in range(slots)
        ]
        self._buffers: list[torch.Tensor] = []
        self._views: list[list[torch.Tensor]] = []
        self._free: list[int] = list(range(slots))
        self._jobs: dict[int, tuple[int, int]] = {}  # slot -> (step, epoch)
        self._file_jobs: list[tuple[int, int]] = []  # jobs read from weight files, in order
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self.error: str | None = None

    # -- lifecycle
    def start(self) -> None:
        """Allocate the slots and launch the process (returns at once; the worker imports in the background)."""
        import socket

        self._buffers = [_open_slot(p, self.layout.nbytes) for p in self._paths]
        self._views = [self.layout.views(b) for b in self._buffers]
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(self.threads)
        env["MKL_NUM_THREADS"] = str(self.threads)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
        code = (
            "import os, signal\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"  # Ctrl-C is the training process's to handle
            "try:\n"  # idle priority before importing torch: the import itself must not slow training
            "    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)) if LOW else None\n"
            "except (AttributeError, OSError):\n"
            "    pass\n"
            "from splinecam_lightning.worker import _worker_main\n"
            f"_worker_main({child_sock.fileno()})\n"
        ).replace("LOW", str(bool(self._low_priority)))
        cmd = [sys.executable, "-c", code]
        try:
            # A terminal's Ctrl-C is the training process's to handle (it stops the worker): the worker starts with
            # SIGINT ignored, inherited through exec, so Python never installs its KeyboardInterrupt handler. Not a
            # session of its own: with autogroup scheduling a new session gets an equal share of the CPU, whatever
            # SCHED_IDLE says, and would slow training.
            with _sigint_ignored():
                self._proc = subprocess.Popen(cmd, pass_fds=[child_sock.fileno()], env=env, stdin=subprocess.DEVNULL)
        finally:
            child_sock.close()
        self._conn = Connection(parent_sock.detach())
        _strip_annotations(self._model.graph_module)
        init = {
            "graph_module": self._model.graph_module,
            "input_shape": self._model.input_shape,
            "device": str(self.device),
            "settings": self.settings,
            "layout": self.layout,
            "paths": self._paths,
            "threads": self.threads,
            "low_priority": self._low_priority,
        }
        self._conn.send_bytes(pickle.dumps(init, protocol=pickle.HIGHEST_PROTOCOL))

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self.error is None

    @property
    def pending(self) -> int:
        """Snapshots handed over and not finished yet."""
        return len(self._jobs) + len(self._file_jobs)

    @property
    def has_free_slot(self) -> bool:
        return bool(self._free)

    def pending_steps(self) -> list[int]:
        return sorted([s for s, _ in self._jobs.values()] + [s for s, _ in self._file_jobs])

    # -- jobs
    def submit(self, module: torch.nn.Module, step: int, epoch: int, waited: float, backlog: int) -> None:
        """Copy ``module``'s weights into a free slot and queue the job (call only when :attr:`has_free_slot`)."""
        slot = self._free.pop(0)
        self.layout.copy_from(module, self._views[slot])
        self._jobs[slot] = (step, epoch)
        self._send(("job", slot, step, epoch, waited, backlog))

    def submit_file(self, path: Path, step: int, epoch: int, backlog: int = 0) -> None:
        """Queue a job whose weights were saved with :func:`save_weights`."""
        self._file_jobs.append((step, epoch))
        self._send(("file", str(path), step, epoch, 0.0, backlog))

    def slot_weights(self) -> dict[int, tuple[int, int, dict[str, torch.Tensor]]]:
        """``step -> (step, epoch, weights)`` of every unfinished slot job (to write them to disk)."""
        return {s: (s, e, self.layout.as_dict(self._views[slot])) for slot, (s, e) in self._jobs.items()}

    def _send(self, msg: tuple) -> None:
        if self._conn is None:
            raise RuntimeError("the SplineCam worker is not running")
        try:
            self._conn.send(msg)
        except (OSError, EOFError) as e:
            # Not raised: the job stays listed (its weights in their slot), and the caller, seeing the worker not
            # alive, saves it for `replay`.
            self.error = self.error or f"the SplineCam worker process is gone ({e})"

    @contextlib.contextmanager
    def _waited_on(self) -> Iterator[None]:
        """While training waits for the worker, the worker is its critical path: lift it out of ``SCHED_IDLE``
        for the wait (best effort), so that other busy processes cannot starve it."""
        lift = self._low_priority and self._proc is not None and hasattr(os, "SCHED_IDLE")
        if lift:
            _set_policy(self._proc.pid, os.SCHED_OTHER)
        try:
            yield
        finally:
            if lift and self._proc is not None and self._proc.poll() is None:
                _set_policy(self._proc.pid, os.SCHED_IDLE)

    def poll(self, timeout: float | None = 0.0) -> list[SnapshotResult]:
        """Finished results; waits up to ``timeout`` seconds for the first one (``None``: until one arrives).

        During a wait the worker runs at normal priority (see :meth:`_waited_on`)."""
        if self._conn is None:
            return []
        if timeout == 0:
            return self._poll(timeout)
        with self._waited_on():
            return self._poll(timeout)

    def _poll(self, timeout: float | None) -> list[SnapshotResult]:
        out: list[SnapshotResult] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if out:
                wait = 0.0
            try:
                ready = self._conn.poll(wait if wait is None else min(wait, 0.5))
            except (OSError, EOFError):
                ready = False
                self.error = self.error or "the SplineCam worker process died"
            if not ready:
                if self._proc is not None and self._proc.poll() is not None and self.error is None:
                    self.error = f"the SplineCam worker process exited with status {self._proc.returncode}"
                if out or self.error or (deadline is not None and time.monotonic() >= deadline):
                    return out
                continue
            try:
                msg = self._conn.recv()
            except (OSError, EOFError):
                self.error = self.error or "the SplineCam worker process died"
                return out
            kind = msg[0]
            if kind == "result":
                _, slot, res = msg
                if slot is None:
                    self._file_jobs.pop(0)
                else:
                    self._jobs.pop(slot, None)
                    self._free.append(slot)
                out.append(res)
            elif kind == "fatal":
                self.error = f"the SplineCam worker failed: {msg[1]}"
                return out

    def make_files(self, args: tuple, timeout: float) -> tuple | None:
        """Ask the (idle) worker for :func:`~splinecam_lightning.outputs.make_run_files`; ``None`` if it does not
        answer within ``timeout`` seconds (results that arrive meanwhile are kept for :meth:`poll`)."""
        self._send(("files", *args))
        deadline = time.monotonic() + timeout
        with self._waited_on():
            while self._conn is not None and self.alive:
                left = deadline - time.monotonic()
                if left <= 0 or not self._conn.poll(min(left, 0.5)):
                    if left <= 0:
                        return None
                    continue
                msg = self._conn.recv()
                if msg[0] == "files":
                    return msg[1]
        return None

    def close(self, timeout: float = 10.0) -> None:
        """Stop the process (after its current job if it finishes within ``timeout``) and free the slots."""
        if self._conn is not None:
            try:
                self._conn.send(("stop",))
            except (OSError, EOFError):
                pass
        if self._proc is not None:
            try:
                with self._waited_on():  # its exit is on the critical path too
                    self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._proc = None
        self.kill_files()

    def kill(self) -> None:
        """Stop the process at once (the caller has saved what it still needs)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.close(timeout=0.0)

    def kill_files(self) -> None:
        self._views = []
        self._buffers = []
        _unlink_slots(self._paths)


def _strip_annotations(gm: Any) -> None:
    """Drop type annotations from the traced graph: string annotations (``from __future__ import annotations``
    in the user's module) become globals of the generated code that cannot be pickled."""
    changed = False
    for node in gm.graph.nodes:
        if node.type is not None:
            node.type = None
            changed = True
    if changed:
        gm.recompile()


def _worker_main(fd: int) -> None:
    """Entry point of the worker process: receive the model once, then compute one job at a time."""
    conn = Connection(fd)
    _exit_with_parent()
    try:
        init = pickle.loads(conn.recv_bytes())
        if init.get("low_priority", True):
            _lower_own_priority()
        torch.set_num_threads(int(init["threads"]))
        memory.reuse_freed_memory()  # each snapshot reuses the last one's memory instead of faulting it in again
        from splinecam_lightning.engine import PreparedModel
        from splinecam_lightning.tracing import classify_nodes

        device = torch.device(init["device"])
        gm = init["graph_module"].to(device)
        model = PreparedModel(gm, classify_nodes(gm), device, init["input_shape"])
        layout: WeightLayout = init["layout"]
        settings: SnapshotSettings = init["settings"]
        views = [layout.views(_open_slot(p, layout.nbytes)) for p in init["paths"]]
        _unlink_slots(init["paths"])  # both processes map them now: unlinked, they vanish on any exit, SIGKILL too
    except Exception as e:
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    colors = ColorRangeTracker(settings.color_scale)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the training process is gone
        if msg[0] == "stop":
            return
        if msg[0] == "files":  # end of fit: videos and the stats plot, made here off the training thread
            from splinecam_lightning.outputs import make_run_files

            videos, plot, errors = make_run_files(settings.dirpath, *msg[1:])
            try:
                conn.send(("files", (videos, plot, [(w, _picklable(e)) for w, e in errors])))
            except (EOFError, OSError):
                return
            continue
        kind, where, step, epoch, waited, backlog = msg
        try:
            if kind == "job":
                load_weights(model, layout.as_dict(views[where]))
            else:
                load_weights(model, torch.load(where, map_location="cpu", weights_only=True)["weights"])
            res = compute_snapshot(model, step, epoch, settings, colors)
        except Exception as e:
            res = SnapshotResult(step, epoch, errors=[(f"snapshot at step {step} failed", e)])
        res.waited, res.backlog = waited, backlog
        res.errors = [(w, _picklable(e)) for w, e in res.errors]
        try:
            conn.send(("result", where if kind == "job" else None, res))
        except (EOFError, OSError):
            return
        memory.release_freed_memory(_HELD_BETWEEN_JOBS)  # after the result is sent: it never delays it


def _exit_with_parent() -> None:
    """Never outlive the training process, even in the middle of a long job (so CI never hangs)."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="splinecam-parent-watch", daemon=True).start()


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")
