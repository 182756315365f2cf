"""Tests for splinecam_lightning.render: fixed-size Agg rasterisation of hand-built partitions."""

from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path

import imageio.v2 as iio
import matplotlib
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


# Frames without axes and legend: the plot alone, so plane points map to pixels as in ``px``.
BARE = {"show_axes": False, "show_legend": False}


@pytest.mark.parametrize("size", [16, 128, 240])
@pytest.mark.parametrize("title", [None, "step 12"])
def test_shape_and_dtype(size: int, title: str | None) -> None:
    img = render_partition(grid_partition(), size_px=size, title=title, **BARE)
    assert img.shape == (size, size, 3)
    assert img.dtype == np.uint8
    assert img.flags["C_CONTIGUOUS"]
    assert img.std() > 0  # not a blank frame
    # With axes and colour bar the frame keeps its longer side and multiples of 16.
    full = render_partition(grid_partition(), size_px=size, title=title)
    assert full.shape == (*render.frame_shape(grid_partition(), size, title=title is not None), 3)
    assert max(full.shape[:2]) == size and full.shape[0] % 16 == 0 and full.shape[1] % 16 == 0


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
    img = render_partition(P, size_px=size, **BARE).astype(int)
    col = px(0.1, 0.0, size)[1]
    for v in np.linspace(-0.8, 0.8, 9):
        row = px(0.1, v, size)[0]
        band = img[row, col - 2 : col + 3]
        redness = band[:, 0] - np.maximum(band[:, 1], band[:, 2])
        assert redness.max() > 120, (v, band)
    no_b = render_partition(P, size_px=size, show_boundary=False, **BARE).astype(int)
    band = no_b[size // 2, col - 2 : col + 3]
    assert (band[:, 0] - np.maximum(band[:, 1], band[:, 2])).max() < 120


def test_edges_are_drawn_thin() -> None:
    size = 256
    P = grid_partition(n=4, slopes=np.ones(16), boundary_x=None)  # uniform colour: only edges vary
    with_edges = render_partition(P, size_px=size, show_edges=True, **BARE).astype(int)
    without = render_partition(P, size_px=size, show_edges=False, **BARE).astype(int)
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
    with_title = render_partition(P, size_px=size, title="epoch 3", **BARE)
    band = with_title[:20]
    assert (band.min(axis=2) < 100).any()  # dark text pixels in the title band
    untitled = render_partition(P, size_px=size, **BARE)
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
    n_frames, trace_from = 150, 130
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


# ---------------------------------------------------------------------------------------------- readable frames


def _rect_partition(w: float, h: float) -> Partition:
    """Two regions side by side on ``[0, w] x [0, h]`` with slopes 1 and 100."""
    polys = [
        np.array([[0, 0], [w / 2, 0], [w / 2, h], [0, h]], dtype=float),
        np.array([[w / 2, 0], [w, 0], [w, h], [w / 2, h]], dtype=float),
    ]
    V, counts = _pad(polys, K=4)
    J = torch.tensor([[[1.0, 0.0]], [[100.0, 0.0]]], dtype=torch.float64)
    dom = torch.tensor([[0, 0], [w, 0], [w, h], [0, h]], dtype=torch.float64)
    sl = Slice(origin=torch.zeros(2), basis=torch.eye(2), domain=dom)
    return Partition(slice=sl, vertices=V, counts=counts, jacobians=J, offsets=torch.zeros(2, 1, dtype=torch.float64))


def test_frame_follows_the_slice_aspect() -> None:
    wide, tall = _rect_partition(4.0, 2.0), _rect_partition(1.0, 3.0)
    assert render_partition(wide, size_px=512, **BARE).shape == (256, 512, 3)  # no letterbox
    assert render_partition(tall, size_px=192, **BARE).shape == (192, 64, 3)
    for P in (wide, tall):
        h, w = render.frame_shape(P, 512, title=True)
        img = render_partition(P, size_px=512, title="t")
        assert img.shape == (h, w, 3) and max(h, w) == 512 and h % 16 == 0 and w % 16 == 0
    # The plot keeps the domain's aspect: white space is what the axes and colour bar need, not letterboxing.
    img = render_partition(wide, size_px=512)
    white_rows = (img.min(axis=(1, 2)) > 250).mean()
    assert img.shape[0] < 512 * 0.75 and white_rows < 0.15


def test_check_frame_size_is_the_one_check() -> None:
    assert render.check_frame_size(64) == 64
    with pytest.raises(ValueError, match="--size must be a positive multiple of 16"):
        render.check_frame_size(100, "--size")


def test_colour_bar_and_axes() -> None:
    P = _rect_partition(2.0, 2.0)
    img = render_partition(P, size_px=512)
    h, w = img.shape[:2]
    lut = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255
    right = img[:, int(0.8 * w) :].reshape(-1, 3).astype(float)
    d = np.sqrt(((right[:, None] - lut[None]) ** 2).sum(-1))
    hits = np.unique(d.argmin(1)[d.min(1) < 3])
    assert hits.min() < 20 and hits.max() > 235 and hits.size > 150  # a full viridis gradient: the colour bar
    left = img[:, : int(0.08 * w)]
    assert (left.min(axis=2) < 80).sum() > 50  # dark tick labels left of the plot
    bare = render_partition(P, size_px=512, **BARE)
    right = bare[:, int(0.8 * bare.shape[1]) :].reshape(-1, 3).astype(float)
    d = np.sqrt(((right[:, None] - lut[None]) ** 2).sum(-1))
    assert np.unique(d.argmin(1)[d.min(1) < 3]).size < 10  # just the plot's two colours
    # Small frames have no room for decorations: all plot.
    assert render.frame_shape(P, 128) == (128, 128)


def test_class_legend_shows_class_colours() -> None:
    P = halves(1.0, 1.0)
    P.offsets = torch.tensor([[-5.0], [5.0], [-5.0], [5.0]], dtype=torch.float64)
    img = render_partition(P, color_by="class", size_px=512)
    w = img.shape[1]
    legend = img[:, int(0.8 * w) :].reshape(-1, 3).astype(int)
    tab10 = (np.array(matplotlib.colormaps["tab10"].colors) * 255).round()
    for c in (0, 1):
        assert (np.abs(legend - tab10[c]).max(1) <= 3).sum() > 30, c
    assert (np.abs(legend - tab10[2]).max(1) <= 3).sum() == 0


def test_dense_partition_is_not_a_mesh() -> None:
    """90,000 regions on a 512 px frame: edges fade with region size, so colours stay readable."""
    n = 300
    xs = np.linspace(-1.0, 1.0, n + 1)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="xy")
    i, j = i.ravel(), j.ravel()
    V = np.stack(
        [
            np.stack([xs[i], xs[j]], 1),
            np.stack([xs[i + 1], xs[j]], 1),
            np.stack([xs[i + 1], xs[j + 1]], 1),
            np.stack([xs[i], xs[j + 1]], 1),
        ],
        1,
    )
    R = n * n
    slopes = np.exp(np.random.default_rng(0).normal(size=R))
    J = torch.zeros(R, 1, 2, dtype=torch.float64)
    J[:, 0, 0] = torch.tensor(slopes)
    dom = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    P = Partition(
        slice=Slice(origin=torch.zeros(2), basis=torch.eye(2), domain=dom),
        vertices=torch.tensor(V),
        counts=torch.full((R,), 4),
        jacobians=J,
        offsets=torch.zeros(R, 1, dtype=torch.float64),
    )
    with_edges = render_partition(P, size_px=512, **BARE).astype(int)
    without = render_partition(P, size_px=512, show_edges=False, **BARE).astype(int)
    assert np.abs(with_edges - without).mean() < 1.0
    # The same grid coarsened to 10 x 10 cells keeps visible edges.
    sparse = grid_partition(n=10, slopes=np.ones(100), boundary_x=None)
    a = render_partition(sparse, size_px=512, **BARE).astype(int)
    b = render_partition(sparse, size_px=512, show_edges=False, **BARE).astype(int)
    assert np.abs(a - b).sum(2).max() > 60


