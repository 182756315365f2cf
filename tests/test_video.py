"""Tests for splinecam_lightning.video: H.264 encoding of frame folders and stats plots."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as iio
import numpy as np
import pytest
import torch

from splinecam_lightning import video
from splinecam_lightning.partition import Partition
from splinecam_lightning.render import save_frame
from splinecam_lightning.slices import Slice
from splinecam_lightning.video import make_video, plot_stats


def _write_frames(folder: Path, images: list[np.ndarray], names: list[str] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"frame_{i:04d}.png" for i in range(len(images))]
    paths = []
    for name, img in zip(names, images, strict=True):
        iio.imwrite(folder / name, img)
        paths.append(folder / name)
    return paths


def _grey(h: int, w: int, level: int) -> np.ndarray:
    return np.full((h, w, 3), level, dtype=np.uint8)


def _read_video(path: Path) -> tuple[list[np.ndarray], dict]:
    reader = iio.get_reader(path)
    try:
        meta = reader.get_meta_data()
        frames = [np.asarray(f) for f in reader]
    finally:
        reader.close()
    return frames, meta


def test_make_video_roundtrip(tmp_path: Path) -> None:
    frames_dir = tmp_path / "frames"
    levels = [20, 80, 140, 200, 250]
    _write_frames(frames_dir, [_grey(64, 96, v) for v in levels])
    out = make_video(frames_dir, tmp_path / "out.mp4", fps=5)
    assert out == tmp_path / "out.mp4" and out.stat().st_size > 0
    frames, meta = _read_video(out)
    assert len(frames) == len(levels)
    assert frames[0].shape == (64, 96, 3)
    assert tuple(meta["size"]) == (96, 64)
    assert meta["fps"] == pytest.approx(5.0)
    assert meta["codec"].startswith("h264")
    assert meta["pix_fmt"].startswith("yuv420p")
    # Frame order and content survive encoding (lossy, so compare loosely).
    np.testing.assert_allclose([f.mean() for f in frames], levels, atol=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "out.mp4"]  # no temp files left


def test_frames_sorted_by_name_numerically(tmp_path: Path) -> None:
    frames_dir = tmp_path / "f"
    # Written out of order, and with unpadded numbers: step_10 must come after step_9.
    _write_frames(
        frames_dir,
        [_grey(32, 32, 200), _grey(32, 32, 40), _grey(32, 32, 120)],
        names=["step_10.png", "step_1.png", "step_9.png"],
    )
    (frames_dir / "notes.txt").write_text("not a frame")
    (frames_dir / ".step_11.png.abc.tmp").write_bytes(b"half-written")
    frames, _ = _read_video(make_video(frames_dir))
    np.testing.assert_allclose([f.mean() for f in frames], [40, 120, 200], atol=4)


def test_default_out_path(tmp_path: Path) -> None:
    frames_dir = tmp_path / "run" / "slice_a"
    _write_frames(frames_dir, [_grey(16, 16, 0), _grey(16, 16, 255)])
    out = make_video(frames_dir)
    assert out == tmp_path / "run" / "slice_a.mp4"
    assert out.exists()


def test_odd_sizes_are_padded_not_rescaled(tmp_path: Path) -> None:
    frames_dir = tmp_path / "frames"
    small = np.zeros((30, 50, 3), dtype=np.uint8)  # black, 50 wide x 30 high
    big = np.zeros((40, 70, 3), dtype=np.uint8)
    _write_frames(frames_dir, [small, big])
    frames, meta = _read_video(make_video(frames_dir, tmp_path / "v.mp4"))
    assert len(frames) == 2
    assert tuple(meta["size"]) == (80, 48)  # largest (70 x 40) rounded up to multiples of 16
    for f in frames:
        assert f.shape == (48, 80, 3)
    f0, f1 = (f.astype(int) for f in frames)
    # The small frame keeps its pixels at the top-left (not stretched); the rest is white padding.
    assert f0[2:26, 2:46].mean() < 20
    assert f0[34:, :].mean() > 235 and f0[:, 56:].mean() > 235
    assert f1[2:36, 2:66].mean() < 20
    assert f1[:, 74:].mean() > 235


def test_rgba_and_grey_frames(tmp_path: Path) -> None:
    frames_dir = tmp_path / "frames"
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    grey = np.full((32, 32), 128, dtype=np.uint8)
    _write_frames(frames_dir, [rgba, grey])
    frames, _ = _read_video(make_video(frames_dir))
    r, g, b = frames[0].reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60
    assert abs(frames[1].mean() - 128) < 6


def test_empty_folder_raises(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no frames found"):
        make_video(tmp_path / "empty")
    _write_frames(tmp_path / "jpgs", [_grey(16, 16, 0)], names=["a.jpg"])
    with pytest.raises(ValueError, match="no frames found"):
        make_video(tmp_path / "jpgs")  # default pattern is *.png
    with pytest.raises(FileNotFoundError):
        make_video(tmp_path / "missing")


def test_bad_fps(tmp_path: Path) -> None:
    _write_frames(tmp_path / "f", [_grey(16, 16, 0)])
    with pytest.raises(ValueError, match="fps"):
        make_video(tmp_path / "f", fps=0)


def test_failed_encode_keeps_previous_video(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames_dir = tmp_path / "frames"
    _write_frames(frames_dir, [_grey(32, 32, v) for v in (0, 100, 200)])
    out = make_video(frames_dir, tmp_path / "good.mp4")
    good = out.read_bytes()

    real_imread = iio.imread
    calls = {"n": 0}

    def flaky_imread(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("frame vanished")
        return real_imread(*args, **kwargs)

    monkeypatch.setattr(iio, "imread", flaky_imread)
    with pytest.raises(RuntimeError, match="frame vanished"):
        make_video(frames_dir, out)
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "good.mp4"]


def test_video_from_rendered_frames(tmp_path: Path) -> None:
    dom = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    sl = Slice(origin=torch.zeros(2), basis=torch.eye(2), domain=dom)
    left = [[-1.0, -1.0], [0.0, -1.0], [0.0, 1.0], [-1.0, 1.0]]
    right = [[0.0, -1.0], [1.0, -1.0], [1.0, 1.0], [0.0, 1.0]]
    for step in range(3):
        P = Partition(
            slice=sl,
            vertices=torch.tensor([left, right], dtype=torch.float64),
            counts=torch.tensor([4, 4]),
            jacobians=torch.tensor([[[1.0, 0.0]], [[1.0 + step, 0.0]]], dtype=torch.float64),
            offsets=torch.zeros(2, 1, dtype=torch.float64),
        )
        save_frame(P, tmp_path / "frames" / f"step_{step:05d}.png", size_px=64, title=f"step {step}")
    frames, meta = _read_video(make_video(tmp_path / "frames", fps=2))
    assert len(frames) == 3
    assert tuple(meta["size"]) == (64, 64)


# ---------------------------------------------------------------------------------------------- plot_stats

HISTORY = [
    {
        "step": s,
        "num_regions": 10.0 + 3 * s,
        "mean_area": 1.0 / (1 + s),
        "mean_eccentricity": 2.0,
        "boundary_length": 0.5 * s,
        "slice": "a",
    }
    for s in range(0, 50, 5)
]


def test_plot_stats_writes_png(tmp_path: Path) -> None:
    out = plot_stats(HISTORY, tmp_path / "plots" / "stats.png")
    assert out == tmp_path / "plots" / "stats.png"
    img = iio.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 5  # something was drawn
    assert [p.name for p in out.parent.iterdir()] == ["stats.png"]


def test_plot_stats_one_panel_per_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    seen = {}
    real_savefig = Figure.savefig

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen["titles"] = [ax.get_title() for ax in self.axes if ax.get_visible()]
        seen["points"] = [len(ax.lines[0].get_xdata()) for ax in self.axes if ax.get_visible()]
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    plot_stats(HISTORY, tmp_path / "all.png")
    # Non-numeric entries ("slice") are skipped; keys keep first-seen order.
    assert seen["titles"] == ["num_regions", "mean_area", "mean_eccentricity", "boundary_length"]
    assert seen["points"] == [len(HISTORY)] * 4
    history = [*HISTORY, {"step": 60, "num_regions": 300.0}]  # a partial entry
    plot_stats(history, tmp_path / "two.png", keys=["boundary_length", "num_regions"])
    assert seen["titles"] == ["boundary_length", "num_regions"]
    assert seen["points"] == [len(HISTORY), len(HISTORY) + 1]


def test_plot_stats_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_stats([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="step"):
        plot_stats([{"num_regions": 3.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="nope"):
        plot_stats(HISTORY, tmp_path / "x.png", keys=["nope"])
    assert not (tmp_path / "x.png").exists()


def test_module_exports() -> None:
    assert set(video.__all__) == {"make_video", "plot_stats"}


def test_written_files_get_normal_permissions(tmp_path) -> None:
    import os
    import stat

    from splinecam_lightning.render import _atomic_path

    out = tmp_path / "f.bin"
    with _atomic_path(out) as tmp:
        tmp.write_bytes(b"x")
    probe = tmp_path / "probe"
    probe.write_bytes(b"y")  # what a plain open() gives under the current umask
    assert stat.S_IMODE(os.stat(out).st_mode) == stat.S_IMODE(os.stat(probe).st_mode)
