"""Fast rasterisation of a :class:`~splinecam_lightning.partition.Partition` into readable frames.

Frames are drawn with matplotlib's object API on an Agg canvas (never ``pyplot``), so rendering works
headless, in worker threads, and leaves no figure in a global registry. All regions go into a single
``PolyCollection``: one draw call whatever the number of regions.

A frame shows the regions (coloured by slope norm, class or at random), the decision boundary, the slice's
anchor points and, optionally, training data; around the plot go axes in slice units and a colour bar (or a
class legend). Its shape follows the slice's aspect ratio; both sides are multiples of 16 (H.264 macro blocks).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.colors import Colormap, ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.path import Path as MplPath

from splinecam_lightning._files import atomic_path as _atomic_path

if TYPE_CHECKING:  # import only for annotations: keeps this module importable on its own
    from splinecam_lightning.partition import Partition

__all__ = ["COLOR_BY_OPTIONS", "check_frame_size", "frame_shape", "render_partition", "save_frame"]

COLOR_BY_OPTIONS = ("slope", "random", "class")

# A power of two: size_px / _DPI is exact in binary floating point, so the canvas is exactly size_px wide.
_DPI = 128
# Sizes (points) are tuned for 512 px frames and scaled linearly, so a frame looks the same at any size.
_REF_PX = 512.0
_EDGE_LW = 0.3
_BOUNDARY_LW = 1.4
_ANCHOR_SIZE = 6.0
_TITLE_FONTSIZE = 10.0
_TICK_FONTSIZE = 7.5
_LABEL_FONTSIZE = 8.0
_DATA_SIZE = 2.2
# Axes, colour bar and legend need this many pixels on the frame's short side to be readable.
_MIN_DECORATED_PX = 160
# Margins (pixels at 512 px) around the plot for tick labels and the colour bar / legend.
_AXES_BOTTOM, _AXES_TOP, _AXES_RIGHT = 40.0, 10.0, 14.0
_LEGEND_WIDTH = 100.0
# Edge opacity follows each region's size on screen: fully drawn from _EDGE_FULL_PX across, gone below
# _EDGE_NONE_PX, so dense areas show their colours rather than a mesh of edges.
_EDGE_ALPHA = 0.8  # opaque strokes of both neighbours coincide: as dark as two 0.6-alpha strokes
_EDGE_NONE_PX, _EDGE_FULL_PX = 2.0, 10.0
_EDGE_LEVELS = 6
# Training-data overlay: at most this many points are drawn (a fixed random subset), enough to show the data.
_MAX_DATA_POINTS = 3000


def _to_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """Detached CPU numpy copy of a tensor or array-like."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _get_cmap(cmap: str | Colormap) -> Colormap:
    return cmap if isinstance(cmap, Colormap) else matplotlib.colormaps[cmap]


