"""Turn a folder of rendered frames into an H.264 video (or a GIF), and plot partition statistics over training."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from splinecam_lightning.render import _atomic_path

__all__ = ["make_video", "plot_stats"]

_MACRO_BLOCK = 16
#: Output suffixes :func:`make_video` writes: containers of the bundled ffmpeg, and animated GIF.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv")
GIF_SUFFIX = ".gif"


def _natural_key(path: Path) -> list[Any]:
    """File-name sort key putting ``step_9`` before ``step_10`` (plain order when names are zero-padded)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _round_up(n: int, m: int = _MACRO_BLOCK) -> int:
    return -(-n // m) * m


def _as_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, 3)`` view of a grey, RGB or RGBA image (alpha is dropped: frames are opaque)."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating):
            img = np.clip(np.rint(img * 255.0), 0, 255)
        elif img.dtype == np.uint16:
            img = img >> 8
        img = img.astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img[:, :, :3]


def _pad(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad on the bottom/right with white to ``(height, width, 3)``; the content is never rescaled."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return np.ascontiguousarray(img)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    out[:h, :w] = img
    return out


def make_video(
    frames_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    fps: float = 8,
    pattern: str = "*.png",
) -> Path:
    """Encode the frames in a folder as an H.264 (yuv420p) mp4 with imageio-ffmpeg's bundled ffmpeg, or as a GIF.

    Frames are taken in file-name order (numbers inside names compare as numbers, so zero padding is
    optional); hidden files are skipped. Every frame is padded with white on the bottom/right, never
    rescaled, to the largest frame size rounded up to a multiple of 16, as the encoder's macro blocks require.

    Args:
        frames_dir: Folder holding the frames.
        out_path: Output file; defaults to ``<frames_dir>/../<frames_dir name>.mp4``. Its suffix picks the format:
            ``.mp4`` (also ``.m4v``, ``.mov``, ``.mkv``) for H.264, ``.gif`` for an animated GIF (looping,
            written with Pillow; much larger than the mp4).
        fps: Frames per second.
        pattern: Glob selecting the frames inside ``frames_dir``.

    Returns:
        The path of the written video. It is written to a temporary file first and moved into place, so a
        failure never replaces an existing good video with a partial one.

    Raises:
        FileNotFoundError: ``frames_dir`` is not a folder.
        ValueError: No frames match ``pattern``, ``fps`` is not positive, or the output suffix is not a format
            listed above.
    """
    import imageio.v2 as iio
    from PIL import Image

    frames_dir = Path(frames_dir).resolve()
    if not frames_dir.is_dir():
        raise FileNotFoundError(f"frames folder {frames_dir} does not exist")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps}")
    frames = sorted(
        (p for p in frames_dir.glob(pattern) if p.is_file() and not p.name.startswith(".")), key=_natural_key
    )
    if not frames:
        raise ValueError(f"no frames found in {frames_dir} matching {pattern!r}")
    out = Path(out_path) if out_path is not None else frames_dir.parent / f"{frames_dir.name}.mp4"
    suffix = out.suffix.lower()
    if suffix not in (*VIDEO_SUFFIXES, GIF_SUFFIX):
        raise ValueError(
            f"cannot write a video named {out.name}: use a {', '.join(VIDEO_SUFFIXES)} suffix (H.264) or {GIF_SUFFIX}"
        )

    # Only headers are read here, so sizing the video costs no decoding.
    sizes = []
    for p in frames:
        with Image.open(p) as im:
            sizes.append(im.size)  # (width, height)
    width = _round_up(max(w for w, _ in sizes))
    height = _round_up(max(h for _, h in sizes))

    if suffix == GIF_SUFFIX:
        with _atomic_path(out) as tmp:
            # GIF frames are palette images: Pillow quantises each frame; durations are in milliseconds.
            rgb = [_pad(_as_rgb(iio.imread(p)), height, width) for p in frames]
            iio.mimwrite(tmp, rgb, format="GIF", duration=1000.0 / fps, loop=0)
        return out

    with _atomic_path(out) as tmp:
        # The temporary name has no .mp4 suffix, so name the container explicitly via a suffixed sibling.
        tmp_mp4 = tmp.with_name(tmp.name + suffix)
        try:
            writer = iio.get_writer(
                tmp_mp4,
                format="FFMPEG",
                mode="I",
                fps=fps,
                codec="libx264",
                pixelformat="yuv420p",
                macro_block_size=_MACRO_BLOCK,
                quality=8,
                ffmpeg_log_level="error",
            )
            try:
                for p in frames:
                    writer.append_data(_pad(_as_rgb(iio.imread(p)), height, width))
            finally:
                writer.close()
            os.replace(tmp_mp4, tmp)
        finally:
            if tmp_mp4.exists():
                tmp_mp4.unlink()
    return out


def plot_stats(
    history: Sequence[Mapping[str, Any]],
    out_path: str | os.PathLike[str],
    keys: Sequence[str] | None = None,
    log_x: Sequence[str] = (),
) -> Path:
    """Plot partition statistics against training step, one small panel per statistic, as a PNG.

    Args:
        history: One mapping per logged step, each with a ``"step"`` and float statistics (e.g.
            ``num_regions``, ``mean_area``, ``mean_eccentricity``, ``boundary_length``). A statistic missing
            from some entries is left out at those steps.
        out_path: Destination PNG (written atomically; parent folders are created).
        keys: Statistics to plot, in order; defaults to every numeric key except ``"step"``, in first-seen
            order.
        log_x: Statistics whose panel has a log step axis (symmetric log, so step 0 stays on it): training
            dynamics such as local complexity unfold on a log time axis.

    Returns:
        The written path.

    Raises:
        ValueError: Empty history, an entry without ``"step"``, or no plottable statistic.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    for i, h in enumerate(history):
        if "step" not in h:
            raise ValueError(f"history entry {i} has no 'step'")
    if keys is None:
        keys = []
        for h in history:
            for k, v in h.items():
                if k != "step" and k not in keys and _is_number(v):
                    keys.append(k)
    keys = list(keys)
    missing = [k for k in keys if not any(k in h for h in history)]
    if missing:
        raise ValueError(f"keys not found in history: {missing}")
    if not keys:
        raise ValueError("history holds no numeric statistics to plot")

    ncols = min(3, len(keys))
    nrows = -(-len(keys) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.4 * nrows), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    try:
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, key in zip(axes[: len(keys)], keys, strict=True):
            pts = sorted((float(h["step"]), float(h[key])) for h in history if key in h and _is_number(h[key]))
            steps = [s for s, _ in pts]
            vals = [v for _, v in pts]
            ax.plot(steps, vals, marker="o", markersize=2.5, linewidth=1.2)
            ax.set_title(key, fontsize=9)
            if key in log_x:
                ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlabel("step (log)" if key in log_x else "step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
        for ax in axes[len(keys) :]:
            ax.set_visible(False)
        out = Path(out_path)
        with _atomic_path(out) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        fig.clear()
        del canvas, fig
    return out


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    return isinstance(v, (int, float, np.integer, np.floating))
