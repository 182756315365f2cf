"""The partition archive of a run: where snapshots are saved, one colour scale for the whole run, re-rendering.

Layout under a callback's ``dirpath`` (one folder per slice)::

    <dirpath>/<slice>/partitions/<step:08d>.npz   # Partition.save of each snapshot
    <dirpath>/<slice>/<step:08d>.png              # frames drawn during training (best colour scale known then)
    <dirpath>/<slice>/rendered/<step:08d>.png     # frames re-rendered by render_run (one scale for the run)
    <dirpath>/<slice>.mp4                         # the video of the rendered frames

Frames drawn while training cannot know how far the slopes will grow, so their colour scale is the best one
known at the time. :func:`render_run` re-renders every archived snapshot with one scale fitted to the whole
run (:func:`run_color_range`), so the videos never saturate. ``splinecam-lightning render DIR`` does the same
from the command line, with any style option.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from splinecam_lightning.partition import Partition

__all__ = [
    "PARTITIONS_DIR",
    "RENDERED_DIR",
    "ColorRangeTracker",
    "archive_path",
    "archived_partitions",
    "fit_color_range",
    "render_run",
    "run_color_range",
]

#: Sub-folder of a slice's folder holding its archived partitions.
PARTITIONS_DIR = "partitions"
#: Sub-folder of a slice's folder holding the frames re-rendered by :func:`render_run`.
RENDERED_DIR = "rendered"

_STEP_FILE = re.compile(r"^(\d+)\.npz$")
# Robust range: area-weighted percentiles, each snapshot weighing the same, so that a few extreme regions
# (or one odd snapshot) do not stretch the scale and the bulk of every frame keeps distinct colours.
_LOWER_PCT, _UPPER_PCT = 0.5, 99.5
# Share of the colour map at each end kept free of the bulk of every snapshot: its area-weighted 10-90 %
# (see fit_color_range).
_EDGE_SHARE = 0.05
_BULK_PCT = 10.0


def archive_path(dirpath: str | os.PathLike[str], slice_name: str, step: int) -> Path:
    """Where a snapshot's partition is archived: ``<dirpath>/<slice_name>/partitions/<step:08d>.npz``.

    Args:
        dirpath: The run's output folder (the callback's ``dirpath``).
        slice_name: Name of the slice (a folder name: see :mod:`splinecam_lightning.slice_selection`).
        step: Global training step of the snapshot (``>= 0``).

    Raises:
        ValueError: A negative step, or a slice name that is not a plain folder name.
    """
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not slice_name or slice_name in (".", "..") or "/" in slice_name or "\\" in slice_name:
        raise ValueError(f"slice name {slice_name!r} is not a plain folder name")
    return Path(dirpath) / slice_name / PARTITIONS_DIR / f"{step:08d}.npz"


def archived_partitions(
    dirpath: str | os.PathLike[str], slices: Sequence[str] | None = None
) -> dict[str, list[tuple[int, Path]]]:
    """The archive of a run: ``{slice name: [(step, path), ...]}``, steps ascending, slices sorted by name.

    Args:
        dirpath: The run's output folder.
        slices: Only these slices (default: every slice with an archive).

    Raises:
        FileNotFoundError: ``dirpath`` is not a folder.
        ValueError: A requested slice has no archive.
    """
    root = Path(dirpath)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder {root} does not exist")
    found: dict[str, list[tuple[int, Path]]] = {}
    for folder in sorted(p for p in root.glob(f"*/{PARTITIONS_DIR}") if p.is_dir()):
        entries = []
        for f in folder.iterdir():
            m = _STEP_FILE.match(f.name)
            if m and f.is_file():
                entries.append((int(m.group(1)), f))
        if entries:
            found[folder.parent.name] = sorted(entries)
    if slices is not None:
        missing = [s for s in slices if s not in found]
        if missing:
            have = ", ".join(found) or "none"
            raise ValueError(f"no archived partitions for slice(s) {', '.join(missing)} under {root} (have: {have})")
        found = {s: found[s] for s in slices}
    return found


def _weighted_percentiles(values: np.ndarray, weights: np.ndarray, pcts: Sequence[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cdf = np.cumsum(w) / w.sum()
    # Inverse CDF (no interpolation): a percentile is a value that occurs, never a blend with an outlier.
    idx = np.searchsorted(cdf, np.asarray(pcts, dtype=np.float64) / 100.0 - 1e-12, side="left")
    return v[np.clip(idx, 0, len(v) - 1)]


def fit_color_range(
    snapshots: Iterable[tuple[Any, Any]],
    scale: str = "log",
    *,
    lower: float = _LOWER_PCT,
    upper: float = _UPPER_PCT,
) -> tuple[float, float]:
    """Robust slope colour range of a set of snapshots, from their per-region slope norms and areas.

    The range runs from the ``lower`` to the ``upper`` percentile of slope norms weighted by region area, every
    snapshot weighing the same (its areas are normalised to sum to one), so a frame's colours follow how much
    of the picture has a slope, not how many tiny regions have it. It is then widened where needed so that
    every snapshot's area-weighted 10th and 90th percentiles lie in the central 90 % of the colour map: no
    frame, not even the steepest one at the end of training, has more than about a tenth of its area in the
    top (or bottom) 5 % of the colours. On the log scale, percentiles and margins are taken on log slopes and
    only positive slopes count.

    Args:
        snapshots: ``(slope_norms, areas)`` pairs of arrays (one pair per partition).
        scale: ``"log"`` or ``"linear"``.
        lower: Lower percentile (0-100).
        upper: Upper percentile (0-100).

    Returns:
        ``(vmin, vmax)`` with ``vmin < vmax`` (and ``vmin > 0`` on the log scale); ``(1e-3, 1)`` (log) or
        ``(0, 1)`` (linear) when there is nothing to fit.

    Raises:
        ValueError: Unknown ``scale`` or percentiles out of order.
    """
    if scale not in ("log", "linear"):
        raise ValueError(f"scale must be 'log' or 'linear', got {scale!r}")
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
    tvals, wts, quartiles = [], [], []
    for norms, areas in snapshots:
        v = np.asarray(_np(norms), dtype=np.float64).reshape(-1)
        a = np.abs(np.asarray(_np(areas), dtype=np.float64).reshape(-1))
        keep = np.isfinite(v) & np.isfinite(a) & (a > 0) & ((v > 0) if scale == "log" else True)
        v, a = v[keep], a[keep]
        if v.size == 0:
            continue
        t = np.log(v) if scale == "log" else v  # percentiles and margins are taken where colours are linear
        w = a / a.sum()
        tvals.append(t)
        wts.append(w)
        quartiles.append(_weighted_percentiles(t, w, (_BULK_PCT, 100.0 - _BULK_PCT)))
    if not tvals:
        return (1e-3, 1.0) if scale == "log" else (0.0, 1.0)
    lo, hi = _weighted_percentiles(np.concatenate(tvals), np.concatenate(wts), (lower, upper))
    # Headroom: every snapshot's 10-90 % bulk stays inside the central 90 % of the colour map, so no frame
    # (not even the last, steepest one) has more than about a tenth of its area in the top or bottom 5 %.
    q = np.array(quartiles)
    m = _EDGE_SHARE
    for _ in range(8):  # the two conditions couple weakly (factor m / (1 - m)): a few rounds converge
        hi = max(hi, lo + float((q[:, 1] - lo).max()) / (1.0 - m))
        lo = min(lo, hi - float((hi - q[:, 0]).max()) / (1.0 - m))
    if not hi > lo:  # one slope everywhere: a decade (log) or +-50 % (linear) around it
        pad = 0.5 * math.log(10.0) if scale == "log" else (0.5 * abs(hi) if hi != 0 else 0.5)
        lo, hi = lo - pad, hi + pad
    if scale == "log":
        return float(np.exp(lo)), float(np.exp(hi))
    return float(lo), float(hi)


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def run_color_range(
    source: str | os.PathLike[str] | Iterable[Partition | str | os.PathLike[str]],
    scale: str = "log",
    *,
    slices: Sequence[str] | None = None,
    lower: float = _LOWER_PCT,
    upper: float = _UPPER_PCT,
) -> tuple[float, float]:
    """One slope colour range for a whole run, so that no frame of its videos saturates.

    Robust area-weighted percentiles of the slope norms of every snapshot (see :func:`fit_color_range`). Only
    the small ``slope_norms`` and ``areas`` arrays of archived files are read, not their geometry.

    During training the same function applied to the snapshots seen so far gives the best scale known at the
    time (``run_color_range([part, ...])``).

    Args:
        source: A run folder (every archived partition under it, see :func:`archived_partitions`), or an
            iterable of :class:`~splinecam_lightning.partition.Partition` objects and/or archive file paths.
        scale: ``"log"`` or ``"linear"``.
        slices: With a run folder: only these slices (default all, so all slices share one scale).
        lower: Lower percentile (0-100).
        upper: Upper percentile (0-100).

    Returns:
        ``(vmin, vmax)``.

    Raises:
        FileNotFoundError: A missing run folder or archive file.
        ValueError: A run folder without an archive, or a file that is not a partition archive.
    """
    if isinstance(source, (str, os.PathLike)):
        runs = archived_partitions(source, slices)
        if not runs:
            raise ValueError(_no_archive(Path(source)))
        items: Iterable[Any] = [p for entries in runs.values() for _, p in entries]
    else:
        items = source

    def pairs() -> Iterable[tuple[Any, Any]]:
        for item in items:
            if isinstance(item, (str, os.PathLike)):
                with np.load(Path(item), allow_pickle=False) as z:
                    if "slope_norms" not in z.files or "areas" not in z.files:
                        raise ValueError(f"{item} is not a SplineCam partition archive")
                    yield z["slope_norms"], z["areas"]
            else:
                yield item.slope_norms, item.areas

    return fit_color_range(pairs(), scale, lower=lower, upper=upper)


class ColorRangeTracker:
    """The best slope colour range known so far in a run, for frames drawn while training.

    Keeps a small summary per snapshot (``summary_size`` area-weighted quantiles of its slope norms), so memory
    does not grow with region counts; :attr:`range` is then :func:`fit_color_range` over all snapshots added so
    far, the same fit :func:`run_color_range` makes at the end from the archive (up to the summary's
    resolution). A range that only widens keeps earlier frames' colours comparable: see ``monotone``.

    Example (in a callback)::

        tracker = ColorRangeTracker("log")
        for part in snapshot_partitions:
            tracker.add(part)
        save_frame(part, path, color_range=tracker.range, color_scale="log")

    Args:
        scale: ``"log"`` or ``"linear"``.
        monotone: Never shrink the range (each :attr:`range` contains the previous one).
        summary_size: Quantiles kept per snapshot.
    """

    def __init__(self, scale: str = "log", *, monotone: bool = True, summary_size: int = 256) -> None:
        if scale not in ("log", "linear"):
            raise ValueError(f"scale must be 'log' or 'linear', got {scale!r}")
        self.scale, self.monotone, self.summary_size = scale, bool(monotone), int(summary_size)
        self._summaries: list[np.ndarray] = []
        self._range: tuple[float, float] | None = None

    def add(self, snapshot: Partition | tuple[Any, Any]) -> tuple[float, float]:
        """Add one partition (or a ``(slope_norms, areas)`` pair) and return the updated :attr:`range`."""
        norms, areas = snapshot if isinstance(snapshot, tuple) else (snapshot.slope_norms, snapshot.areas)
        v = np.asarray(_np(norms), dtype=np.float64).reshape(-1)
        a = np.abs(np.asarray(_np(areas), dtype=np.float64).reshape(-1))
        keep = np.isfinite(v) & np.isfinite(a) & (a > 0) & ((v > 0) if self.scale == "log" else True)
        if keep.any():
            levels = (np.arange(self.summary_size) + 0.5) / self.summary_size * 100.0
            self._summaries.append(_weighted_percentiles(v[keep], a[keep], levels))
        new = fit_color_range(((q, np.ones_like(q)) for q in self._summaries), self.scale)
        if self.monotone and self._range is not None:
            new = (min(new[0], self._range[0]), max(new[1], self._range[1]))
        self._range = new
        return new

    @property
    def range(self) -> tuple[float, float] | None:
        """``(vmin, vmax)`` fitted to the snapshots added so far (``None`` before the first)."""
        return self._range

    def __len__(self) -> int:
        return len(self._summaries)


def _no_archive(root: Path) -> str:
    return (
        f"no partition archive under {root}: expected files {root}/<slice>/{PARTITIONS_DIR}/<step>.npz "
        "(written by SplineCamCallback, or by Partition.save at archive_path(...))"
    )


def _title(name: str, step: int, part: Partition) -> str:
    seg = part.boundary
    blen = float((seg[:, 1] - seg[:, 0]).norm(dim=1).sum()) if seg.numel() else 0.0
    return f"{name} | step {step} | {part.num_regions} regions | boundary {blen:.3g}"


def render_run(
    dirpath: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    slices: Sequence[str] | None = None,
    color_by: str = "slope",
    color_scale: str = "log",
    color_range: Sequence[float] | None = None,
    size_px: int = 512,
    show_axes: bool = True,
    show_legend: bool = True,
    show_edges: bool = True,
    show_boundary: bool = True,
    show_anchors: bool = True,
    titles: bool = True,
    cmap: str = "viridis",
    class_names: Sequence[str] | None = None,
    data: Any | None = None,
    data_labels: Any | None = None,
    fps: float = 8,
    make_videos: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Path]:
    """Re-render every archived partition of a run with one colour scale, and stitch one video per slice.

    Frames go to ``<out>/<slice>/rendered/<step:08d>.png`` (PNG files there that belong to no archived step are
    removed, so the video holds exactly the archive) and videos to ``<out>/<slice>.mp4``, replacing what was
    there atomically. With ``color_by="slope"`` and no ``color_range`` the scale is :func:`run_color_range`
    over all rendered slices.

    Args:
        dirpath: The run folder holding ``<slice>/partitions/<step>.npz`` (the callback's ``dirpath``).
        out: Output folder (default ``dirpath``).
        slices: Only these slices (default: all archived slices).
        color_by: ``"slope"``, ``"class"`` or ``"random"`` (see :func:`~splinecam_lightning.render.render_partition`).
        color_scale: ``"log"`` or ``"linear"`` slope colours.
        color_range: ``(vmin, vmax)`` of the slope colours (default: fitted to the run).
        size_px: Longer side of the frames in pixels, a multiple of 16.
        show_axes: Axes in slice units (``False`` for all-plot videos).
        show_legend: Colour bar or class legend.
        show_edges: Region edges.
        show_boundary: The decision boundary.
        show_anchors: The slice's anchor points.
        titles: A ``slice | step | regions | boundary`` title on each frame.
        cmap: Colormap of slope colours.
        class_names: Legend labels of the classes.
        data: Training inputs to overlay (``(N, D)``; meaningful for 2D-input models).
        data_labels: Their integer labels.
        fps: Frames per second of the videos.
        make_videos: Encode the videos (``False``: frames only).
        progress: Called as ``progress(slice, done, total)`` after each frame.

    Returns:
        ``{slice name: video path}``, or ``{slice name: frames folder}`` when ``make_videos`` is ``False``.

    Raises:
        FileNotFoundError: ``dirpath`` does not exist.
        ValueError: No archive under ``dirpath``, an unknown slice, or a bad style option.
    """
    from splinecam_lightning.partition import Partition
    from splinecam_lightning.render import COLOR_BY_OPTIONS, check_frame_size, save_frame

    root = Path(dirpath)
    size_px = check_frame_size(size_px)
    if color_by not in COLOR_BY_OPTIONS:
        raise ValueError(f"color_by must be one of {COLOR_BY_OPTIONS}, got {color_by!r}")
    if color_scale not in ("log", "linear"):
        raise ValueError(f"color_scale must be 'log' or 'linear', got {color_scale!r}")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps}")
    runs = archived_partitions(root, slices)
    if not runs:
        raise ValueError(_no_archive(root))
    dest = Path(out) if out is not None else root
    if color_by == "slope" and color_range is None:
        color_range = run_color_range([p for entries in runs.values() for _, p in entries], color_scale)

    results: dict[str, Path] = {}
    for name, entries in runs.items():
        frames_dir = dest / name / RENDERED_DIR
        frames_dir.mkdir(parents=True, exist_ok=True)
        wanted = {f"{step:08d}.png" for step, _ in entries}
        for old in frames_dir.glob("*.png"):
            if old.name not in wanted:
                old.unlink()
        for i, (step, path) in enumerate(entries):
            part = Partition.load(path)
            save_frame(
                part,
                frames_dir / f"{step:08d}.png",
                color_by=color_by,
                color_range=color_range,
                color_scale=color_scale,
                size_px=size_px,
                title=_title(name, step, part) if titles else None,
                show_axes=show_axes,
                show_legend=show_legend,
                show_edges=show_edges,
                show_boundary=show_boundary,
                show_anchors=show_anchors,
                cmap=cmap,
                class_names=class_names,
                data=data,
                data_labels=data_labels,
            )
            if progress is not None:
                progress(name, i + 1, len(entries))
        if make_videos:
            from splinecam_lightning.video import make_video

            results[name] = make_video(frames_dir, dest / f"{name}.mp4", fps=fps, pattern="*.png")
        else:
            results[name] = frames_dir
    return results
