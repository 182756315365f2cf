"""Partition.save/load round trips, the run archive, run-fitted colour scales and re-rendering a run."""

from __future__ import annotations

import zipfile
from pathlib import Path

import imageio.v2 as iio
import matplotlib
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from torch import nn

from splinecam_lightning import Partition, Slice, compute_partition
from splinecam_lightning.archive import (
    archive_path,
    archived_partitions,
    fit_color_range,
    render_run,
    run_color_range,
)
from splinecam_lightning.cli import main as cli_main
from splinecam_lightning.render import _slope_norm

# ---------------------------------------------------------------------------------------------- helpers


def _mlp(seed: int, out_dim: int = 3, width: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(2, width), nn.ReLU(), nn.Linear(width, width), nn.LeakyReLU(0.1), nn.Linear(width, out_dim)
    )


def _assert_same(p: Partition, q: Partition) -> None:
    for f in ("vertices", "counts", "jacobians", "offsets", "boundary", "boundary_regions", "boundary_classes"):
        a, b = getattr(p, f), getattr(q, f)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f
    assert len(p.regions) == len(q.regions) and all(
        torch.equal(a, b) for a, b in zip(p.regions, q.regions, strict=True)
    )
    assert torch.equal(p.areas, q.areas)
    assert torch.equal(p.centroids, q.centroids)
    assert torch.equal(p.predicted_class, q.predicted_class)
    assert p.codes.keys() == q.codes.keys()
    for k in p.codes:
        assert p.codes[k].dtype == q.codes[k].dtype and torch.equal(p.codes[k], q.codes[k]), k
    for f in ("origin", "basis", "domain", "anchors"):
        assert torch.equal(getattr(p.slice, f), getattr(q.slice, f)), f
    assert p.slice.name == q.slice.name
    assert p.seconds == q.seconds


# ---------------------------------------------------------------------------------------------- save / load


def test_round_trip_is_exact_mlp(tmp_path: Path) -> None:
    net = _mlp(0)
    sl = Slice.through_points(
        torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.2]), torch.tensor([0.3, 1.1]), margin=3.0, name="t"
    )
    p = compute_partition(net, sl)
    assert p.num_regions > 20 and p.boundary.shape[0] > 0
    path = p.save(tmp_path / "a" / "p.npz", meta={"step": 7})
    q = Partition.load(path)
    _assert_same(p, q)
    assert q.stats() == p.stats()
    # The loaded maps still are the network's: forward at the centroids equals the stored affine maps.
    x = sl.to_input(q.centroids)
    with torch.no_grad():
        y = net.double()(x)
    torch.testing.assert_close(q.evaluate(q.centroids), y, rtol=1e-9, atol=1e-9)
    assert Partition.load_meta(path) == {"step": 7}
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.npz"]  # atomic: no temp file left
    # A plain compressed .npz: every member deflated, readable by np.load as any other.
    with zipfile.ZipFile(path) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    with np.load(path) as z:
        assert np.array_equal(z["jacobians"], p.jacobians.numpy())