def check_frame_size(size: Any, what: str = "size_px") -> int:
    """The one check of frame sizes: a positive integer multiple of 16 (H.264 works on 16x16 macro blocks).

    Args:
        size: The size to check.
        what: Name used in the error message (e.g. ``"--size"``).

    Returns:
        ``size`` as an ``int``.

    Raises:
        ValueError: ``size`` is not a positive integer multiple of 16.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"{what} must be a positive integer multiple of 16, got {size!r}")
    if size <= 0 or size % 16:
        # Other sizes would be rescaled or padded in the video.
        raise ValueError(f"{what} must be a positive multiple of 16, got {size}")
    return int(size)


_check_size = check_frame_size


def _round16(n: float) -> int:
    return max(16, int(-(-np.ceil(n - 1e-6) // 16) * 16))


def _slope_norm(values: np.ndarray, color_range: Sequence[float] | None, color_scale: str) -> Normalize:
    """The value -> [0, 1] map of slope colours (shared by the faces and the colour bar)."""
    if color_scale not in ("linear", "log"):
        raise ValueError(f"color_scale must be 'linear' or 'log', got {color_scale!r}")
    finite = values[np.isfinite(values)]
    if color_range is not None:
        vmin, vmax = (float(v) for v in color_range)
        if not (np.isfinite(vmin) and np.isfinite(vmax) and vmin <= vmax):
            raise ValueError(f"color_range must be finite (vmin, vmax) with vmin <= vmax, got {color_range}")
    elif color_scale == "log" and (finite > 0).any():
        vmin, vmax = float(finite[finite > 0].min()), float(finite.max())
    elif finite.size:
        vmin, vmax = float(finite.min()), float(finite.max())
    else:
        vmin, vmax = 0.0, 1.0
    if color_scale == "log":
        # Slope norms span orders of magnitude over training; zero slopes clip to the bottom colour.
        if vmin <= 0:  # keep a fixed range fixed: derive the floor from vmax, not from this frame
            vmin = vmax * 1e-6 if vmax > 0 else 1e-12
        vmax = max(vmax, vmin * (1 + 1e-9))
        return LogNorm(vmin=vmin, vmax=vmax, clip=True)
    if vmax == vmin:
        # Normalize maps a zero-width range to 0; centre it instead so a constant frame is mid-colormap.
        vmin, vmax = vmin - 0.5, vmax + 0.5
    return Normalize(vmin=vmin, vmax=vmax, clip=True)


def _num_classes(partition: Partition) -> int:
    return max(2, partition.output_dim)


def _class_colors(classes: np.ndarray, n_classes: int, class_cmap: str | Colormap) -> np.ndarray:
    cm = _get_cmap(class_cmap)
    if isinstance(cm, ListedColormap):
        # Categorical maps: integer input indexes the colour list directly.
        return cm(np.asarray(classes) % cm.N)
    return cm(np.asarray(classes) / max(1, n_classes - 1))


def _region_colors(
    partition: Partition,
    color_by: str,
    color_range: Sequence[float] | None,
    cmap: str | Colormap,
    class_cmap: str | Colormap,
    seed: int,
    color_scale: str = "log",
) -> tuple[np.ndarray, Normalize | None]:
    """``(R, 4)`` RGBA face colour of every region, and the slope norm used (``None`` unless ``"slope"``)."""
    R = partition.num_regions
    if color_by == "slope":
        values = _to_numpy(partition.slope_norms)
        norm = _slope_norm(values, color_range, color_scale)
        if isinstance(norm, LogNorm):
            values = np.maximum(values, np.finfo(np.float64).tiny)
        return _get_cmap(cmap)(norm(values)), norm
    if color_by == "random":
        rng = np.random.default_rng(seed)
        palette = 0.15 + 0.8 * rng.random((256, 3))  # avoid near-black faces, which would hide the edges
        rgb = palette[rng.integers(0, len(palette), R)]
        return np.concatenate([rgb, np.ones((R, 1))], axis=1), None
    if color_by == "class":
        classes = _to_numpy(partition.predicted_class, np.int64)
        return _class_colors(classes, _num_classes(partition), class_cmap), None
    raise ValueError(f"color_by must be one of {COLOR_BY_OPTIONS}, got {color_by!r}")


def _compound_paths(verts: np.ndarray, keys: np.ndarray) -> tuple[tuple[list, list], np.ndarray]:
    """One compound path per distinct key row (face colour, edge level), built without a loop over regions.

    Colours come from a 256-entry colormap (or a 256-colour palette) and edges have a few opacity levels, so
    a frame has at most a few thousand paths however many regions it shows; matplotlib would otherwise build
    one Path object per region. The padded ``(R, K, 2)`` array needs no trimming: padding repeats vertex 0,
    adding only zero-length edges.

    Returns:
        ``((vertex arrays, code arrays), unique key rows)``.
    """
    R, K, _ = verts.shape if verts.ndim == 3 else (0, 1, 2)
    if R == 0:
        return ([], []), np.zeros((0, keys.shape[1] if keys.ndim == 2 else 4))
    rows, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    closed = np.concatenate([verts[order], verts[order][:, :1]], axis=1).reshape(-1, 2)  # (R*(K+1), 2)
    one = np.full(K + 1, MplPath.LINETO, dtype=MplPath.code_type)
    one[0], one[-1] = MplPath.MOVETO, MplPath.CLOSEPOLY
    codes = np.tile(one, R)
    bounds = np.cumsum(np.bincount(group, minlength=len(rows)))[:-1] * (K + 1)
    return (np.split(closed, bounds), np.split(codes, bounds)), rows


def _edge_levels(partition: Partition, px_per_unit: float) -> np.ndarray:
    """``(R,)`` edge opacity of each region from its size on screen, in ``_EDGE_LEVELS`` steps."""
    side_px = np.sqrt(np.maximum(_to_numpy(partition.areas), 0.0)) * px_per_unit
    t = np.clip((side_px - _EDGE_NONE_PX) / (_EDGE_FULL_PX - _EDGE_NONE_PX), 0.0, 1.0)
    return np.round(t * (_EDGE_LEVELS - 1)) / (_EDGE_LEVELS - 1) * _EDGE_ALPHA


def _domain_limits(partition: Partition) -> tuple[float, float, float, float]:
    dom = _to_numpy(partition.slice.domain)
    (x0, y0), (x1, y1) = dom.min(0), dom.max(0)
    return float(x0), float(x1), float(y0), float(y1)


def _data_points(partition: Partition, data: Any, labels: Any | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Training points in plane coordinates (a fixed subset of at most ``_MAX_DATA_POINTS``) and their labels."""
    x = _to_numpy(data)
    if x.ndim != 2:
        x = x.reshape(x.shape[0], -1) if x.ndim > 2 else x.reshape(-1, 2)
    sl = partition.slice
    if x.shape[1] != sl.input_dim:
        raise ValueError(f"data points have {x.shape[1]} coordinates but the slice lives in {sl.input_dim} dimensions")
    if not np.isfinite(x).all():
        raise ValueError("data points contain NaN or Inf values")
    y = None
    if labels is not None:
        y = _to_numpy(labels, np.float64).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"data_labels has {y.shape[0]} entries for {x.shape[0]} data points")
        y = np.rint(y).astype(np.int64)
    # Orthogonal projection onto the plane: exact for 2D-input models, a shadow of the data otherwise.
    uv = (x - _to_numpy(sl.origin)) @ _to_numpy(sl.basis).T
    x0, x1, y0, y1 = _domain_limits(partition)
    keep = (uv[:, 0] >= x0) & (uv[:, 0] <= x1) & (uv[:, 1] >= y0) & (uv[:, 1] <= y1)
    idx = np.flatnonzero(keep)
    if idx.size > _MAX_DATA_POINTS:
        idx = np.sort(np.random.default_rng(0).choice(idx, _MAX_DATA_POINTS, replace=False))
    return uv[idx], (None if y is None else y[idx])


