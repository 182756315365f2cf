"""Batched local complexity: every point's statistics equal compute_partition on its own square."""

import math

import numpy as np
import pytest
import torch
from oracles import (
    check_tiling,
    check_vertex_forward,
    edge_boundary_net,
    f64_copy,
    hook_pattern,
    mlp,
    square,
)
from torch import nn

from splinecam_lightning import (
    LocalConfig,
    Slice,
    compute_partition,
    local_complexity,
    log_spaced_steps,
    prepare_model,
    sample_boundary,
)
from splinecam_lightning.boundary import decision_boundary
from splinecam_lightning.local import LOCAL_STAT_KEYS

SINGLE_KEYS = [k for k in LOCAL_STAT_KEYS if k != "crossing_units"]


def _crossing_units(part):
    """Units whose piece is not constant over the partition's regions, summed over layers."""
    return sum(
        int((c.reshape(part.num_regions, -1).amin(0) != c.reshape(part.num_regions, -1).amax(0)).sum())
        for c in part.codes.values()
    )


def check_against_single(lc, model, input_shape=None, exact_checks=2):
    """Point i's statistics are those of compute_partition on slices[i]; the batched regions are exact."""
    m64 = f64_copy(model)
    for i, sl in enumerate(lc.slices):
        part = compute_partition(model, sl, input_shape=input_shape)
        st = part.stats(pieces=False)
        assert int(lc.num_regions[i]) == part.num_regions, i
        for k in SINGLE_KEYS:
            a, b = float(getattr(lc, k)[i]), st[k]
            assert a == pytest.approx(b, rel=1e-9, abs=1e-12), (i, k, a, b)
        assert int(lc.crossing_units[i]) == _crossing_units(part), i
        # The batched regions of point i, as a Partition: same areas, and exact against the real model.
        mine = lc.partition(i)
        assert mine.slice is sl
        np.testing.assert_allclose(np.sort(mine.areas.numpy()), np.sort(part.areas.numpy()), rtol=1e-9, atol=1e-15)
        if i < exact_checks:
            check_tiling(mine, sl, n_probe=300)
            check_vertex_forward(mine, m64, sl, input_shape=input_shape)


def test_mlp_far_apart_points_matches_compute_partition():
    model = mlp([12, 24, 24, 3], seed=0)
    pts = 5.0 * torch.randn(6, 12, generator=torch.Generator().manual_seed(1))  # squares far from each other
    lc = local_complexity(model, pts, 3.0, generator=torch.Generator().manual_seed(2))
    assert len(lc) == 6 and lc.num_regions.shape == (6,) and lc.mean_area.dtype == torch.float64
    assert int(lc.num_regions.max()) > 5
    check_against_single(lc, model)


def test_overlapping_squares_in_2d():
    """2D inputs: all squares live in the same plane and overlap (one point is repeated, rotated differently)."""
    model = mlp([2, 16, 16, 2], seed=3)
    big = compute_partition(model, Slice.from_vertices(square(4.0)))
    x0 = sample_boundary(big, 1, generator=torch.Generator().manual_seed(0))[0].float()
    pts = x0 + torch.tensor([[0.0, 0.0], [0.1, -0.2], [0.0, 0.0], [0.3, 0.2]])
    lc = local_complexity(model, pts, 0.5, generator=torch.Generator().manual_seed(0))
    assert float(lc.boundary_length.sum()) > 0  # the class boundary crosses some squares
    # The repeated point gets two differently oriented squares of the same 2D neighbourhood.
    assert not torch.allclose(lc.slices[0].basis, lc.slices[2].basis)
    check_against_single(lc, model)


