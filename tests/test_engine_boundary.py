"""Decision boundary, boundary sampling, trailing output transforms and statistics, against brute force."""

import math

import numpy as np
import pytest
import torch
from oracles import (
    domain_np,
    edge_boundary_net,
    f64_copy,
    forward,
    grid_in_domain,
    inside_margin,
    mlp,
    region_list,
    seg_point_dist,
    square,
)
from torch import nn

from splinecam_lightning import Slice, compute_partition, sample_boundary


def _label(y):
    y = np.asarray(y)
    return (y[:, 0] > 0).astype(int) if y.shape[1] == 1 else y.argmax(1)


def centred(model, slc, input_shape=None):
    """Shift the last layer's bias by the median output on the domain, so that a boundary crosses it."""
    pts, keep, _ = grid_in_domain(slc, 60)
    y = forward(f64_copy(model), slc, pts[keep], input_shape)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias.sub_(y.median(0).values.to(last.bias.dtype))
    return model


def check_boundary(part, m64, slc, input_shape=None, grid=250):
    S = np.asarray(part.boundary, dtype=np.float64)
    E = S.shape[0]
    assert S.shape == (E, 2, 2)
    assert E > 0, "expected a non-empty decision boundary"
    D = domain_np(slc)
    diam = float(np.ptp(D, axis=0).max())
    O = part.output_dim
    cls = np.asarray(part.boundary_classes)
    assert cls.shape == (E, 2)
    # segments lie in the domain and inside their region
    assert inside_margin(D, S.reshape(-1, 2)).min() >= -1e-9 * diam
    regs = region_list(part)
    br = np.asarray(part.boundary_regions)
    assert br.shape == (E,)
    for e in range(E):
        assert inside_margin(regs[br[e]], S[e]).min() >= -1e-9 * diam, f"segment {e} leaves its region"
    # the output is 0 (single) or the two classes tie at the top (multi) on the segments
    pts = np.vstack([S[:, 0], S[:, 1], S.mean(1)])
    y = forward(m64, slc, pts, input_shape).numpy()
    gpts, keep, _ = grid_in_domain(slc, 40)
    yscale = 1.0 + np.abs(forward(m64, slc, gpts[keep], input_shape).numpy()).max()
    c3 = np.tile(cls, (3, 1))
    if O == 1:
        assert (cls == np.array([0, 1])).all()
        assert np.abs(y[:, 0]).max() <= 1e-9 * yscale, np.abs(y[:, 0]).max()
    else:
        ya = y[np.arange(len(y)), c3[:, 0]]
        yb = y[np.arange(len(y)), c3[:, 1]]
        assert np.abs(ya - yb).max() <= 1e-9 * yscale
        assert (y.max(1) - np.maximum(ya, yb)).max() <= 1e-9 * yscale, "boundary between classes not on top"
    # the label changes across each segment
    d = S[:, 1] - S[:, 0]
    L = np.linalg.norm(d, axis=1)
    ok = L > 1e-12 * diam
    nrm = np.stack([-d[ok, 1], d[ok, 0]], 1) / L[ok, None]
    mid = S[ok].mean(1)
    eps = 1e-7 * diam
    lp = _label(forward(m64, slc, mid + eps * nrm, input_shape).numpy())
    lm = _label(forward(m64, slc, mid - eps * nrm, input_shape).numpy())
    assert (lp != lm).all(), f"{int((lp == lm).sum())} of {int(ok.sum())} segments do not separate labels"
    pair = np.sort(np.stack([lp, lm], 1), 1)
    assert (pair == np.sort(cls[ok], 1)).all(), "boundary_classes do not match the labels on either side"
    # a fine grid sees no label change away from the boundary
    pts, keep, (shape, us, vs) = grid_in_domain(slc, grid)
    h = max(us[1] - us[0], vs[1] - vs[0])
    lab = np.full(len(pts), -1)
    lab[keep] = _label(forward(m64, slc, pts[keep], input_shape).numpy())
    lab = lab.reshape(shape)
    kp = keep.reshape(shape)
    P = pts.reshape(*shape, 2)
    mids = []
    for a, b in (
        ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
        ((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
    ):
        chg = kp[a] & kp[b] & (lab[a] != lab[b])
        mids.append(0.5 * (P[a][chg] + P[b][chg]))
    mids = np.vstack(mids)
    if len(mids):
        dist = np.concatenate([seg_point_dist(mids[s : s + 500], S).min(1) for s in range(0, len(mids), 500)])
        assert dist.max() <= 1.5 * h, f"grid label change {dist.max() / h:.2f} cells away from any boundary segment"
    return S


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("widths", [[2, 16, 1], [2, 24, 24, 1], [2, 16, 16, 16, 1]])
def test_single_output_boundary(widths, seed):
    slc = Slice.from_vertices(square(1.5))
    model = centred(mlp(widths, seed), slc)
    part = compute_partition(model, slc)
    check_boundary(part, f64_copy(model), slc)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_out", [3, 10])
def test_multiclass_boundary(n_out, seed):
    slc = Slice.from_vertices(square(2.0))
    model = centred(mlp([2, 24, 24, n_out], seed), slc)
    part = compute_partition(model, slc)
    S = check_boundary(part, f64_copy(model), slc)
    assert S.shape[0] > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_boundary_high_dim(seed):
    model = mlp([784, 32, 32, 10], seed)
    g = torch.Generator().manual_seed(seed)
    a, b, c = torch.rand(3, 784, generator=g)
    slc = Slice.through_points(a, b, c, margin=0.3)
    centred(model, slc)
    part = compute_partition(model, slc)
    check_boundary(part, f64_copy(model), slc, grid=150)


def test_no_boundary_when_sign_constant():
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[2].weight.abs_()
        model[2].bias.fill_(0.5)  # output >= 0.5 everywhere
    part = compute_partition(model, Slice.from_vertices(square(1.0)))
    assert part.boundary.shape == (0, 2, 2)
    assert part.stats()["boundary_length"] == 0


# ------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("n_out", [1, 4])
def test_sample_boundary_on_boundary_and_reproducible(n_out):
    slc = Slice.from_vertices(square(1.5))
    model = centred(mlp([2, 24, 24, n_out], 3), slc)
    part = compute_partition(model, slc)
    x1 = sample_boundary(part, 300, generator=torch.Generator().manual_seed(7))
    x2 = sample_boundary(part, 300, generator=torch.Generator().manual_seed(7))
    x3 = sample_boundary(part, 300, generator=torch.Generator().manual_seed(8))
    assert x1.shape == (300, 2)
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, x3)
    y = f64_copy(model)(x1.to(torch.float64)).detach().numpy()
    scale = 1 + np.abs(y).max()
    if n_out == 1:
        assert np.abs(y).max() <= 1e-9 * scale
    else:
        top2 = np.sort(y, 1)[:, -2:]
        assert np.abs(top2[:, 1] - top2[:, 0]).max() <= 1e-9 * scale
    uv = slc.to_plane(x1.to(torch.float64)).numpy()
    assert seg_point_dist(uv, part.boundary.numpy()).min(1).max() < 1e-9


def test_sample_boundary_uniform_by_length():
    slc = Slice.from_vertices(square(1.5))
    model = centred(mlp([2, 24, 24, 1], 5), slc)
    part = compute_partition(model, slc)
    S = part.boundary.numpy()
    L = np.linalg.norm(S[:, 1] - S[:, 0], axis=1)
    n = 20000
    x = sample_boundary(part, n, generator=torch.Generator().manual_seed(0))
    uv = slc.to_plane(x.to(torch.float64)).numpy()
    seg = np.concatenate([seg_point_dist(uv[s : s + 1000], S).argmin(1) for s in range(0, n, 1000)])
    # split segments into 4 groups of about equal total length; sample counts must follow length
    cum = np.cumsum(L) / L.sum()
    grp = np.minimum((cum - 1e-12) * 4, 3.999).astype(int)
    frac_len = np.array([L[grp == k].sum() for k in range(4)]) / L.sum()
    frac_smp = np.array([(grp[seg] == k).mean() for k in range(4)])
    assert np.abs(frac_len - frac_smp).max() < 0.03, (frac_len, frac_smp)


def test_sample_boundary_high_dim_input_space():
    model = mlp([784, 16, 16, 3], 0)
    g = torch.Generator().manual_seed(1)
    a, b, c = torch.rand(3, 784, generator=g)
    slc = Slice.through_points(a, b, c, margin=0.3)
    centred(model, slc)
    part = compute_partition(model, slc)
    x = sample_boundary(part, 50, generator=torch.Generator().manual_seed(0))
    assert x.shape == (50, 784)
    x64 = x.to(torch.float64)
    back = slc.to_input(slc.to_plane(x64))
    assert torch.allclose(back, x64, atol=1e-9)
    y = f64_copy(model)(x64).detach().numpy()
    top2 = np.sort(y, 1)[:, -2:]
    assert np.abs(top2[:, 1] - top2[:, 0]).max() <= 1e-9 * (1 + np.abs(y).max())


# ------------------------------------------------------------------------------------------ trailing ops
def _canon(S):
    S = np.asarray(S, dtype=np.float64)
    flip = (S[:, 0, 0] > S[:, 1, 0]) | ((S[:, 0, 0] == S[:, 1, 0]) & (S[:, 0, 1] > S[:, 1, 1]))
    S = np.where(flip[:, None, None], S[:, ::-1], S)
    flat = S.reshape(len(S), 4)
    return flat[np.lexsort(flat.T[::-1])]


@pytest.mark.parametrize(
    "tail,n_out",
    [
        (lambda: nn.Softmax(dim=1), 3),
        (lambda: nn.LogSoftmax(dim=-1), 4),
        (lambda: nn.Sigmoid(), 1),
        (lambda: nn.Softmax(dim=-1), 10),
    ],
)
def test_trailing_output_transform_is_skipped(tail, n_out):
    slc = Slice.from_vertices(square(1.5))
    base = centred(mlp([2, 16, 16, n_out], 11), slc)
    wrapped = nn.Sequential(*base, tail())
    p0 = compute_partition(base, slc)
    p1 = compute_partition(wrapped, slc)
    assert p0.num_regions == p1.num_regions
    assert p0.boundary.shape == p1.boundary.shape
    assert p0.boundary.shape[0] > 0
    np.testing.assert_allclose(_canon(p0.boundary), _canon(p1.boundary), atol=1e-12)
    # the boundary found with the transform separates the transformed model's decisions too
    S = p1.boundary.numpy()
    d = S[:, 1] - S[:, 0]
    nrm = np.stack([-d[:, 1], d[:, 0]], 1) / np.linalg.norm(d, axis=1, keepdims=True)
    m64 = f64_copy(wrapped)
    ya = forward(m64, slc, S.mean(1) + 1e-7 * nrm).numpy()
    yb = forward(m64, slc, S.mean(1) - 1e-7 * nrm).numpy()
    if n_out == 1:
        assert ((ya[:, 0] > 0.5) != (yb[:, 0] > 0.5)).all()
    else:
        assert (ya.argmax(1) != yb.argmax(1)).all()


# ------------------------------------------------------------------------------------------ stats
def _paper_ecc(P):
    d = np.linalg.norm(P[:, None] - P[None], axis=-1)
    iu = np.triu_indices(len(P), 1)
    return d[iu].max() / d[iu].min()


@pytest.mark.parametrize("seed", [0, 1])
def test_stats_definitions(seed):
    slc = Slice.from_vertices(square(1.0))
    model = centred(mlp([2, 16, 16, 1], seed), slc)
    part = compute_partition(model, slc)
    assert part.boundary.shape[0] > 0
    st = part.stats()
    for k in ("num_regions", "mean_area", "std_area", "mean_eccentricity", "mean_vertices", "boundary_length"):
        assert k in st, k
        assert math.isfinite(float(st[k])), k
    regs = region_list(part)
    areas = np.array([0.5 * np.sum(r[:, 0] * np.roll(r[:, 1], -1) - np.roll(r[:, 0], -1) * r[:, 1]) for r in regs])
    assert st["num_regions"] == len(regs)
    assert np.isclose(st["mean_area"], areas.mean(), rtol=1e-9)
    assert np.isclose(st["std_area"], areas.std(), rtol=1e-6) or np.isclose(
        st["std_area"], areas.std(ddof=1), rtol=1e-6
    )
    assert np.isclose(st["mean_vertices"], np.mean([len(r) for r in regs]), rtol=1e-9)
    S = part.boundary.numpy()
    assert np.isclose(st["boundary_length"], np.linalg.norm(S[:, 1] - S[:, 0], axis=1).sum(), rtol=1e-9)
    # the paper's eccentricity: max over min pairwise vertex distance, averaged over regions
    paper = np.mean([_paper_ecc(r) for r in regs])
    others = [k for k in st if "ecc" in k and k != "mean_eccentricity"]
    assert others, "no paper-definition eccentricity key"
    assert any(np.isclose(float(st[k]), paper, rtol=1e-6) for k in others), (paper, {k: st[k] for k in others})


def test_stats_eccentricity_rotation_invariant():
    """A linear model has one region = the domain; a square and a rotated square have equal eccentricity."""
    model = nn.Linear(2, 1)
    th = 0.3
    R = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64)
    s1 = compute_partition(model, Slice.from_vertices(square(1.0))).stats()
    s2 = compute_partition(model, Slice.from_vertices(square(1.0) @ R.T)).stats()
    rect = compute_partition(model, Slice.from_vertices(square(1.0) * torch.tensor([3.0, 1.0]))).stats()
    assert np.isclose(s1["mean_eccentricity"], s2["mean_eccentricity"], rtol=1e-9)
    assert not np.isclose(s1["mean_eccentricity"], rect["mean_eccentricity"], rtol=1e-3)
    assert s1["num_regions"] == 1 and np.isclose(s1["mean_area"], 4.0)