def _draw(
    ax: Axes,
    partition: Partition,
    *,
    color_by: str = "slope",
    color_range: Sequence[float] | None = None,
    show_edges: bool = True,
    show_boundary: bool = True,
    show_anchors: bool = True,
    cmap: str | Colormap = "viridis",
    class_cmap: str | Colormap = "tab10",
    seed: int = 0,
    scale: float = 1.0,
    color_scale: str = "log",
    px_per_unit: float | None = None,
    data: Any | None = None,
    data_labels: Any | None = None,
    show_axes: bool = False,
) -> dict[str, Any]:
    """Draw a partition onto existing axes.

    Args:
        ax: Axes to draw on; its limits and aspect are set to the slice domain.
        partition: The partition to draw.
        color_by: See :func:`render_partition`.
        color_range: See :func:`render_partition`.
        show_edges: Draw region edges (their opacity follows each region's size on screen).
        show_boundary: Draw the decision boundary.
        show_anchors: Draw the slice anchors.
        cmap: Colormap for ``"slope"``.
        class_cmap: Colormap for ``"class"`` and for labelled data points.
        seed: Seed for ``"random"``.
        scale: Multiplier for line widths, marker sizes and fonts (points).
        color_scale: ``"log"`` or ``"linear"`` slope colours.
        px_per_unit: Screen pixels per plane unit, for edge opacity; default from the axes' size.
        data: ``(N, D)`` input points to overlay (see :func:`render_partition`).
        data_labels: ``(N,)`` integer labels of ``data``.
        show_axes: Draw ticks and labels in plane units; otherwise the axes are hidden.

    Returns:
        The created artists: ``"regions"`` (the one ``PolyCollection``), ``"boundary"`` (``LineCollection`` or
        ``None``), ``"anchors"`` (``Line2D`` or ``None``), ``"data"`` (``PathCollection`` or ``None``) and
        ``"norm"`` (the slope ``Normalize``, or ``None``).

    Raises:
        ValueError: Unknown ``color_by``, an invalid ``color_range`` or bad ``data``.
    """
    if color_by not in COLOR_BY_OPTIONS:
        raise ValueError(f"color_by must be one of {COLOR_BY_OPTIONS}, got {color_by!r}")
    faces, norm = _region_colors(partition, color_by, color_range, cmap, class_cmap, seed, color_scale)
    x0, x1, y0, y1 = _domain_limits(partition)
    if px_per_unit is None:
        fig_w, fig_h = ax.figure.get_size_inches() * ax.figure.dpi
        pos = ax.get_position()
        px_per_unit = min(pos.width * fig_w / (x1 - x0), pos.height * fig_h / (y1 - y0))

    # Each region is stroked in its face colour darkened by its edge opacity: opaque strokes leave no
    # antialiasing seams, and regions too small to show edges keep their colour.
    alpha = _edge_levels(partition, px_per_unit) if show_edges else np.zeros(partition.num_regions)
    keys = np.concatenate([faces, alpha[:, None]], axis=1)
    paths, rows = _compound_paths(_to_numpy(partition.vertices), keys)
    face, a = rows[:, :4], rows[:, 4:5]
    edge = face.copy()
    edge[:, :3] = face[:, :3] * (1.0 - a)
    regions = PolyCollection([], closed=True, linewidths=_EDGE_LW * scale, zorder=1)
    regions.set_verts_and_codes(*paths)
    regions.set_facecolor(face)
    regions.set_edgecolor(edge)
    ax.add_collection(regions, autolim=False)

    dots = None
    if data is not None:
        uv, labels = _data_points(partition, data, data_labels)
        if labels is None:
            colors: Any = "white"
        else:
            colors = _class_colors(labels, max(_num_classes(partition), int(labels.max(initial=0)) + 1), class_cmap)
        dots = ax.scatter(
            uv[:, 0],
            uv[:, 1],
            s=max(_DATA_SIZE * scale, 2.0) ** 2,  # stays visible on small frames
            c=colors,
            edgecolors=(0.0, 0.0, 0.0, 0.7),
            linewidths=0.35 * scale,
            zorder=1.5,
        )

    boundary = None
    if show_boundary:
        segs = _to_numpy(partition.boundary).reshape(-1, 2, 2)
        boundary = LineCollection(segs, colors=(0.9, 0.0, 0.0, 1.0), linewidths=_BOUNDARY_LW * scale, zorder=2)
        ax.add_collection(boundary, autolim=False)

    anchors = None
    pts = _to_numpy(partition.slice.anchors).reshape(-1, 2)
    if show_anchors and len(pts):
        (anchors,) = ax.plot(
            pts[:, 0],
            pts[:, 1],
            linestyle="none",
            marker="o",
            markersize=_ANCHOR_SIZE * scale,
            markerfacecolor="white",
            markeredgecolor="black",
            markeredgewidth=1.0 * scale,
            zorder=3,
        )

    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal", adjustable="box")
    if show_axes:
        _style_axes(ax, partition, scale)
    else:
        ax.set_axis_off()
    return {"regions": regions, "boundary": boundary, "anchors": anchors, "data": dots, "norm": norm}