def test_slices_are_slice_around_in_order():
    model = mlp([5, 8, 1], seed=0)
    pts = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    lc = local_complexity(model, pts, 0.5, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    for i in range(3):
        ref = Slice.around(pts[i], 0.5, generator=g)
        assert torch.equal(lc.slices[i].basis, ref.basis) and torch.equal(lc.slices[i].origin, ref.origin.double())


@pytest.mark.parametrize("radius", [1e-90, 1e-6, 0.5, 3.0, 1e90])
@pytest.mark.parametrize("dim", [2, 7])
def test_slice_around_passes_the_constructor_checks(radius, dim):
    """Slice.around skips the constructor's checks: its slice is what the checked constructor makes."""
    s = Slice.around(torch.randn(dim, generator=torch.Generator().manual_seed(1)), radius)
    ref = Slice(**s.state_dict())
    for k in ("origin", "basis", "domain", "anchors"):
        a, b = getattr(s, k), getattr(ref, k)
        assert a.dtype == b.dtype == torch.float64 and torch.equal(a, b), k
    assert s.area == pytest.approx(4 * radius * radius)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten()
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_cnn_with_maxpool_matches_compute_partition():
    torch.manual_seed(0)
    model = SmallCNN()
    pts = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    lc = local_complexity(model, pts, 0.6, generator=torch.Generator().manual_seed(2), sampled=True)
    assert lc.slices[0].input_dim == 36
    assert int(lc.num_regions.min()) > 1
    assert any("MaxPool" in k or k == "body.2" for k in lc.units_exact)
    check_against_single(lc, model, input_shape=(1, 6, 6))


class Residual(nn.Module):
    def __init__(self, d: int = 6, w: int = 10) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.inp = nn.Linear(d, w)
        self.f = nn.Sequential(nn.ReLU(), nn.Linear(w, w), nn.LeakyReLU(0.1), nn.Linear(w, w))
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(w, 2))

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.f(h))


def test_residual_net_matches_compute_partition():
    model = Residual()
    pts = torch.randn(5, 6, generator=torch.Generator().manual_seed(5))
    lc = local_complexity(model, pts, 2.0, generator=torch.Generator().manual_seed(6))
    assert int(lc.num_regions.min()) > 1
    check_against_single(lc, model)


def _near_zero_level(model, d, n, seed):
    """``n`` points scattered (0.05) around a point where the single-output ``model`` is 0 (bisection)."""
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(256, d, generator=g)
    with torch.no_grad():
        y = model(x)[:, 0]
    a, b = x[int(torch.nonzero(y > 0)[0])], x[int(torch.nonzero(y <= 0)[0])]
    for _ in range(60):
        m = (a + b) / 2
        with torch.no_grad():
            a, b = (m, b) if float(model(m[None])[0, 0]) > 0 else (a, m)
    return a + 0.05 * torch.randn(n, d, generator=g)


def test_radius_per_point_keeps_each_squares_tolerances():
    """Different radii: the engine scales each slice to a common extent; results are in each slice's units."""
    model = mlp([8, 20, 20, 1], seed=2)
    pts = _near_zero_level(model, 8, 4, seed=3)
    radii = [0.3, 1.7, 0.05, 3.1]
    lc = local_complexity(model, pts, radii, generator=torch.Generator().manual_seed(4))
    for i, r in enumerate(radii):
        assert lc.slices[i].area == pytest.approx(4 * r * r)
        assert float(lc.mean_area[i] * lc.num_regions[i]) == pytest.approx(4 * r * r, rel=1e-9)
    assert float(lc.boundary_length.sum()) > 0
    check_against_single(lc, model)


def test_boundary_along_region_edges_per_square():
    """y = relu(z) - relu(-z) = z: the zero line is a region edge, found by edge matching, which must run per
    square (the 2D squares overlap in one plane)."""
    m = edge_boundary_net()
    pts = torch.tensor([[0.0, 0.0], [-0.1, 0.05], [5.0, 5.0], [0.2, -0.3]])
    lc = local_complexity(m, pts, 1.0, generator=torch.Generator().manual_seed(0))
    single = [compute_partition(m, s).stats(pieces=False)["boundary_length"] for s in lc.slices]
    assert single[2] == 0 and min(single[:2]) > 1.0
    np.testing.assert_allclose(lc.boundary_length.numpy(), single, rtol=1e-9, atol=1e-12)
    assert lc.num_regions.tolist() == [2.0, 2.0, 1.0, 2.0]


