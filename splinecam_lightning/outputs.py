"""What a SplineCam run leaves behind: the statistics history, ``stats.csv``, logger fan-out, videos and plot.

Used by :class:`~splinecam_lightning.callback.SplineCamCallback` (main process, global rank zero) and by
``splinecam-lightning replay``. All logger calls go through :mod:`splinecam_lightning.sinks`; files are
written atomically.
"""

from __future__ import annotations

import csv
import datetime
import io
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from splinecam_lightning._files import atomic_path
from splinecam_lightning.stats import STAT_KEYS

__all__ = ["RunOutputs", "FRAME_RE", "LOCAL_PREFIX", "make_run_files", "metrics_of"]

FRAME_RE = re.compile(r"^(\d+)\.png$")
_ARCHIVE_RE = re.compile(r"^(\d+)\.npz$")
#: Pseudo-slices ``local/<split>`` hold local-complexity statistics (means across points), not a slice's.
LOCAL_PREFIX = "local/"
_MAIN_STATS = ("num_regions", "mean_area", "mean_eccentricity", "boundary_length")
# Run-level columns of a history record that are not per-slice statistics.
_COST_KEYS = ("seconds", "worker_seconds")


def _ordered_stat_keys(keys: Iterable[str]) -> list[str]:
    """Known statistics in :data:`STAT_KEYS` order, then ``pieces_class_<c>`` by class, then the rest sorted."""
    keys = set(keys)
    known = [k for k in STAT_KEYS if k in keys]

    def piece_key(k: str) -> tuple[int, str]:
        tail = k.rsplit("_", 1)[-1]
        return (int(tail), k) if tail.lstrip("-").isdigit() else (1 << 30, k)

    pieces = sorted((k for k in keys if k.startswith("pieces_class_")), key=piece_key)
    rest = sorted(k for k in keys if k not in known and k not in pieces and k not in _COST_KEYS)
    cost = [k for k in _COST_KEYS if k in keys]
    return known + pieces + rest + cost


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """The scalars logged for one history record (see the README's table of logged keys)."""
    metrics: dict[str, float] = {}
    per_slice = record["slices"]
    keys: list[str] = []
    for name, stats in per_slice.items():
        for k, v in stats.items():
            metrics[f"splinecam/{name}/{k}"] = float(v)
            if k != "seconds" and k not in keys and not name.startswith(LOCAL_PREFIX):
                keys.append(k)
    for k in keys:
        vals = [float(s[k]) for n, s in per_slice.items() if k in s and not n.startswith(LOCAL_PREFIX)]
        metrics[f"splinecam/mean/{k}"] = sum(vals) / len(vals)
    for key, name in (
        ("seconds", "snapshot_seconds"),
        ("waited", "snapshot_wait_seconds"),
        ("worker_seconds", "worker_seconds"),
        ("backlog", "backlog"),
        ("overhead_seconds", "overhead_seconds"),
    ):
        if key in record:
            metrics[f"splinecam/{name}"] = float(record[key])
    return metrics