def _tick_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10])


def _axes_left(y0: float, y1: float) -> float:
    """Left margin (pixels at 512 px) for the y tick labels of ``[y0, y1]`` and the axis label."""
    ticks = [t for t in _tick_locator().tick_values(y0, y1) if y0 - 1e-9 * (y1 - y0) <= t <= y1 + 1e-9 * (y1 - y0)]
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    # As many decimals as the ticks need (0.25 needs two), as matplotlib's formatter shows them.
    decimals = next((d for d in range(12) if all(abs(round(t, d) - t) <= 1e-6 * step for t in ticks)), 12)
    chars = max((len(f"{t:.{decimals}f}") for t in ticks), default=3) + 0.5
    # Digits are ~0.6 em wide; then tick, padding and the rotated axis label.
    return chars * 0.62 * _TICK_FONTSIZE * _DPI / 72.0 + 30.0


def _style_axes(ax: Axes, partition: Partition, scale: float) -> None:
    sl = partition.slice
    identity = sl.input_dim == 2 and bool((sl.basis == sl.basis.new_tensor([[1.0, 0.0], [0.0, 1.0]])).all())
    identity = identity and bool((sl.origin == 0).all())
    # On a 2D-input model's own plane the axes are the input coordinates; otherwise plane coordinates.
    xl, yl = ("x[0]", "x[1]") if identity else ("u", "v")
    ax.set_xlabel(xl, fontsize=_LABEL_FONTSIZE * scale, labelpad=1.5 * scale)
    ax.set_ylabel(yl, fontsize=_LABEL_FONTSIZE * scale, labelpad=1.5 * scale)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(_tick_locator())
    ax.tick_params(
        labelsize=_TICK_FONTSIZE * scale, length=3.0 * scale, width=0.6 * scale, pad=1.5 * scale, direction="out"
    )
    for spine in ax.spines.values():
        spine.set_linewidth(0.6 * scale)