def test_sampled_units_against_forward_hooks():
    """Sampled count = units whose sign differs among the 4 corners (brute force with hooks); first layer equals
    the exact crossing count, deeper layers are bounded by it."""
    model = mlp([10, 16, 16, 16, 2], seed=7)
    pts = torch.randn(5, 10, generator=torch.Generator().manual_seed(8))
    lc = local_complexity(model, pts, 1.0, generator=torch.Generator().manual_seed(9), sampled=True)
    m64 = f64_copy(model)
    layers = list(lc.units_sampled)
    assert layers == list(lc.units_exact) and len(layers) == 3
    widths = [0, 16, 32, 48]
    for i, sl in enumerate(lc.slices):
        pat = hook_pattern(m64, sl, sl.domain)  # (4, 48) signs at the corners
        for j, name in enumerate(layers):
            p = pat[:, widths[j] : widths[j + 1]]
            assert int(lc.units_sampled[name][i]) == int((p != p[:1]).any(0).sum()), (i, name)
    first = layers[0]
    assert torch.equal(lc.units_sampled[first], lc.units_exact[first])
    for name in layers:
        assert bool((lc.units_sampled[name] <= lc.units_exact[name]).all())
    assert torch.equal(lc.sampled_units, sum(lc.units_sampled.values()))
    assert "sampled_units" in lc.summary()


def test_summary_and_stats():
    model = mlp([4, 10, 1], seed=0)
    pts = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    lc = local_complexity(model, pts, 1.0, generator=torch.Generator().manual_seed(1))
    s = lc.summary()
    v = lc.num_regions
    assert s["num_regions"]["mean"] == pytest.approx(float(v.mean()))
    assert s["num_regions"]["median"] == pytest.approx(float(np.median(v.numpy())))
    assert s["num_regions"]["std"] == pytest.approx(float(v.numpy().std()))
    flat = lc.summary(flat=True)
    assert flat["num_regions"] == s["num_regions"]["mean"] and flat["num_regions_std"] == s["num_regions"]["std"]
    assert set(lc.stats()) == set(LOCAL_STAT_KEYS)
    assert lc.seconds > 0


def test_points_per_pass_gives_the_same_result():
    model = mlp([6, 16, 16, 2], seed=1)
    pts = torch.randn(7, 6, generator=torch.Generator().manual_seed(2))
    a = local_complexity(model, pts, 1.5, generator=torch.Generator().manual_seed(3))
    b = local_complexity(model, pts, 1.5, generator=torch.Generator().manual_seed(3), points_per_pass=3)
    assert torch.equal(a.num_regions, b.num_regions) and torch.equal(a.crossing_units, b.crossing_units)
    for k in ("mean_area", "mean_eccentricity", "boundary_length", "boundary_regions", "mean_slope_norm"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), rtol=1e-12, atol=1e-15)
    pa, pb = a.partition(6), b.partition(6)
    torch.testing.assert_close(pa.areas.sort().values, pb.areas.sort().values, rtol=1e-12, atol=1e-15)
    assert pa.boundary.shape == pb.boundary.shape
    with pytest.raises(ValueError, match="points_per_pass"):
        local_complexity(model, pts, 1.5, points_per_pass=0)


def test_prepared_model_and_image_points():
    torch.manual_seed(0)
    model = SmallCNN()
    prep = prepare_model(model, input_shape=(1, 6, 6))
    pts = torch.rand(2, 36, generator=torch.Generator().manual_seed(1))  # flat points, shape from prep
    a = local_complexity(prep, pts, 0.3, generator=torch.Generator().manual_seed(2))
    b = local_complexity(model, pts.reshape(2, 1, 6, 6), 0.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.num_regions, b.num_regions)


