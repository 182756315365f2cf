"""Exactness of the partition against brute force: tiling, one pattern per region, vertices, dense grid."""

import numpy as np
import pytest
import torch
from oracles import (
    check_grid,
    check_interior_forward,
    check_one_pattern,
    check_tiling,
    check_vertex_forward,
    f64_copy,
    full_exactness,
    hook_pattern,
    mlp,
    square,
)
from torch import nn

from splinecam_lightning import Slice, compute_partition

SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "widths,r",
    [([2, 16, 1], 1.0), ([2, 16, 16, 1], 1.0), ([2, 24, 24, 24, 1], 2.0), ([2, 32, 32, 2], 1.5)],
)
def test_mlp_tiling_patterns_vertices(widths, r, seed):
    model = mlp(widths, seed)
    slc = Slice.from_vertices(square(r))
    part = compute_partition(model, slc)
    assert part.num_regions > 1
    full_exactness(part, f64_copy(model), slc, grid=120)


@pytest.mark.parametrize("seed", SEEDS)
def test_deep_narrow_net(seed):
    """2 -> 16 x 6 -> 1: deep layers, where float32 vertex construction produces wrong thin regions."""
    model = mlp([2] + [16] * 6 + [1], seed)
    slc = Slice.from_vertices(square(2.0))
    part = compute_partition(model, slc)
    m64 = f64_copy(model)
    check_tiling(part, slc)
    check_vertex_forward(part, m64, slc)
    centre = check_one_pattern(part, m64, slc)
    check_grid(part, m64, slc, n=200, region_patterns=centre)