# ------------------------------------------------------------------------------------------ boundary on region edges
@pytest.mark.parametrize("act", [lambda: nn.LeakyReLU(0.1), lambda: nn.PReLU()])
def test_boundary_on_final_kink(act):
    """A final LeakyReLU/PReLU keeps the output's sign, so the boundary is the one without it.

    Its zero level set is exactly the kink line, i.e. a region edge: the boundary must not be dropped.
    """
    slc = Slice.from_vertices(square(1.5))
    base = centred(mlp([2, 16, 1], 0), slc)
    model = nn.Sequential(*base, act())
    p0 = compute_partition(base, slc)
    p1 = compute_partition(model, slc)
    L0 = np.linalg.norm(p0.boundary[:, 1] - p0.boundary[:, 0], axis=1).sum()
    L1 = np.linalg.norm(p1.boundary[:, 1] - p1.boundary[:, 0], axis=1).sum()
    assert L0 > 0
    assert np.isclose(L1, L0, rtol=1e-9), (L1, L0)
    check_boundary(p1, f64_copy(model), slc)


def test_boundary_along_region_edge_exact():
    """y = relu(z) - relu(-z) = z: the zero line is the edge between the two regions."""
    m = edge_boundary_net()
    slc = Slice.from_vertices(square(1.5))
    part = compute_partition(m, slc)
    assert part.num_regions == 2
    S = check_boundary(part, m, slc)
    # the line u + 0.3 v + 0.1 = 0 crosses the square from v = -1.5 to v = 1.5: length 3 * sqrt(1 + 0.09)
    L = np.linalg.norm(S[:, 1] - S[:, 0], axis=1).sum()
    assert np.isclose(L, 3 * np.sqrt(1.09), rtol=1e-9), L