def test_bad_input_errors():
    model = mlp([4, 6, 1], seed=0)
    with pytest.raises(ValueError, match="shape"):
        local_complexity(model, torch.randn(4), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        local_complexity(model, torch.full((2, 4), math.nan), 1.0)
    with pytest.raises(ValueError, match="one per point"):
        local_complexity(model, torch.randn(3, 4), [1.0, 2.0])
    with pytest.raises(ValueError, match="radius"):
        local_complexity(model, torch.randn(2, 4), -1.0)
    with pytest.raises(ValueError, match="input_shape"):
        local_complexity(model, torch.randn(2, 4), 1.0, input_shape=(5,))
    with pytest.raises(ValueError, match="max_memory"):
        local_complexity(model, torch.randn(2, 4), 1.0, max_memory=-5)


def test_log_spaced_steps():
    s = log_spaced_steps(10_000, 20)
    assert s[0] == 0 and s[-1] == 10_000 and s == sorted(set(s)) and len(s) <= 20
    gaps = np.diff(s)
    assert gaps[-1] > 100 * gaps[0]  # dense early, sparse late
    assert log_spaced_steps(0, 5) == [0]
    assert log_spaced_steps(5, 50) == [0, 1, 2, 3, 4, 5]


def test_local_config_validation():
    cfg = LocalConfig(radius=0.5, count=64, splits=["val"])
    assert cfg.splits == ("val",) and cfg.sampled is False
    with pytest.raises(ValueError, match="radius"):
        LocalConfig(radius=0.0, count=4)
    with pytest.raises(ValueError, match="count"):
        LocalConfig(radius=1.0, count=0)
    with pytest.raises(ValueError, match="splits"):
        LocalConfig(radius=1.0, count=4, splits=("test",))
    with pytest.raises(ValueError, match="points"):
        LocalConfig(radius=1.0, count=4, splits=("train",), points={"val": torch.zeros(2, 2)})


def test_decision_boundary_groups_keep_overlapping_partitions_apart():
    """Two copies of one partition in the same coordinates: edge matching must not pair regions across them."""
    m = edge_boundary_net()
    slc = Slice.from_vertices(square(1.5))
    p = compute_partition(m, slc)
    R = p.num_regions
    two = [torch.cat([t, t]) for t in (p.vertices, p.counts, p.jacobians, p.offsets)]
    groups = torch.arange(2).repeat_interleave(R)
    seg, reg, _ = decision_boundary(*two, slc.domain.abs().amax(0), groups=groups)
    length = (seg[:, 1] - seg[:, 0]).norm(dim=1)
    ref = float((p.boundary[:, 1] - p.boundary[:, 0]).norm(dim=1).sum())
    for g in range(2):
        assert float(length[groups[reg] == g].sum()) == pytest.approx(ref, rel=1e-12)


def test_memory_budget_chunks_keep_each_regions_square(monkeypatch):
    """The engine's depth-first chunks (forced small here) carry each region's square through: same result."""
    from splinecam_lightning import MemoryBudgetError, engine

    torch.manual_seed(0)
    model = SmallCNN()
    pts = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    full = local_complexity(model, pts, 0.6, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(engine, "WORK_BYTES", 1 << 15)
    small = local_complexity(model, pts, 0.6, generator=torch.Generator().manual_seed(2), max_memory=1 << 22)
    assert torch.equal(small.num_regions, full.num_regions) and torch.equal(small.crossing_units, full.crossing_units)
    for k in ("mean_area", "mean_eccentricity", "boundary_length", "mean_slope_norm"):
        torch.testing.assert_close(getattr(small, k), getattr(full, k), rtol=1e-9, atol=1e-12)
    with pytest.raises(MemoryBudgetError, match="memory budget"):
        local_complexity(model, pts, 0.6, max_memory=1 << 10)