def _layout(
    partition: Partition, size_px: int, title: bool, show_axes: bool, show_legend: bool
) -> tuple[int, int, tuple[float, float, float, float], float, bool, bool]:
    """Frame width and height, the plot box ``(left, bottom, width, height)`` in pixels, the scale of
    sizes, and whether axes and legend fit."""
    x0, x1, y0, y1 = _domain_limits(partition)
    dw, dh = x1 - x0, y1 - y0
    scale = size_px / _REF_PX
    short = size_px * min(dw, dh) / max(dw, dh)
    roomy = short >= _MIN_DECORATED_PX
    show_axes, show_legend = show_axes and roomy, show_legend and roomy
    top = 0.0
    if title:
        # ~1.8 line heights (points -> pixels) for the title band.
        top = min(0.3 * size_px, 1.8 * _TITLE_FONTSIZE * scale * _DPI / 72.0)
    left = bottom = right = 0.0
    if show_axes:
        left, bottom, right = _axes_left(y0, y1) * scale, _AXES_BOTTOM * scale, _AXES_RIGHT * scale
        top += _AXES_TOP * scale
    if show_legend:
        right = max(right, 6.0 * scale) + _LEGEND_WIDTH * scale
        top = max(top, _AXES_TOP * scale)
        bottom = max(bottom, _AXES_TOP * scale)
    s = min((size_px - left - right) / dw, (size_px - top - bottom) / dh)
    pw, ph = s * dw, s * dh
    W, H = min(size_px, _round16(pw + left + right)), min(size_px, _round16(ph + top + bottom))
    # Rounding up to a multiple of 16 leaves a few spare pixels: centre the plot in them.
    pl = left + (W - left - right - pw) / 2.0
    pb = bottom + (H - top - bottom - ph) / 2.0
    return W, H, (pl, pb, pw, ph), scale, show_axes, show_legend


def frame_shape(
    partition: Partition,
    size_px: int = 512,
    *,
    title: bool = False,
    show_axes: bool = True,
    show_legend: bool = True,
) -> tuple[int, int]:
    """``(height, width)`` in pixels of the frame :func:`render_partition` draws for these options.

    The longer side is ``size_px``; the shorter one is fitted to the slice domain's aspect ratio (plus room for
    the axes and legend) and rounded up to a multiple of 16. All frames of one slice have the same shape.
    """
    W, H, *_ = _layout(partition, check_frame_size(size_px), title, show_axes, show_legend)
    return H, W