def _tiny_region_net(seed, spread=1e-6, sliver=1e-7):
    """First-layer lines that nearly meet at one point, plus near-parallel pairs: tiny and thin regions."""
    g = torch.Generator().manual_seed(seed)
    n = 10
    ang = torch.rand(n, generator=g, dtype=torch.float64) * np.pi
    W = torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    p0 = torch.tensor([0.13, -0.21], dtype=torch.float64)
    b = -(W @ p0) + spread * torch.randn(n, generator=g, dtype=torch.float64)
    # near-parallel slivers: duplicate 4 lines shifted by ``sliver``
    W2 = W[:4] * (1 + 1e-3 * torch.randn(4, 1, generator=g, dtype=torch.float64))
    b2 = b[:4] * (1 + 1e-3 * torch.randn(4, generator=g, dtype=torch.float64)) + sliver
    W = torch.cat([W, W2])
    b = torch.cat([b, b2])
    model = nn.Sequential(nn.Linear(2, 14), nn.ReLU(), nn.Linear(14, 12), nn.ReLU(), nn.Linear(12, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(W)
        model[0].bias.copy_(b)
        torch.manual_seed(seed)
        model[2].weight.normal_()
        model[2].bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("seed", SEEDS)
def test_tiny_and_thin_regions(seed):
    model = _tiny_region_net(seed)
    slc = Slice.from_vertices(square(1.0))
    part = compute_partition(model, slc)
    areas = check_tiling(part, slc)
    assert areas.min() < 1e-10, "the crafted net should produce tiny regions"
    m64 = f64_copy(model)
    check_vertex_forward(part, m64, slc)
    check_one_pattern(part, m64, slc)
    check_grid(part, m64, slc, n=150)


@pytest.mark.parametrize("seed", SEEDS)
def test_zoomed_slice_on_tiny_regions_matches(seed):
    """The same tiny-region net partitioned on a small window around the near-concurrency point."""
    model = _tiny_region_net(seed)
    slc = Slice.from_vertices(square(3e-6, center=(0.13, -0.21)))
    part = compute_partition(model, slc)
    assert part.num_regions > 5
    full_exactness(part, f64_copy(model), slc, grid=150)


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_model_float64_inside(seed):
    """A float32 model still gets float64-exact vertices (original SplineCam errs by ~1e-7)."""
    model = mlp([2, 32, 32, 32, 32, 1], seed)
    assert next(model.parameters()).dtype == torch.float32
    slc = Slice.from_vertices(square(2.0))
    part = compute_partition(model, slc)
    for t in (part.vertices, part.jacobians, part.offsets, part.areas):
        assert t.dtype == torch.float64
    err = check_vertex_forward(part, f64_copy(model), slc, rtol=1e-9)
    assert err < 1e-9
    check_one_pattern(part, f64_copy(model), slc)


@pytest.mark.parametrize("seed", [0, 1])
def test_high_dim_slices(seed):
    """784-dim input on a through_points slice, and a randomly oriented ``around`` slice."""
    model = mlp([784, 32, 32, 10], seed)
    g = torch.Generator().manual_seed(seed)
    a, b, c = torch.rand(3, 784, generator=g)
    for slc in (
        Slice.through_points(a, b, c, margin=0.3),
        Slice.around(a, radius=3.0, generator=torch.Generator().manual_seed(seed)),
    ):
        part = compute_partition(model, slc)
        assert part.num_regions > 1
        full_exactness(part, f64_copy(model), slc, grid=100)


@pytest.mark.parametrize("seed", SEEDS)
def test_nonsquare_domain(seed):
    """A convex pentagon domain given with a repeated closing vertex."""
    model = mlp([2, 16, 16, 1], seed)
    V = torch.tensor([[-1.0, -0.7], [0.9, -1.1], [1.3, 0.4], [0.1, 1.2], [-1.2, 0.6], [-1.0, -0.7]])
    slc = Slice.from_vertices(V)
    part = compute_partition(model, slc)
    full_exactness(part, f64_copy(model), slc, grid=120)


def _assert_codes_are_brute_force(part, model, slc):
    """Each region's activation pattern is the one forward pre-hooks record at its vertex mean (every call of a
    module, in call order)."""
    cents = np.vstack([r.numpy().mean(0)[None] for r in part.regions])
    brute = hook_pattern(f64_copy(model), slc, cents)
    eng = part.activation_pattern().numpy().astype(np.int64)
    assert eng.shape == brute.shape
    assert np.array_equal(eng, brute)


@pytest.mark.parametrize("seed", SEEDS)
def test_engine_codes_match_brute_force(seed):
    """For a plain ReLU MLP the engine's activation pattern is the brute-force one (input > 0)."""
    model = mlp([2, 12, 12, 1], seed)
    slc = Slice.from_vertices(square(1.0))
    part = compute_partition(model, slc)
    _assert_codes_are_brute_force(part, model, slc)
    for name, c in part.codes.items():
        assert c.dtype == torch.int8 and c.shape[0] == part.num_regions, name


class _SharedActivation(nn.Module):
    """One ReLU module called after each hidden layer (a common way to write a network)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(2, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.out(self.act(self.b(self.act(self.a(x)))))


class _InPlaceBlock(nn.Module):
    """A torchvision-style residual block: one ``ReLU(inplace=True)`` called twice, ``out += identity``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b, self.out = nn.Linear(2, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.stem(x)
        out = self.relu(self.a(h))
        out = self.b(out)
        out += h
        self.relu(out)  # in place, result not assigned
        return self.out(out)


@pytest.mark.parametrize("cls, keys", [(_SharedActivation, ["act:0", "act:1"]), (_InPlaceBlock, ["relu:0", "relu:1"])])
def test_a_module_called_twice_keeps_the_codes_of_both_calls(cls, keys):
    """Codes are keyed per call (``act:0``, ``act:1``): one key per module would keep only the last call's; an
    in-place ReLU whose second result is not assigned still changes the tensor read next."""
    torch.manual_seed(0)
    model = cls()
    slc = Slice.from_vertices(square(2.0))
    part = compute_partition(model, slc)
    assert list(part.codes) == keys
    full_exactness(part, f64_copy(model), slc, grid=100)  # one distinct pattern per region, every call counted
    _assert_codes_are_brute_force(part, model, slc)


@pytest.mark.parametrize("seed", SEEDS)
def test_locate_and_evaluate(seed):
    model = mlp([2, 16, 16, 3], seed)
    slc = Slice.from_vertices(square(1.0))
    part = compute_partition(model, slc)
    g = torch.Generator().manual_seed(seed)
    uv = torch.rand(500, 2, generator=g, dtype=torch.float64) * 2 - 1
    r = part.locate(uv)
    assert (r >= 0).all()
    y = part.evaluate(uv, r)
    from oracles import forward

    y_true = forward(f64_copy(model), slc, uv)
    assert torch.allclose(y, y_true, rtol=0, atol=1e-10 * (1 + y_true.abs().max()))
    out = part.locate(torch.tensor([[5.0, 5.0], [-1.5, 0.0]], dtype=torch.float64))
    assert (out == -1).all()


def _lines_net(center, r, seed, n=20):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(n, generator=g, dtype=torch.float64) * np.pi
    W = torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    c = torch.tensor(center, dtype=torch.float64)
    b = -(W @ c) + (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * r * 0.9
    m = nn.Sequential(nn.Linear(2, n), nn.ReLU(), nn.Linear(n, 1)).double()
    with torch.no_grad():
        m[0].weight.copy_(W)
        m[0].bias.copy_(b)
    return m


SCALES = [((0.0, 0.0), 1e-6), ((0.3, 0.3), 1e-4), ((1e5, 1e5), 1.0), ((0.0, 0.0), 1e3), ((-2e3, 1e3), 1e-3)]


@pytest.mark.parametrize("center,r", SCALES)
def test_exact_at_any_scale_and_position(center, r):
    """Tiny, huge and far-away domains with lines crossing them: exact count and exactness checks."""
    from oracles import arrangement_count, plane_lines

    m = _lines_net(center, r, 0)
    slc = Slice.from_vertices(square(r, center=center))
    A, c = plane_lines(m[0].weight.detach(), m[0].bias.detach(), slc)
    expected, *_ = arrangement_count(A, c, slc.domain.numpy())
    part = compute_partition(m, slc)
    assert part.num_regions == expected
    full_exactness(part, m, slc, grid=100)


@pytest.mark.parametrize("center,r", SCALES)
def test_locate_at_any_scale_and_position(center, r):
    """locate() must return a region that contains the point, whatever the domain's size and position."""
    from oracles import forward, grid_in_domain, inside_margin, region_list

    m = _lines_net(center, r, 0)
    slc = Slice.from_vertices(square(r, center=center))
    part = compute_partition(m, slc)
    pts, keep, _ = grid_in_domain(slc, 50)
    pts = pts[keep]
    loc = part.locate(torch.as_tensor(pts)).numpy()
    assert (loc >= 0).all()
    regs = region_list(part)
    marg = np.array([inside_margin(regs[k], p[None])[0] for k, p in zip(loc, pts, strict=True)])
    assert (marg >= -1e-9 * r).all(), f"{int((marg < -1e-9 * r).sum())} of {len(pts)} points located in a wrong region"
    y = forward(m, slc, pts).numpy()
    ya = part.evaluate(torch.as_tensor(pts), torch.as_tensor(loc)).numpy()
    assert np.abs(y - ya).max() <= 1e-9 * (1 + np.abs(y).max())
    outside = torch.as_tensor(np.array(center) + np.array([[1.01 * r, 0.0], [0.0, -1.01 * r]]))
    assert (part.locate(outside) == -1).all()


class _PlaneInHyperplane(nn.Module):
    """Units ``s (x0 + x1 + x2 - 1)`` (zero on the plane through the three unit vectors) and a unit that is not,
    as a Linear layer, ``F.linear`` or a 1x1 convolution over the three inputs as channels."""

    def __init__(self, s: float, how: str) -> None:
        super().__init__()
        w = torch.tensor([[s, s, s], [2 * s, 2 * s, 2 * s], [-s, -s, -s], [1.0, -0.5, 0.25]], dtype=torch.float64)
        b = torch.tensor([-s, -2 * s, s, 0.1], dtype=torch.float64)
        self.how = how
        self.lin = nn.Linear(3, 4).double()
        self.conv = nn.Conv2d(3, 4, 1).double()
        with torch.no_grad():
            self.lin.weight.copy_(w), self.lin.bias.copy_(b)
            self.conv.weight.copy_(w[:, :, None, None]), self.conv.bias.copy_(b)
        self.out = nn.Linear(4, 1).double()

    def forward(self, x):
        if self.how == "linear":
            h = self.lin(x)
        elif self.how == "functional":
            h = nn.functional.linear(x, self.lin.weight, self.lin.bias)
        else:
            h = self.conv(x[:, :, None, None]).flatten(1)
        return self.out(torch.relu(h))


@pytest.mark.parametrize("how", ["linear", "functional", "conv"])
@pytest.mark.parametrize("s", [0.7, 1.1, 1 / 3])
def test_units_zero_on_the_whole_slice_do_not_cut_it(s, how):
    # In float64 those units come out as +-1e-16 on the slice: rounding noise, which must not make a line.
    slc = Slice.through_points([1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0])
    net = _PlaneInHyperplane(s, how)
    part = compute_partition(net, slc)
    # The only line is the fourth unit's: it crosses the triangle's domain (values of both signs at its corners).
    with torch.no_grad():
        z = net.lin(slc.to_input(slc.domain))
    assert z[:, 3].min() < 0 < z[:, 3].max() and z[:, :3].abs().max() < 1e-15
    assert part.num_regions == 2
    # (the brute-force patterns would see the same noise: tiling and the forward pass are checked instead)
    check_tiling(part, slc)
    check_interior_forward(part, f64_copy(net), slc)


def _nearly_in_plane(which: str, k: float, seed: int, n: int = 100):
    """``Linear(n, 2), ReLU, Linear``: unit 0 nearly parallel to the slice, its ``u`` slope (``"slope"``) or its
    slopes and offset (``"offset"``) ``k`` times the worst-case rounding of their sums: provably not noise."""
    g = torch.Generator().manual_seed(seed)
    u = 2.0**-53
    basis, _ = torch.linalg.qr(torch.randn(n, 2, generator=g, dtype=torch.float64))
    b0, b1 = basis[:, 0].contiguous(), basis[:, 1].contiguous()
    origin = 10 * torch.randn(n, generator=g, dtype=torch.float64)
    slc = Slice(origin=origin, basis=torch.stack([b0, b1]), domain=square(1.0))
    w = torch.randn(n, generator=g, dtype=torch.float64)
    w = w - (w @ b0) * b0 - (w @ b1) * b1
    bound = [(n + 2) * u * float(w.abs() @ v.abs()) for v in (b0, b1, origin)]
    w = w + k * bound[0] * b0 + (0.7 * k * bound[1] * b1 if which == "offset" else 0.0)
    bias = -float(w @ origin)
    if which == "offset":
        bias += 0.3 * k * (bound[2] + (n + 2) * u * abs(bias))
    w2 = torch.randn(n, generator=g, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(n, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.stack([w, w2]))
        net[0].bias.copy_(torch.tensor([bias, -float(w2 @ origin) + 0.3 * float(w2 @ b0)], dtype=torch.float64))
    return net, slc


@pytest.mark.parametrize("which, k, seed", [("slope", 4.0, 1), ("offset", 12.0, 0)])
def test_units_nearly_in_the_slice_keep_their_real_lines(which, k, seed):
    """Their lines are decided in exact rational arithmetic on the float64 weights and slice."""
    from fractions import Fraction

    from splinecam_lightning import geometry

    net, slc = _nearly_in_plane(which, k, seed)
    part = compute_partition(net, slc)
    rows = [[Fraction(float(x)) for x in t] for t in (slc.basis[0], slc.basis[1], slc.origin)]
    coef = []
    for i in range(2):
        w = [Fraction(float(x)) for x in net[0].weight[i].detach()]
        a, b, c = (sum(p * q for p, q in zip(w, r, strict=True)) for r in rows)
        coef.append((a, b, c + Fraction(float(net[0].bias[i].detach()))))
    grid = (np.arange(40) + 0.5 + 0.1234567 * np.sqrt(2)) / 40 * 2 - 1
    pts = np.array([(a, b) for a in grid for b in grid if a < 1 and b < 1])
    where = geometry.locate_points(part.vertices, part.counts, torch.as_tensor(pts)).numpy()
    seen: dict[int, set] = {}
    for (a, b), r in zip(pts, where, strict=True):
        fa, fb = Fraction(float(a)), Fraction(float(b))
        seen.setdefault(int(r), set()).add(tuple(x * fa + y * fb + z > 0 for x, y, z in coef))
    assert all(len(p) == 1 for p in seen.values())  # one exact pattern per region
    assert part.num_regions == len(set().union(*seen.values()))  # and one region per pattern
