"""Fast, fixed-size rasterisation of a :class:`~splinecam_lightning.partition.Partition`.

Frames are drawn with matplotlib's object API on an Agg canvas (never ``pyplot``), so rendering works
headless, in worker threads, and leaves no figure in a global registry. All regions go into a single
``PolyCollection``: one draw call whatever the number of regions.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
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

if TYPE_CHECKING:  # import only for annotations: keeps this module importable on its own
    from splinecam_lightning.partition import Partition

__all__ = ["COLOR_BY_OPTIONS", "render_partition", "save_frame"]

COLOR_BY_OPTIONS = ("slope", "random", "class")

# A power of two: size_px / _DPI is exact in binary floating point, so the canvas is exactly size_px wide.
_DPI = 128
# Sizes (points) are tuned for 512 px frames and scaled linearly, so a frame looks the same at any size.
_REF_PX = 512.0
_EDGE_LW = 0.3
_BOUNDARY_LW = 1.4
_ANCHOR_SIZE = 6.0
_TITLE_FONTSIZE = 10.0


def _to_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """Detached CPU numpy copy of a tensor or array-like."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _get_cmap(cmap: str | Colormap) -> Colormap:
    return cmap if isinstance(cmap, Colormap) else matplotlib.colormaps[cmap]


def _check_size(size_px: int) -> int:
    if isinstance(size_px, bool) or not isinstance(size_px, (int, np.integer)):
        raise ValueError(f"size_px must be a positive integer multiple of 16, got {size_px!r}")
    if size_px <= 0 or size_px % 16:
        # H.264 encoders work on 16x16 macro blocks; other sizes would be rescaled or padded in the video.
        raise ValueError(f"size_px must be a positive multiple of 16, got {size_px}")
    return int(size_px)


def _region_colors(
    partition: Partition,
    color_by: str,
    color_range: Sequence[float] | None,
    cmap: str | Colormap,
    class_cmap: str | Colormap,
    seed: int,
    color_scale: str = "linear",
) -> np.ndarray:
    """``(R, 4)`` RGBA face colour of every region."""
    R = partition.num_regions
    if color_by == "slope":
        values = _to_numpy(partition.slope_norms)
        if color_range is not None:
            vmin, vmax = (float(v) for v in color_range)
            if not (np.isfinite(vmin) and np.isfinite(vmax) and vmin <= vmax):
                raise ValueError(f"color_range must be finite (vmin, vmax) with vmin <= vmax, got {color_range}")
        elif R:
            vmin, vmax = float(values.min()), float(values.max())
        else:
            vmin, vmax = 0.0, 1.0
        if color_scale == "log":
            # Slope norms span orders of magnitude over training; zero slopes clip to the bottom colour.
            tiny = np.finfo(np.float64).tiny
            if vmin <= 0:  # keep a fixed range fixed: derive the floor from vmax, not from this frame
                vmin = vmax * 1e-6 if vmax > 0 else 1e-12
            vmax = max(vmax, vmin * (1 + 1e-9))
            return _get_cmap(cmap)(LogNorm(vmin=vmin, vmax=vmax, clip=True)(np.maximum(values, tiny)))
        if color_scale != "linear":
            raise ValueError(f"color_scale must be 'linear' or 'log', got {color_scale!r}")
        if vmax == vmin:
            # Normalize maps a zero-width range to 0; centre it instead so a constant frame is mid-colormap.
            vmin, vmax = vmin - 0.5, vmax + 0.5
        return _get_cmap(cmap)(Normalize(vmin=vmin, vmax=vmax, clip=True)(values))
    if color_by == "random":
        rng = np.random.default_rng(seed)
        palette = 0.15 + 0.8 * rng.random((256, 3))  # avoid near-black faces, which would hide the edges
        rgb = palette[rng.integers(0, len(palette), R)]
        return np.concatenate([rgb, np.ones((R, 1))], axis=1)
    if color_by == "class":
        classes = _to_numpy(partition.predicted_class, np.int64)
        cm = _get_cmap(class_cmap)
        if isinstance(cm, ListedColormap):
            # Categorical maps: integer input indexes the colour list directly.
            return cm(classes % cm.N)
        n_classes = max(2, partition.output_dim)
        return cm(classes / (n_classes - 1))
    raise ValueError(f"color_by must be one of {COLOR_BY_OPTIONS}, got {color_by!r}")