class RunOutputs:
    """History of snapshot records, and every output made from it.

    A record is ``{"step", "epoch", "seconds", "waited", "worker_seconds", "backlog", "slices": {name: stats}}``.

    Args:
        dirpath: The run's folder.
        sinks: One :class:`~splinecam_lightning.sinks.Sink` per attached logger (may be empty).
        on_error: Called with ``(what, exception)`` when a logger call or file write fails.
    """

    def __init__(self, dirpath: Path, sinks: Sequence[Any], on_error: Callable[[str, BaseException], None]) -> None:
        self.dirpath = Path(dirpath)
        self.sinks = list(sinks)
        self.on_error = on_error
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ per snapshot
    def add(self, record: dict[str, Any], frames: dict[str, str] | None = None, log_frames: bool = True) -> None:
        """Append a record (kept in step order), log its scalars and frames, and rewrite ``stats.csv``."""
        self.history.append(record)
        self.history.sort(key=lambda r: r["step"])
        self.log_metrics(metrics_of(record), record["step"])
        if frames and log_frames:
            payload = {f"splinecam/frame/{n}": p for n, p in frames.items()}
            for sink in self.sinks:
                try:
                    sink.log_frames(payload, step=record["step"])
                except Exception as e:
                    self.on_error(f"logging frames to {type(sink.logger).__name__} failed", e)
        self.write_stats_csv()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            try:
                sink.log_scalars(metrics, step=step)
            except Exception as e:
                self.on_error(f"logging scalars to {type(sink.logger).__name__} failed", e)

    def stat_columns(self) -> list[str]:
        return _ordered_stat_keys(k for rec in self.history for s in rec["slices"].values() for k in s)

    def write_stats_csv(self) -> None:
        """``stats.csv``: one row per slice per snapshot, columns in a fixed order.

        A statistic a snapshot does not have is left empty: ``pieces_class_<c>`` when class ``c`` has no
        decision region in that slice at that step (or the class-piece count is off).
        """
        if not self.history:
            return
        cols = self.stat_columns()
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step", "epoch", "slice", *cols])
        for rec in self.history:
            for name, stats in rec["slices"].items():
                w.writerow([rec["step"], rec["epoch"], name, *[stats.get(c, "") for c in cols]])
        path = self.dirpath / "stats.csv"
        try:
            with atomic_path(path) as tmp:
                tmp.write_text(buf.getvalue())
        except OSError as e:
            self.on_error(f"could not write {path}", e)

    # ------------------------------------------------------------------ frames on disk
    def set_aside_stale_frames(self, names: Sequence[str], keep: set[int]) -> int:
        """Move frames and archived partitions whose step is not in ``keep`` to ``<slice>/_superseded/<time>/``
        (never delete)."""
        moved = 0
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        for name in names:
            folder = self.dirpath / name
            if not folder.is_dir():
                continue
            archive = folder / "partitions"
            files = [(p, p.name) for p in folder.iterdir()]
            if archive.is_dir():
                files += [(p, f"partitions/{p.name}") for p in archive.iterdir()]
            for p, rel in files:
                m = FRAME_RE.match(p.name) or _ARCHIVE_RE.match(p.name)
                if m is None or int(m.group(1)) in keep:
                    continue
                dest = folder / "_superseded" / stamp / rel
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(p, dest)
                    moved += 1
                except OSError as e:
                    self.on_error(f"could not move stale frame {p}", e)
        return moved

    def set_aside_stale_snapshots(self, keep: set[int]) -> int:
        """Move an earlier fit's deferred work (``snapshots/pending.json``, ``model.pt``, and weight files whose
        step is not in ``keep``) to ``snapshots/_superseded/<time>/``, so ``replay`` never mixes it into this run
        (never delete). Returns the number of weight files and lists moved."""
        folder = self.dirpath / "snapshots"
        if not folder.is_dir():
            return 0
        stale = [p for p in folder.glob("[0-9]*.pt") if not (p.stem.isdigit() and int(p.stem) in keep)]
        listed = folder / "pending.json"
        if listed.exists():
            stale.append(listed)
        if not stale:
            return 0
        if (folder / "model.pt").exists():
            stale.append(folder / "model.pt")
        dest = folder / "_superseded" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        moved = 0
        for p in stale:
            try:
                dest.mkdir(parents=True, exist_ok=True)
                os.replace(p, dest / p.name)
                moved += p.name != "model.pt"
            except OSError as e:
                self.on_error(f"could not move stale snapshot file {p}", e)
        return moved

    # ------------------------------------------------------------------ end of fit
    def plot_rows(self) -> list[dict[str, Any]]:
        out = []
        for rec in self.history:
            row: dict[str, Any] = {"step": rec["step"]}
            per = rec["slices"]
            for k in _MAIN_STATS:
                vals = [s[k] for n, s in per.items() if k in s and not n.startswith(LOCAL_PREFIX)]
                if vals:
                    row[f"mean/{k}"] = sum(vals) / len(vals)
            row["snapshot_seconds"] = rec["seconds"]
            for name, s in per.items():
                if "num_regions" in s:
                    row[f"{name}/num_regions"] = s["num_regions"]  # local/<split>/num_regions: mean per point
            out.append(row)
        return out

    def table(self) -> tuple[list[str], list[list[Any]]]:
        cols = self.stat_columns()
        rows = [
            [rec["step"], name, *[stats.get(c) for c in cols]]
            for rec in self.history
            for name, stats in rec["slices"].items()
        ]
        return ["step", "slice", *cols], rows

    def finish(
        self,
        names: Sequence[str],
        step: int,
        fps: float,
        make_videos: bool,
        final_render: dict | None = None,
        made: tuple[dict[str, Path], Path | None, list[tuple[str, BaseException]]] | None = None,
    ) -> list[tuple[str, BaseException]]:
        """Write ``stats.csv``, one video per slice, ``stats.png``; hand them to the loggers.

        ``made`` is what :func:`make_run_files` returned where it already ran (in the worker process);
        otherwise it runs here. Returns the failures as ``(what, exception)`` pairs (nothing is raised).
        """
        self.write_stats_csv()
        if made is None:
            made = make_run_files(self.dirpath, names, self.plot_rows(), fps, make_videos, final_render)
        videos, plot, errors = made
        errors = list(errors)
        for sink in self.sinks:
            try:
                if videos:
                    sink.log_videos({f"splinecam/video/{k}": v for k, v in videos.items()}, step=step)
                if plot is not None:
                    sink.log_plot("splinecam/stats_plot", plot, step=step)
                if self.history:
                    cols, rows = self.table()
                    sink.log_table("splinecam/stats_table", cols, rows, step=step)
                sink.flush()
            except Exception as e:
                errors.append((f"logging videos/table to {type(sink.logger).__name__} failed", e))
        return errors


