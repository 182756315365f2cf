"""Tests for splinecam_lightning.render: fixed-size Agg rasterisation of hand-built partitions."""

from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path

import imageio.v2 as iio
import matplotlib.collections as mcoll
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.path import Path as MplPath

from splinecam_lightning import render
from splinecam_lightning.partition import Partition
from splinecam_lightning.render import render_partition, save_frame
from splinecam_lightning.slices import Slice

# ---------------------------------------------------------------------------------------------- fixtures


def _pad(polys: list[np.ndarray], K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad polygons to (R, K, 2) by repeating vertex 0, as Partition expects."""
    V = np.zeros((len(polys), K, 2))
    for i, p in enumerate(polys):
        V[i, : len(p)] = p
        V[i, len(p) :] = p[0]
    return torch.tensor(V), torch.tensor([len(p) for p in polys])


def grid_partition(
    n: int = 4,
    slopes: np.ndarray | None = None,
    boundary_x: float | None = 0.1,
    anchors: np.ndarray | None = None,
    triangles: bool = False,
    outputs: int = 1,
) -> Partition:
    """An ``n x n`` grid of squares (or 2 triangles per square) tiling ``[-1, 1]^2``.

    Region ``r`` has Jacobian ``[slopes[r], 0]`` (first output), so ``slope_norms == |slopes|``.
    """
    xs = np.linspace(-1.0, 1.0, n + 1)
    polys = []
    for j in range(n):
        for i in range(n):
            a, b, c, d = (xs[i], xs[j]), (xs[i + 1], xs[j]), (xs[i + 1], xs[j + 1]), (xs[i], xs[j + 1])
            if triangles:
                polys += [np.array([a, b, c]), np.array([a, c, d])]
            else:
                polys.append(np.array([a, b, c, d]))
    V, counts = _pad(polys, K=6)
    R = len(polys)
    if slopes is None:
        slopes = np.arange(1, R + 1, dtype=float)
    J = torch.zeros(R, outputs, 2, dtype=torch.float64)
    J[:, 0, 0] = torch.as_tensor(slopes, dtype=torch.float64)
    off = torch.zeros(R, outputs, dtype=torch.float64)
    if boundary_x is None:
        B = torch.zeros(0, 2, 2, dtype=torch.float64)
    else:
        ys = np.linspace(-1, 1, 5)
        B = torch.tensor([[[boundary_x, ys[k]], [boundary_x, ys[k + 1]]] for k in range(4)], dtype=torch.float64)
    dom = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    sl = Slice(
        origin=torch.zeros(2),
        basis=torch.eye(2),
        domain=dom,
        anchors=torch.zeros(0, 2) if anchors is None else torch.as_tensor(anchors),
    )
    return Partition(slice=sl, vertices=V, counts=counts, jacobians=J, offsets=off, boundary=B)


def halves(left: float, right: float, boundary_x: float | None = None) -> Partition:
    """Two regions: the left and right half of ``[-1, 1]^2`` with the given slopes."""
    P = grid_partition(n=2, slopes=[left, right, left, right], boundary_x=boundary_x)
    return P


def px(u: float, v: float, size: int) -> tuple[int, int]:
    """(row, col) of a plane point for an untitled render of the [-1, 1]^2 domain."""
    return int((1.0 - v) / 2.0 * size), int((u + 1.0) / 2.0 * size)


# ---------------------------------------------------------------------------------------------- render


@pytest.mark.parametrize("size", [16, 128, 240])
@pytest.mark.parametrize("title", [None, "step 12"])
def test_shape_and_dtype(size: int, title: str | None) -> None:
    img = render_partition(grid_partition(), size_px=size, title=title)
    assert img.shape == (size, size, 3)
    assert img.dtype == np.uint8
    assert img.flags["C_CONTIGUOUS"]
    assert img.std() > 0  # not a blank frame


@pytest.mark.parametrize("bad", [0, -16, 100, 513, 12.0, True])
def test_size_must_be_positive_multiple_of_16(bad: object) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        render_partition(grid_partition(), size_px=bad)  # type: ignore[arg-type]


def test_invalid_color_by_names_options() -> None:
    with pytest.raises(ValueError, match="slope.*random.*class"):
        render_partition(grid_partition(), color_by="rainbow")


def test_invalid_color_range() -> None:
    with pytest.raises(ValueError, match="color_range"):
        render_partition(grid_partition(), color_range=(2.0, 1.0))


def test_exactly_one_polycollection(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    orig = mcoll.PolyCollection.__init__

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls.append(type(self))
        orig(self, *args, **kwargs)

    monkeypatch.setattr(mcoll.PolyCollection, "__init__", spy)
    P = grid_partition(n=10, triangles=True)  # 200 regions
    render_partition(P, size_px=64, title="t")
    assert calls == [mcoll.PolyCollection]


def test_draw_builds_one_collection_with_all_regions() -> None:
    P = grid_partition(n=5, triangles=True, anchors=np.array([[0.2, 0.3]]))
    fig = Figure(figsize=(2, 2), dpi=64)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    artists = render._draw(ax, P)
    polys = [c for c in ax.collections if isinstance(c, mcoll.PolyCollection)]
    assert len(polys) == 1 and polys[0] is artists["regions"]
    # One compound path per distinct colour; together their closed sub-polygons are all the regions.
    paths = polys[0].get_paths()
    assert 1 <= len(paths) <= P.num_regions
    closes = sum(int((p.codes == MplPath.CLOSEPOLY).sum()) for p in paths)
    assert closes == P.num_regions
    assert len(polys[0].get_facecolors()) == len(paths)
    assert len(ax.patches) == 0
    assert 0 < polys[0].get_linewidths()[0] < 1  # thin edges, drawn by the collection itself
    lines = [c for c in ax.collections if isinstance(c, mcoll.LineCollection)]
    assert len(lines) == 1 and len(lines[0].get_segments()) == 4
    r, g, b, _ = lines[0].get_colors()[0]
    assert r > 0.8 and g < 0.2 and b < 0.2
    assert len(ax.lines) == 1  # the anchors
    assert ax.get_xlim() == (-1.0, 1.0) and ax.get_ylim() == (-1.0, 1.0)
    assert ax.get_aspect() == 1.0


def test_colours_differ_with_slope() -> None:
    size = 128
    img = render_partition(halves(1.0, 3.0), size_px=size, show_edges=False)
    left = img[px(-0.5, 0.5, size)].astype(int)
    right = img[px(0.5, 0.5, size)].astype(int)
    left_low = img[px(-0.5, -0.5, size)].astype(int)
    assert np.abs(left - right).sum() > 60
    assert np.abs(left - left_low).sum() <= 3  # same slope, same colour


def test_fixed_color_range_is_consistent_across_frames() -> None:
    size = 128
    # Slope 2 is the largest slope of frame A and the smallest of frame B.
    A, B = halves(1.0, 2.0), halves(2.0, 5.0)
    pa, pb = px(0.5, 0.5, size), px(-0.5, 0.5, size)
    fixed_a = render_partition(A, size_px=size, color_range=(0.0, 5.0))[pa].astype(int)
    fixed_b = render_partition(B, size_px=size, color_range=(0.0, 5.0))[pb].astype(int)
    assert np.abs(fixed_a - fixed_b).max() <= 2
    auto_a = render_partition(A, size_px=size)[pa].astype(int)
    auto_b = render_partition(B, size_px=size)[pb].astype(int)
    assert np.abs(auto_a - auto_b).sum() > 60  # without a shared range the colours disagree


def test_boundary_is_red() -> None:
    size = 256
    P = grid_partition(n=4, boundary_x=0.1)
    img = render_partition(P, size_px=size).astype(int)
    col = px(0.1, 0.0, size)[1]
    for v in np.linspace(-0.8, 0.8, 9):
        row = px(0.1, v, size)[0]
        band = img[row, col - 2 : col + 3]
        redness = band[:, 0] - np.maximum(band[:, 1], band[:, 2])
        assert redness.max() > 120, (v, band)
    no_b = render_partition(P, size_px=size, show_boundary=False).astype(int)
    band = no_b[size // 2, col - 2 : col + 3]
    assert (band[:, 0] - np.maximum(band[:, 1], band[:, 2])).max() < 120


def test_edges_are_drawn_thin() -> None:
    size = 256
    P = grid_partition(n=4, slopes=np.ones(16), boundary_x=None)  # uniform colour: only edges vary
    with_edges = render_partition(P, size_px=size, show_edges=True).astype(int)
    without = render_partition(P, size_px=size, show_edges=False).astype(int)
    row = px(0.0, 0.25, size)[0]
    col = px(0.5, 0.0, size)[1]  # grid line at u = 0.5
    diff = np.abs(with_edges[row, col - 3 : col + 4] - without[row, col - 3 : col + 4]).sum(1)
    assert diff.max() > 30  # edge visible
    assert (diff > 30).sum() <= 3  # ... and thin
    assert np.abs(with_edges[row, col - 20] - without[row, col - 20]).sum() <= 3


def test_anchor_marker() -> None:
    size = 128
    P = grid_partition(anchors=np.array([[-0.4, 0.4]]), boundary_x=None)
    on = render_partition(P, size_px=size, show_anchors=True)
    off = render_partition(P, size_px=size, show_anchors=False)
    r, c = px(-0.4, 0.4, size)
    assert on[r, c].min() > 240  # white marker face
    assert np.abs(on[r, c].astype(int) - off[r, c]).sum() > 60


def test_random_colours_are_seeded() -> None:
    P = grid_partition(n=6, slopes=np.ones(36))
    a = render_partition(P, color_by="random", size_px=64, seed=3)
    b = render_partition(P, color_by="random", size_px=64, seed=3)
    c = render_partition(P, color_by="random", size_px=64, seed=4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 5
    # Regions get distinct colours although every slope is the same.
    size = 64
    cells = {tuple(a[px(u, 0.1, size)]) for u in (-0.8, -0.5, -0.1, 0.2, 0.5, 0.8)}
    assert len(cells) == 6


def test_class_colouring() -> None:
    size = 128
    P = halves(1.0, 1.0)
    # Left half predicts class 0, right half class 1: only offsets differ.
    P.offsets = torch.tensor([[-5.0], [5.0], [-5.0], [5.0]], dtype=torch.float64)
    img = render_partition(P, color_by="class", size_px=size, show_edges=False)
    left, right = img[px(-0.5, 0.5, size)], img[px(0.5, 0.5, size)]
    import matplotlib

    tab10 = (np.array(matplotlib.colormaps["tab10"].colors) * 255).round()
    assert np.abs(left - tab10[0]).max() <= 2
    assert np.abs(right - tab10[1]).max() <= 2


def test_title_is_drawn() -> None:
    size = 256
    P = grid_partition(boundary_x=None)
    with_title = render_partition(P, size_px=size, title="epoch 3")
    band = with_title[:20]
    assert (band.min(axis=2) < 100).any()  # dark text pixels in the title band
    untitled = render_partition(P, size_px=size)
    assert (untitled[:20] < 250).any()  # without a title the plot reaches the top
    assert not np.array_equal(with_title, untitled)


def test_long_title_is_shrunk_to_fit() -> None:
    size = 128
    title = "slice_0 | step 123456 | 1234 regions | boundary 3.45 | and a long suffix"
    img = render_partition(grid_partition(boundary_x=None), size_px=size, title=title)
    band = img[:12].min(axis=2)
    assert (band < 128).any()  # the title is there
    assert band[:, :2].min() > 200 and band[:, -2:].min() > 200  # ... and not cut off at the sides


def test_empty_partition_renders() -> None:
    P = grid_partition(n=1)
    E = Partition(
        slice=P.slice,
        vertices=torch.zeros(0, 4, 2, dtype=torch.float64),
        counts=torch.zeros(0, dtype=torch.long),
        jacobians=torch.zeros(0, 1, 2, dtype=torch.float64),
        offsets=torch.zeros(0, 1, dtype=torch.float64),
    )
    img = render_partition(E, size_px=32)
    assert img.shape == (32, 32, 3)


# ---------------------------------------------------------------------------------------------- save_frame


def test_save_frame_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "frame_0001.png"
    got = save_frame(grid_partition(), out, size_px=96, title="x")
    assert got == out and out.exists()
    img = iio.imread(out)
    assert img.shape[:2] == (96, 96)
    np.testing.assert_array_equal(img[..., :3], render_partition(grid_partition(), size_px=96, title="x"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["frame_0001.png"]  # no temp files left


def test_save_frame_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    out = tmp_path / "frame.png"
    save_frame(grid_partition(), out, size_px=32)
    good = out.read_bytes()

    def boom(self, fp, *a, **k):  # noqa: ANN001, ANN002, ANN003
        Path(fp).write_bytes(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_frame(grid_partition(n=3), out, size_px=32)
    assert out.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["frame.png"]


# ---------------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc for RSS")
def test_memory_stays_flat_over_many_frames() -> None:
    P = grid_partition(n=8, triangles=True)  # 128 regions
    n_frames, trace_from = 200, 170
    for i in range(n_frames):
        if i == 50:
            gc.collect()
            rss_mid = _rss_bytes()
        if i == trace_from:
            # tracemalloc slows rendering ~6x, so trace only the last frames; a leaked figure is ~300 kB.
            gc.collect()
            tracemalloc.start()
        render_partition(P, size_px=64, title=f"step {i}", color_range=(0.0, 200.0))
    gc.collect()
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth = _rss_bytes() - rss_mid
    assert traced < 250_000, f"{traced / 1e3:.0f} kB still allocated after {n_frames - trace_from} frames"
    assert rss_growth < 20_000_000, f"RSS grew {rss_growth / 1e6:.1f} MB between frame 50 and {n_frames}"
    assert not [o for o in gc.get_objects() if type(o) is Figure]