def _compound_paths(verts: np.ndarray, faces: np.ndarray) -> tuple[tuple[list, list], np.ndarray]:
    """One compound path per distinct face colour, built without a Python loop over regions.

    Colours come from a 256-entry colormap (or a 256-colour palette), so a frame has at most a few hundred
    paths however many regions it shows; matplotlib would otherwise build one Path object per region. The
    padded ``(R, K, 2)`` array needs no trimming: padding repeats vertex 0, adding only zero-length edges.
    """
    R, K, _ = verts.shape if verts.ndim == 3 else (0, 1, 2)
    if R == 0:
        return ([], []), np.zeros((0, 4))
    colors, group = np.unique(faces, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    closed = np.concatenate([verts[order], verts[order][:, :1]], axis=1).reshape(-1, 2)  # (R*(K+1), 2)
    one = np.full(K + 1, MplPath.LINETO, dtype=MplPath.code_type)
    one[0], one[-1] = MplPath.MOVETO, MplPath.CLOSEPOLY
    codes = np.tile(one, R)
    bounds = np.cumsum(np.bincount(group, minlength=len(colors)))[:-1] * (K + 1)
    return (np.split(closed, bounds), np.split(codes, bounds)), colors


def _domain_limits(partition: Partition) -> tuple[float, float, float, float]:
    dom = _to_numpy(partition.slice.domain)
    (x0, y0), (x1, y1) = dom.min(0), dom.max(0)
    return float(x0), float(x1), float(y0), float(y1)


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
    color_scale: str = "linear",
) -> dict[str, Any]:
    """Draw a partition onto existing axes.

    Args:
        ax: Axes to draw on; its limits and aspect are set to the slice domain.
        partition: The partition to draw.
        color_by: See :func:`render_partition`.
        color_range: See :func:`render_partition`.
        show_edges: Draw thin region edges.
        show_boundary: Draw the decision boundary.
        show_anchors: Draw the slice anchors.
        cmap: Colormap for ``"slope"``.
        class_cmap: Colormap for ``"class"``.
        seed: Seed for ``"random"``.
        scale: Multiplier for line widths and marker sizes (points).

    Returns:
        The created artists: ``"regions"`` (the one ``PolyCollection``), ``"boundary"`` (``LineCollection`` or
        ``None``), ``"anchors"`` (``Line2D`` or ``None``).

    Raises:
        ValueError: Unknown ``color_by`` or an invalid ``color_range``.
    """
    if color_by not in COLOR_BY_OPTIONS:
        raise ValueError(f"color_by must be one of {COLOR_BY_OPTIONS}, got {color_by!r}")
    faces = _region_colors(partition, color_by, color_range, cmap, class_cmap, seed, color_scale)

    if show_edges:
        edges: Any = (0.0, 0.0, 0.0, 0.6)
        lw = _EDGE_LW * scale
    else:
        # Stroke each face in its own colour so antialiasing leaves no hairline seams between regions.
        edges, lw = "face", _EDGE_LW * scale
    regions = PolyCollection([], closed=True, edgecolors=edges, linewidths=lw, zorder=1)
    paths, colors = _compound_paths(_to_numpy(partition.vertices), faces)
    regions.set_verts_and_codes(*paths)
    regions.set_facecolor(colors)
    ax.add_collection(regions, autolim=False)

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

    x0, x1, y0, y1 = _domain_limits(partition)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal", adjustable="box")
    ax.set_axis_off()
    return {"regions": regions, "boundary": boundary, "anchors": anchors}


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
    cmap: str | Colormap = "viridis",
    class_cmap: str | Colormap = "tab10",
    seed: int = 0,
    color_scale: str = "linear",
) -> np.ndarray:
    """Rasterise a partition to a square RGB image.

    Args:
        partition: The partition to draw.
        color_by: ``"slope"`` colours regions by the Frobenius norm of their Jacobian
            (:attr:`Partition.slope_norms`); ``"random"`` gives each region a random colour from a numpy
            generator seeded with ``seed``; ``"class"`` colours by :attr:`Partition.predicted_class`.
        size_px: Width and height of the image in pixels; a positive multiple of 16 (H.264 macro blocks).
        color_range: ``(vmin, vmax)`` of the slope colour scale. Pass the same range for every frame of a
            video so colours are comparable across frames; by default the frame's own min/max is used.
        title: Text drawn above the plot; ``None`` leaves the whole frame to the plot.
        show_edges: Draw thin region edges.
        show_boundary: Draw the decision boundary in red.
        show_anchors: Draw the slice's anchor points.
        cmap: Colormap (name or object) for ``"slope"``.
        class_cmap: Colormap for ``"class"``; a categorical (listed) map is indexed by class.
        seed: Seed for ``"random"`` colours.
        color_scale: ``"linear"`` or ``"log"`` mapping of slope norms to colours (``"slope"`` only).

    Returns:
        ``(size_px, size_px, 3)`` uint8 RGB array.

    Raises:
        ValueError: ``size_px`` not a positive multiple of 16, unknown ``color_by``, or an invalid
            ``color_range``.
    """
    size_px = _check_size(size_px)
    if color_by not in COLOR_BY_OPTIONS:
        raise ValueError(f"color_by must be one of {COLOR_BY_OPTIONS}, got {color_by!r}")
    scale = size_px / _REF_PX

    fig = Figure(figsize=(size_px / _DPI, size_px / _DPI), dpi=_DPI, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    try:
        top = 1.0
        if title is not None:
            fontsize = _TITLE_FONTSIZE * scale
            # Reserve ~1.8 line heights (points -> pixels -> figure fraction) for the title band.
            top = 1.0 - min(0.3, 1.8 * fontsize * _DPI / 72.0 / size_px)
            text = fig.text(0.5, 1.0 - 0.2 * (1.0 - top), str(title), ha="center", va="top", fontsize=fontsize)
            # Long titles (slice | step | regions | ...) would be clipped at the frame edge: shrink to fit.
            # Text width is not exactly linear in font size (hinting), so re-measure a few times.
            for _ in range(3):
                width = text.get_window_extent(renderer=canvas.get_renderer()).width
                if width <= 0.94 * size_px:
                    break
                text.set_fontsize(text.get_fontsize() * 0.92 * size_px / width)
        ax = fig.add_axes((0.0, 0.0, 1.0, top))
        _draw(
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
        )
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
        rgb = _fit(rgba[..., :3], size_px)
    finally:
        # Break the figure <-> canvas <-> artist cycles now rather than waiting for the cyclic GC.
        fig.clear()
        del canvas, fig
    return rgb


def _fit(img: np.ndarray, size_px: int) -> np.ndarray:
    """Copy ``img`` into a white ``(size_px, size_px, 3)`` array (guards against off-by-one canvas sizes)."""
    if img.shape[:2] == (size_px, size_px):
        return np.ascontiguousarray(img, dtype=np.uint8)
    out = np.full((size_px, size_px, 3), 255, dtype=np.uint8)
    h, w = min(size_px, img.shape[0]), min(size_px, img.shape[1])
    out[:h, :w] = img[:h, :w]
    return out


def _new_file_mode() -> int:
    """Permissions a plain ``open()`` would give a new file (mkstemp makes 0600 files)."""
    # Read the umask from /proc: os.umask() would change it process-wide, racing other threads' file writes.
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    return 0o644


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path`` with ``os.replace``.

    The temporary name starts with a dot and does not keep the final suffix, so frame globs such as ``*.png``
    never pick up a half-written file. On error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


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