@pytest.mark.parametrize("pair", [(0, 1), (2, 1), (0, 3)])
def test_class_pair_is_subset_of_argmax_boundary(pair):
    slc = Slice.from_vertices(square(1.5))
    model = centred(mlp([2, 24, 24, 4], 2), slc)
    full = compute_partition(model, slc)
    p = compute_partition(model, slc, class_pair=pair)
    cls = np.sort(full.boundary_classes.numpy(), 1)
    sel = (cls == np.sort(pair)).all(1)
    assert sel.any()
    assert p.boundary.shape[0] == int(sel.sum())
    assert (np.sort(p.boundary_classes.numpy(), 1) == np.sort(pair)).all()
    np.testing.assert_allclose(_canon(p.boundary), _canon(full.boundary[sel]), atol=1e-12)


def test_partition_independent_of_processing_seed():
    slc = Slice.from_vertices(square(1.5))
    model = centred(mlp([2, 24, 24, 24, 3], 1), slc)
    ps = [compute_partition(model, slc, seed=s) for s in (0, 1, 7)]
    for p in ps[1:]:
        assert p.num_regions == ps[0].num_regions
        np.testing.assert_allclose(np.sort(p.areas.numpy()), np.sort(ps[0].areas.numpy()), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(_canon(p.boundary), _canon(ps[0].boundary), atol=1e-12)


class _TiedOutputs(nn.Module):
    """Outputs (y, -y, y/2) with y = LeakyReLU(z): all three tie exactly on the kink line z = 0."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        y = self.act(self.base(x))
        return torch.cat([y, -y, 0.5 * y], 1)


def test_multiclass_boundary_on_kink():
    slc = Slice.from_vertices(square(1.5))
    base = centred(mlp([2, 16, 1], 0), slc)
    model = _TiedOutputs(base)
    p0 = compute_partition(base, slc)
    p = compute_partition(model, slc)
    L0 = np.linalg.norm(p0.boundary[:, 1] - p0.boundary[:, 0], axis=1).sum()
    L = np.linalg.norm(p.boundary[:, 1] - p.boundary[:, 0], axis=1).sum()
    assert L0 > 0 and np.isclose(L, L0, rtol=1e-9), (L, L0)
    check_boundary(p, f64_copy(model), slc)


def test_one_output_numpy_path_equals_torch_path():
    """On the CPU one output takes a NumPy twin of the segment and tie steps: same results, bit for bit."""
    from splinecam_lightning import boundary as bd

    g = torch.Generator().manual_seed(0)
    R, K = 60, 6
    ang = torch.sort(torch.rand(R, K, generator=g, dtype=torch.float64) * 6.283, 1).values
    cen = torch.rand(R, 1, 2, generator=g, dtype=torch.float64) * 2 - 1
    verts = cen + 0.3 * torch.stack([torch.cos(ang), torch.sin(ang)], -1)
    counts = torch.randint(3, K + 1, (R,), generator=g)
    verts = torch.where(torch.arange(K)[None, :, None] < counts[:, None, None], verts, verts[:, :1])
    jac = torch.randn(R, 1, 2, generator=g, dtype=torch.float64)
    off = -(jac[:, 0] * cen[:, 0]).sum(1, keepdim=True) + 0.2 * torch.randn(R, 1, generator=g, dtype=torch.float64)
    # Some regions' output vanishes along their first edge (ties), some everywhere.
    e = verts[:10, 1] - verts[:10, 0]
    jac[:10, 0] = torch.stack([-e[:, 1], e[:, 0]], 1)
    off[:10, 0] = -(jac[:10, 0] * verts[:10, 0]).sum(1)
    jac[10:13], off[10:13] = 0.0, 0.0
    ext = torch.tensor([1.5, 1.5], dtype=torch.float64)
    seg, reg, cls, tied = bd._one_output_np(verts, counts, jac, off, ext)
    seg_t, reg_t, cls_t = bd._boundary_inside_regions(verts, counts, jac, off, ext, None)
    tied_t = bd._tied_edge_regions(verts, counts, jac, off, ext)
    assert reg.numel() > 10 and 0 < int(tied.sum()) < R
    assert torch.equal(seg, seg_t) and torch.equal(reg, reg_t) and torch.equal(cls, cls_t)
    assert torch.equal(tied, tied_t)


def test_tie_prefilter_keeps_the_exact_result(monkeypatch):
    """Several outputs: regions whose best class clearly leads at the centre skip the tie walk; the tied
    regions are those of the exact test alone."""
    from splinecam_lightning import boundary as bd

    g = torch.Generator().manual_seed(1)
    R, K, O = 300, 5, 3
    ang = torch.rand(R, 1, generator=g, dtype=torch.float64) * 6.283
    cen = torch.rand(R, 1, 2, generator=g, dtype=torch.float64) * 2 - 1
    a = torch.arange(K, dtype=torch.float64) * 6.283 / K
    verts = cen + 0.2 * torch.stack([torch.cos(ang + a), torch.sin(ang + a)], -1)
    counts = torch.full((R,), K)
    jac = torch.randn(R, O, 2, generator=g, dtype=torch.float64)
    off = -(jac * cen).sum(2) + 0.3 * torch.randn(R, O, generator=g, dtype=torch.float64)
    # Regions 0..29: classes 0 and 1 tie along the edge from vertex 0 to vertex 1, well above class 2.
    e = verts[:30, 1] - verts[:30, 0]
    jac[:30, 1] = jac[:30, 0] + torch.stack([-e[:, 1], e[:, 0]], 1)
    off[:30, 1] = off[:30, 0] - (torch.stack([-e[:, 1], e[:, 0]], 1) * verts[:30, 0]).sum(1)
    off[:30, 0] += 10.0
    off[:30, 1] += 10.0
    ext = torch.tensor([1.5, 1.5], dtype=torch.float64)
    monkeypatch.setattr(bd, "_LEAD_FILTER_MIN", 0)
    fast = bd._tied_edge_regions(verts, counts, jac, off, ext)
    exact = bd._tied_edge_regions_exact(verts, counts, jac, off, ext)
    assert int(exact.sum()) >= 25 and torch.equal(fast, exact)