def test_training_data_overlay() -> None:
    size = 256
    P = grid_partition(n=2, slopes=np.ones(4), boundary_x=None)
    pts = np.array([[-0.5, 0.5], [0.5, -0.5], [3.0, 3.0]])  # the last is outside the domain
    img = render_partition(P, size_px=size, data=pts, data_labels=[1, 3, 0], **BARE).astype(int)
    tab10 = (np.array(matplotlib.colormaps["tab10"].colors) * 255).round()
    assert np.abs(img[px(-0.5, 0.5, size)] - tab10[1]).max() <= 3
    assert np.abs(img[px(0.5, -0.5, size)] - tab10[3]).max() <= 3
    plain = render_partition(P, size_px=size, data=pts[:1], **BARE)
    assert plain[px(-0.5, 0.5, size)].min() > 240  # white without labels
    with pytest.raises(ValueError, match="3 coordinates"):
        render_partition(P, data=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="data_labels"):
        render_partition(P, data=pts, data_labels=[0, 1])


@pytest.mark.parametrize("color_by", ["slope", "class"])
def test_one_polycollection_with_colour_bar_or_legend(monkeypatch: pytest.MonkeyPatch, color_by: str) -> None:
    calls = []
    orig = mcoll.PolyCollection.__init__

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls.append(type(self))
        orig(self, *args, **kwargs)

    monkeypatch.setattr(mcoll.PolyCollection, "__init__", spy)
    # A colour range narrower than the slopes: the colour bar gets extension triangles too.
    render_partition(
        grid_partition(n=10, triangles=True), size_px=512, title="t", color_by=color_by, color_range=(2, 50)
    )
    assert calls == [mcoll.PolyCollection]