def test_round_trip_is_exact_cnn_with_maxpool_codes(tmp_path: Path) -> None:
    """Max-pool codes are not binary (argmax positions): stored unpacked, still exact."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 4))
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(3, 64, generator=g)
    p = compute_partition(net, Slice.through_points(a, b, c), input_shape=(1, 8, 8))
    assert any(int(code.max()) > 1 for code in p.codes.values())
    q = Partition.load(p.save(tmp_path / "c.npz"))
    _assert_same(p, q)


def test_save_without_codes_and_empty_partition(tmp_path: Path) -> None:
    p = compute_partition(_mlp(2), Slice.from_vertices([[-1, -1], [1, -1], [1, 1], [-1, 1]]))
    small = p.save(tmp_path / "nocodes.npz", codes=False)
    full = p.save(tmp_path / "codes.npz")
    q = Partition.load(small)
    assert q.codes == {} and torch.equal(q.vertices, p.vertices)
    assert small.stat().st_size < full.stat().st_size
    e = Partition(
        slice=p.slice,
        vertices=torch.zeros(0, 3, 2, dtype=torch.float64),
        counts=torch.zeros(0, dtype=torch.long),
        jacobians=torch.zeros(0, 3, 2, dtype=torch.float64),
        offsets=torch.zeros(0, 3, dtype=torch.float64),
    )
    r = Partition.load(e.save(tmp_path / "empty.npz"))
    assert r.num_regions == 0 and r.vertices.shape == (0, 3, 2)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Partition.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a SplineCam partition archive"):
        Partition.load(tmp_path / "other.npz")
    p = compute_partition(_mlp(0), Slice.from_vertices([[-1, -1], [1, -1], [1, 1], [-1, 1]]))
    path = p.save(tmp_path / "p.npz")
    with np.load(path) as z:
        arrays = dict(z)
    arrays["version"] = np.array(99)
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(ValueError, match="version 99"):
        Partition.load(tmp_path / "future.npz")


# ---------------------------------------------------------------------------------------------- archive layout


def test_archive_path_layout_and_listing(tmp_path: Path) -> None:
    assert archive_path(tmp_path, "plane_c0-c1-c2_0", 120) == tmp_path / "plane_c0-c1-c2_0" / "partitions" / (
        "00000120.npz"
    )
    with pytest.raises(ValueError, match="step"):
        archive_path(tmp_path, "s", -1)
    with pytest.raises(ValueError, match="folder name"):
        archive_path(tmp_path, "../x", 0)
    p = compute_partition(_mlp(0), Slice.from_vertices([[-1, -1], [1, -1], [1, 1], [-1, 1]], name="b"))
    for step in (10, 2, 100):
        p.save(archive_path(tmp_path, "b", step))
    (tmp_path / "b" / "partitions" / "notes.txt").write_text("ignored")
    (tmp_path / "empty" / "partitions").mkdir(parents=True)
    runs = archived_partitions(tmp_path)
    assert list(runs) == ["b"]
    assert [s for s, _ in runs["b"]] == [2, 10, 100]
    with pytest.raises(ValueError, match="slice.*nope"):
        archived_partitions(tmp_path, ["nope"])
    with pytest.raises(FileNotFoundError):
        archived_partitions(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- colour range


def test_fit_color_range_is_robust_and_area_weighted() -> None:
    norms = np.concatenate([np.full(99, 1.0), [1e6]])  # one tiny region with a huge slope
    areas = np.concatenate([np.full(99, 1.0), [1e-6]])
    lo, hi = fit_color_range([(norms, areas)], "log")
    assert (lo, hi) == pytest.approx((10**-0.5, 10**0.5))  # the outlier is ignored: a decade around slope 1
    # Every snapshot's bulk stays inside the central 90 % of the colours, whatever its region count.
    a = (np.full(1000, 1.0), np.full(1000, 1.0))
    b = (np.full(10, 100.0), np.full(10, 1.0))
    for scale, f in (("log", np.log), ("linear", lambda x: x)):
        lo, hi = fit_color_range([a, b], scale)
        level = (f(np.array([1.0, 100.0])) - f(lo)) / (f(hi) - f(lo))
        assert level[0] == pytest.approx(0.05) and level[1] == pytest.approx(0.95)
    # Area weighting: a huge slope on 0.4 % of the area is outside the 0.5-99.5 % range, on 2 % it is inside.
    norms = np.array([1.0, 10.0, 1e4])
    lo, hi = fit_color_range([(norms, np.array([49.8, 49.8, 0.4]))], "log")
    assert hi < 100
    lo, hi = fit_color_range([(norms, np.array([49.0, 49.0, 2.0]))], "log")
    assert hi == pytest.approx(1e4)
    assert fit_color_range([], "log") == (1e-3, 1.0)
    with pytest.raises(ValueError, match="scale"):
        fit_color_range([a], "sqrt")


def _growing_run(root: Path, n_steps: int = 11, growth: float = 1e4) -> list[Partition]:
    """Partitions of a net whose weights move and whose slopes grow ``growth``x over the run."""
    a, b = _mlp(0), _mlp(1)
    sl = Slice.from_vertices([[-2.0, -1.0], [2.0, -1.0], [2.0, 1.5], [-2.0, 1.5]], name="grow")
    parts = []
    for i in range(n_steps):
        t = i / (n_steps - 1)
        net = _mlp(0)
        with torch.no_grad():
            for pn, pa, pb in zip(net.parameters(), a.parameters(), b.parameters(), strict=True):
                pn.copy_((1 - t) * pa + t * pb)
            net[-1].weight.mul_(growth**t)
        part = compute_partition(net, sl)
        part.save(archive_path(root, sl.name, 10 * i))
        parts.append(part)
    return parts


def _top_share(part: Partition, color_range: tuple[float, float]) -> float:
    """Share of the plot area whose colour is in the top 5 % of the colour map."""
    norm = _slope_norm(part.slope_norms.numpy(), color_range, "log")
    level = norm(np.maximum(part.slope_norms.numpy(), 1e-300))
    areas = part.areas.numpy()
    return float(areas[level >= 0.95].sum() / areas.sum())


def test_run_range_keeps_final_frame_colourful(tmp_path: Path) -> None:
    parts = _growing_run(tmp_path)
    growth = float(parts[-1].slope_norms.median() / parts[0].slope_norms.median())
    assert growth > 3000  # the run really grows by thousands
    rng = run_color_range(tmp_path)
    assert rng == run_color_range(parts)  # files and partitions agree
    final = parts[-1]
    assert _top_share(final, rng) <= 0.2  # fit_color_range aims at about 0.1; the acceptance bar is 0.5
    # The former default (first snapshot's range with 1000x headroom) saturates that frame.
    first = parts[0].slope_norms
    old = (float(first.min()) / 3.0, float(first.max()) * 1000.0)
    assert _top_share(final, old) > 0.5

    # And on the rendered frame itself: pixels of the plot, matched to the colour map.
    out = render_run(tmp_path, make_videos=False, show_axes=False, show_legend=False, titles=False, show_edges=False)
    frame = iio.imread(out["grow"] / "00000100.png")[..., :3].astype(float)
    lut = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255
    px = frame.reshape(-1, 3)
    dist, idx = cKDTree(lut).query(px)  # nearest colour-map entry of every pixel
    region_px = dist < 4.0  # pixels that are a region's colour (not the boundary or an edge)
    assert region_px.mean() > 0.8
    top = (idx[region_px] >= 243).mean()
    assert top <= 0.5, f"{top:.0%} of the final frame in the top 5 % of the colour map"
    share = np.bincount(idx[region_px], minlength=256) / region_px.sum()
    assert (share >= 0.01).sum() >= 10, share  # a spread of colours, not one wash


# ---------------------------------------------------------------------------------------------- render_run / CLI


def test_render_run_writes_frames_and_videos(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for name, seed in (("plane_c0-c1-c2_0", 0), ("local_c1_0", 1)):
        sl = Slice.from_vertices([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], name=name)
        for step in (0, 5, 10):
            compute_partition(_mlp(seed + step), sl).save(archive_path(run, name, step))
    stale = run / "local_c1_0" / "rendered" / "00000999.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    seen = []
    videos = render_run(run, size_px=128, fps=4, progress=lambda s, i, n: seen.append((s, i, n)))
    assert set(videos) == {"plane_c0-c1-c2_0", "local_c1_0"}
    for name, v in videos.items():
        assert v == run / f"{name}.mp4" and v.stat().st_size > 0
        assert sorted(p.name for p in (run / name / "rendered").iterdir()) == [
            "00000000.png",
            "00000005.png",
            "00000010.png",
        ]
    assert not stale.exists()
    assert seen[-1] == ("plane_c0-c1-c2_0", 3, 3) and len(seen) == 6
    with pytest.raises(ValueError, match="no partition archive"):
        render_run(tmp_path / "run" / "local_c1_0")


def _render(capsys, *args: str) -> str:
    """``splinecam-lightning render ...`` in this process (the CLI's subprocess path is tested in test_cli.py)."""
    rc = cli_main(["render", *args])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    return out


def test_cli_render_makes_a_video(tmp_path: Path, capsys) -> None:
    run = tmp_path / "splinecam"
    _growing_run(run, n_steps=4)
    out = _render(
        capsys, str(run), "--out", str(tmp_path / "again"), "--size", "160", "--fps", "3", "--no-axes",
        "--color-scale", "log", "--no-progress",
    )  # fmt: skip
    video = tmp_path / "again" / "grow.mp4"
    assert str(video) in out
    reader = iio.get_reader(video, format="FFMPEG")
    try:
        frames = [f for f in reader]
    finally:
        reader.close()
    assert len(frames) == 4
    h, w = frames[0].shape[:2]
    assert (h % 16, w % 16) == (0, 0) and w == 160 and h < w  # fitted to the 4 x 2.5 slice
    # Colour by class, frames only: a second rendering of the same archive.
    _render(capsys, str(run), "--color-by", "class", "--no-video", "--size", "128", "--no-progress")
    assert len(list((run / "grow" / "rendered").glob("*.png"))) == 4
    assert not (run / "grow.mp4").exists()
    assert cli_main(["render", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_color_range_tracker_follows_the_run(tmp_path: Path) -> None:
    from splinecam_lightning.archive import ColorRangeTracker

    parts = _growing_run(tmp_path, n_steps=6)
    tracker = ColorRangeTracker("log")
    assert tracker.range is None
    ranges = [tracker.add(p) for p in parts]
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:], strict=False):
        assert b0 <= a0 and b1 >= a1  # only widens: earlier frames keep their meaning
    assert ranges[-1][1] > 100 * ranges[0][1]  # ... and follows the slopes up
    # Each frame, drawn when it was made, is not saturated.
    for i, p in enumerate(parts):
        assert _top_share(p, ranges[i]) <= 0.2
    # The summaries give (nearly) the range fitted to the archive at the end.
    lo, hi = run_color_range(tmp_path)
    fresh = ColorRangeTracker("log", monotone=False)
    for p in parts:
        fresh.add(p)
    assert fresh.range == pytest.approx((lo, hi), rel=0.05) and len(fresh) == len(parts)


def test_cli_render_on_a_callbacks_dirpath(tmp_path: Path, capsys) -> None:
    """The callback archives every snapshot; ``render`` turns its dirpath into a video with another style."""
    from callback_utils import MoonsModule, make_trainer, moons_loader, video_frames

    from splinecam_lightning.callback import SplineCamCallback

    dirpath = tmp_path / "splinecam"
    sl = Slice.box(-1.5, 2.5, -1.0, 1.5, name="moons")
    cb = SplineCamCallback(
        slices=[sl], every_n_train_steps=2, dirpath=dirpath, module="net", frame_size=64, max_overhead=None
    )
    make_trainer(max_steps=4, logger=False, callbacks=[cb]).fit(MoonsModule(), moons_loader())
    assert [s for s, _ in archived_partitions(dirpath)["moons"]] == [0, 2, 4]
    _render(
        capsys, str(dirpath), "--out", str(tmp_path / "restyled"), "--color-by", "class", "--no-axes",
        "--size", "160", "--no-progress",
    )  # fmt: skip
    video = tmp_path / "restyled" / "moons.mp4"
    assert video_frames(video) == 3