def make_run_files(
    dirpath: Path,
    names: Sequence[str],
    plot_rows: list[dict[str, Any]],
    fps: float,
    make_videos: bool,
    final_render: dict | None = None,
) -> tuple[dict[str, Path], Path | None, list[tuple[str, BaseException]]]:
    """One video per slice and ``stats.png`` (no logger calls, so the worker process can make them).

    With ``final_render`` (style options of :func:`~splinecam_lightning.archive.render_run`), slices with a
    partition archive get their video redrawn from it with one colour scale fitted to the whole run; otherwise
    (or if that fails) the video is made from the frames drawn during training.

    Returns:
        ``(videos, plot, errors)``.
    """
    dirpath = Path(dirpath)
    errors: list[tuple[str, BaseException]] = []
    videos: dict[str, Path] = {}
    plot: Path | None = None
    if not make_videos:
        return videos, plot, errors
    from splinecam_lightning.video import make_video, plot_stats

    if final_render is not None:
        from splinecam_lightning.archive import archived_partitions, render_run

        try:
            have = archived_partitions(dirpath) if dirpath.is_dir() else {}
            archived = [n for n in names if n in have]
            if archived:
                videos.update(render_run(dirpath, slices=archived, fps=fps, **final_render))
        except Exception as e:
            errors.append(("redrawing the videos with the run's colour scale failed", e))
    for name in names:
        folder = dirpath / name
        if name in videos or not (folder.is_dir() and any(FRAME_RE.match(p.name) for p in folder.iterdir())):
            continue
        try:
            videos[name] = make_video(folder, dirpath / f"{name}.mp4", fps=fps, pattern="*.png")
        except Exception as e:
            errors.append((f"video of slice '{name}' failed", e))
    if plot_rows:
        try:
            log_x = sorted({k for r in plot_rows for k in r if k.startswith(LOCAL_PREFIX)})
            plot = plot_stats(plot_rows, dirpath / "stats.png", log_x=log_x)
        except Exception as e:
            errors.append(("statistics plot failed", e))
    return videos, plot, errors