def render_partition(
    partition: Partition,
    *,
    color_by: str = "slope",
    size_px: int = 512,
    color_range: Sequence[float] | None = None,
    title: str | None = None,
    show_edges: bool = True,
    show_boundary: bool = True,
    show_anchors: bool = True,
    show_axes: bool = True,
    show_legend: bool = True,
    cmap: str | Colormap = "viridis",
    class_cmap: str | Colormap = "tab10",
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    color_scale: str = "log",
    data: Any | None = None,
    data_labels: Any | None = None,
) -> np.ndarray:
    """Rasterise a partition to an RGB image.

    Args:
        partition: The partition to draw.
        color_by: ``"slope"`` colours regions by the Frobenius norm of their Jacobian
            (:attr:`Partition.slope_norms`); ``"random"`` gives each region a random colour from a numpy
            generator seeded with ``seed``; ``"class"`` colours by :attr:`Partition.predicted_class`.
        size_px: The frame's longer side in pixels, a positive multiple of 16 (H.264 macro blocks). The shorter
            side follows the slice's aspect ratio, rounded up to a multiple of 16 (see :func:`frame_shape`).
        color_range: ``(vmin, vmax)`` of the slope colour scale. Pass the same range for every frame of a
            video so colours are comparable across frames (see
            :func:`splinecam_lightning.archive.run_color_range`); by default the frame's own min/max is used.
        title: Text drawn above the plot; ``None`` leaves the whole frame to the plot.
        show_edges: Draw region edges. Their opacity follows each region's size on screen, so densely cut
            areas show colours rather than a mesh of edges.
        show_boundary: Draw the decision boundary in red.
        show_anchors: Draw the slice's anchor points (white dots).
        show_axes: Ticks and labels in slice units (the input coordinates for a 2D-input model's own plane).
            Turn off for videos that should be all plot.
        show_legend: A colour bar of slope norms (``"slope"``) or a legend of classes (``"class"``); nothing for
            ``"random"``. Axes and legend are left out of frames whose shorter side is under 160 pixels.
        cmap: Colormap (name or object) for ``"slope"``.
        class_cmap: Colormap for ``"class"`` and labelled data; a categorical (listed) map is indexed by class.
        class_names: Legend labels of the classes (default ``class 0``, ``class 1``, ...).
        seed: Seed for ``"random"`` colours.
        color_scale: ``"log"`` (default: slope norms span orders of magnitude) or ``"linear"`` mapping of
            slope norms to colours (``"slope"`` only).
        data: Training inputs to overlay, ``(N, D)`` with ``D`` the slice's input dimension (e.g. ``(N, 2)`` for
            a 2D-input model). They are projected onto the slice's plane, which is exact for 2D inputs; points
            outside the domain are left out and at most 3,000 (a fixed random subset) are drawn.
        data_labels: ``(N,)`` integer labels of ``data``, drawn in the class colours; white dots without.

    Returns:
        ``(height, width, 3)`` uint8 RGB array (see :func:`frame_shape`).

    Raises:
        ValueError: ``size_px`` not a positive multiple of 16, unknown ``color_by``, an invalid
            ``color_range``, or ``data`` of the wrong shape.
    """
    size_px = check_frame_size(size_px)
    if color_by not in COLOR_BY_OPTIONS:
        raise ValueError(f"color_by must be one of {COLOR_BY_OPTIONS}, got {color_by!r}")
    W, H, (pl, pb, pw, ph), scale, show_axes, show_legend = _layout(
        partition, size_px, title is not None, show_axes, show_legend
    )

    fig = Figure(figsize=(W / _DPI, H / _DPI), dpi=_DPI, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    try:
        if title is not None:
            fontsize = _TITLE_FONTSIZE * scale
            band = min(0.3 * size_px, 1.8 * fontsize * _DPI / 72.0)
            text = fig.text(0.5, 1.0 - 0.2 * band / H, str(title), ha="center", va="top", fontsize=fontsize)
            # Long titles (slice | step | regions | ...) would be clipped at the frame edge: shrink to fit.
            # Text width is not exactly linear in font size (hinting), so re-measure a few times.
            for _ in range(3):
                width = text.get_window_extent(renderer=canvas.get_renderer()).width
                if width <= 0.94 * W:
                    break
                text.set_fontsize(text.get_fontsize() * 0.92 * W / width)
        ax = fig.add_axes((pl / W, pb / H, pw / W, ph / H))
        artists = _draw(
            ax,
            partition,
            color_by=color_by,
            color_range=color_range,
            show_edges=show_edges,
            show_boundary=show_boundary,
            show_anchors=show_anchors,
            cmap=cmap,
            class_cmap=class_cmap,
            seed=seed,
            color_scale=color_scale,
            scale=scale,
            px_per_unit=pw / (_domain_limits(partition)[1] - _domain_limits(partition)[0]),
            data=data,
            data_labels=data_labels,
            show_axes=show_axes,
        )
        if show_legend:
            _legend(fig, partition, artists["norm"], color_by, cmap, class_cmap, class_names, (pl, pb, pw, ph), W, H,
                    scale)  # fmt: skip
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
        rgb = _fit(rgba[..., :3], H, W)
    finally:
        # Break the figure <-> canvas <-> artist cycles now rather than waiting for the cyclic GC.
        fig.clear()
        del canvas, fig
    return rgb


def _legend(
    fig: Figure,
    partition: Partition,
    norm: Normalize | None,
    color_by: str,
    cmap: str | Colormap,
    class_cmap: str | Colormap,
    class_names: Sequence[str] | None,
    box: tuple[float, float, float, float],
    W: int,
    H: int,
    scale: float,
) -> None:
    """Colour bar (slope) or class legend to the right of the plot box."""
    pl, pb, pw, ph = box
    x = pl + pw + 8.0 * scale
    if color_by == "slope" and norm is not None:
        from matplotlib.cm import ScalarMappable

        values = _to_numpy(partition.slope_norms)
        values = values[np.isfinite(values)]
        lo = values.size and values.min() < norm.vmin * (1 - 1e-9)
        hi = values.size and values.max() > norm.vmax * (1 + 1e-9)
        extend = {(False, False): "neither", (True, False): "min", (False, True): "max"}.get(
            (bool(lo), bool(hi)), "both"
        )
        cax = fig.add_axes((x / W, pb / H, 12.0 * scale / W, ph / H))
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=_get_cmap(cmap)), cax=cax, extend=extend)
        if isinstance(norm, LogNorm):
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

            # Few ticks: every tick is a costly artist, and a log axis would make dozens of minor ones. Plain
            # labels (0.01, 1e+04) rather than mathtext, whose parsing would cost more than the whole plot.
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            decades = np.log10(norm.vmax / norm.vmin)
            cb.ax.yaxis.set_major_locator(LogLocator(numticks=6))
            cb.ax.yaxis.set_major_formatter(plain)
            if decades > 2.0:
                cb.ax.yaxis.set_minor_locator(NullLocator())
            else:  # a narrow range: 2x and 5x ticks as well, labelled when there are few majors
                cb.ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
                cb.ax.yaxis.set_minor_formatter(NullFormatter() if decades > 1.5 else plain)
        cb.ax.tick_params(
            which="both", labelsize=_TICK_FONTSIZE * scale, length=2.5 * scale, width=0.5 * scale, pad=1.5 * scale
        )
        cb.ax.tick_params(which="minor", length=1.5 * scale, width=0.4 * scale)
        cb.outline.set_linewidth(0.5 * scale)
        scale_name = "log scale" if isinstance(norm, LogNorm) else "linear"
        cb.set_label(f"slope norm ({scale_name})", fontsize=_LABEL_FONTSIZE * scale, labelpad=2.0 * scale)
    elif color_by == "class":
        from matplotlib.patches import Patch

        n = _num_classes(partition)
        classes = np.arange(n)
        if n > 12:  # long class lists: only the classes on screen, at most 12
            present = np.unique(_to_numpy(partition.predicted_class, np.int64))
            classes = present[:12]
        colors = _class_colors(classes, n, class_cmap)
        names = [class_names[c] if class_names is not None and c < len(class_names) else f"class {c}" for c in classes]
        handles = [Patch(facecolor=col, edgecolor=(0, 0, 0, 0.6), linewidth=0.5 * scale) for col in colors]
        fig.legend(
            handles,
            names,
            loc="upper left",
            bbox_to_anchor=(x / W - 2.0 * scale / W, (pb + ph) / H),
            frameon=False,
            fontsize=_TICK_FONTSIZE * scale,
            handlelength=1.2,
            handleheight=1.0,
            borderaxespad=0.0,
            borderpad=0.0,
            labelspacing=0.4,
            handletextpad=0.4,
        )


def _fit(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Copy ``img`` into a white ``(height, width, 3)`` array (guards against off-by-one canvas sizes)."""
    if img.shape[:2] == (height, width):
        return np.ascontiguousarray(img, dtype=np.uint8)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    h, w = min(height, img.shape[0]), min(width, img.shape[1])
    out[:h, :w] = img[:h, :w]
    return out


def save_frame(partition: Partition, path: str | os.PathLike[str], **render_kwargs: Any) -> Path:
    """Render a partition and write it as a PNG, atomically.

    Args:
        partition: The partition to draw.
        path: Destination ``.png`` file; parent folders are created.
        **render_kwargs: Keyword arguments of :func:`render_partition`.

    Returns:
        The written path.
    """
    from PIL import Image  # Pillow is a matplotlib dependency

    path = Path(path)
    img = render_partition(partition, **render_kwargs)
    with _atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")
    return path
