"""Brute-force ground truth for the engine tests (no tests here; imported by ``test_engine_*.py``).

Nothing in this module calls the engine to decide what is true: activation patterns come from forward hooks
on a float64 copy of the real model, areas and point-in-polygon tests are plain numpy, and line arrangements
are counted directly.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RELU_LIKE = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
CLAMP_LIKE = (nn.Hardtanh,)  # ReLU6 is a Hardtanh subclass


# ---------------------------------------------------------------------------------------------- models
def mlp(widths, seed, act=nn.ReLU, dtype=torch.float32):
    """``Linear, act, Linear, act, ..., Linear`` with default init from ``seed``."""
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 2):
        layers += [nn.Linear(widths[i], widths[i + 1]), act()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers).to(dtype)


def edge_boundary_net():
    """``y = relu(z) - relu(-z) = z`` with ``z = u + 0.3 v + 0.1`` (float64): the zero line is the edge between
    its two regions."""
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 0.3], [-1.0, -0.3]]))
        m[0].bias.copy_(torch.tensor([0.1, -0.1]))
        m[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        m[2].bias.zero_()
    return m


def square(r=1.0, center=(0.0, 0.0)):
    cx, cy = center
    return torch.tensor([[cx - r, cy - r], [cx + r, cy - r], [cx + r, cy + r], [cx - r, cy + r]], dtype=torch.float64)


def f64_copy(model):
    """An eval-mode float64 deep copy (the ground-truth model)."""
    m = copy.deepcopy(model)
    m = m.to(torch.float64)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


# ---------------------------------------------------------------------------------------------- forward
def forward(model64, slc, uv, input_shape=None, chunk=20000):
    """Model output ``(m, O)`` at plane points ``uv``, through the real model in float64."""
    uv = torch.as_tensor(uv, dtype=torch.float64)
    outs = []
    with torch.no_grad():
        for s in range(0, uv.shape[0], chunk):
            x = slc.to_input(uv[s : s + chunk]).to(torch.float64)
            if input_shape is not None:
                x = x.reshape(x.shape[0], *input_shape)
            y = model64(x)
            outs.append(y.reshape(x.shape[0], -1))
    return torch.cat(outs) if outs else torch.zeros(0, 1, dtype=torch.float64)


def hook_pattern(model64, slc, uv, input_shape=None, chunk=20000):
    """Activation pattern ``(m, F)`` int64 numpy array from forward pre-hooks on every CPWL module.

    ReLU/LeakyReLU/PReLU: 1 where the module's input is > 0.  Hardtanh/ReLU6: 0 below, 1 inside, 2 above.
    MaxPool2d/1d: the argmax index of each window.  A module called several times records every call.
    """
    uv = torch.as_tensor(uv, dtype=torch.float64)
    mods = [m for m in model64.modules() if isinstance(m, RELU_LIKE + CLAMP_LIKE + (nn.MaxPool2d, nn.MaxPool1d))]
    pats = []
    for s in range(0, uv.shape[0], chunk):
        rec: list[torch.Tensor] = []

        def hook(mod, inp, rec=rec):  # before the module runs: an in-place one changes its input
            z = inp[0].detach().clone()
            n = z.shape[0]
            if isinstance(mod, CLAMP_LIKE):
                code = (z > mod.min_val).long() + (z > mod.max_val).long()
            elif isinstance(mod, RELU_LIKE):
                code = (z > 0).long()
            elif isinstance(mod, nn.MaxPool2d):
                _, code = F.max_pool2d(
                    z, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode, return_indices=True
                )
            else:
                _, code = F.max_pool1d(
                    z, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode, return_indices=True
                )
            rec.append(code.reshape(n, -1))

        handles = [m.register_forward_pre_hook(hook) for m in mods]
        try:
            forward(model64, slc, uv[s : s + chunk], input_shape)
        finally:
            for h in handles:
                h.remove()
        n = min(chunk, uv.shape[0] - s)
        pats.append(torch.cat(rec, 1) if rec else torch.zeros(n, 0, dtype=torch.long))
    return torch.cat(pats).numpy()


# ---------------------------------------------------------------------------------------------- geometry
def shoelace(P):
    P = np.asarray(P, dtype=np.float64)
    P = P - P[0]  # relative coordinates: no cancellation for small polygons far from the origin
    x, y = P[:, 0], P[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def region_list(part):
    return [np.asarray(r.detach().cpu(), dtype=np.float64) for r in part.regions]


def edge_distances(P, pts):
    """Signed distances ``(m, k)`` of points to the edge lines of CCW convex polygon ``P`` (inside > 0)."""
    P = np.asarray(P, dtype=np.float64)
    e = np.roll(P, -1, axis=0) - P
    L = np.linalg.norm(e, axis=1)
    L = np.where(L == 0, np.inf, L)
    d = pts[:, None, :] - P[None, :, :]
    cr = e[None, :, 0] * d[..., 1] - e[None, :, 1] * d[..., 0]
    return cr / L[None, :]


def inside_margin(P, pts):
    """Smallest signed edge distance of each point (positive = strictly inside)."""
    return edge_distances(P, pts).min(axis=1)


def interior_points(P, frac=0.05):
    """Vertex mean plus ``v + frac * (c - v)`` for every vertex: all strictly inside a convex polygon."""
    P = np.asarray(P, dtype=np.float64)
    c = P.mean(0)
    return np.vstack([c[None], P + frac * (c[None] - P)])


def domain_np(slc):
    return np.asarray(slc.domain, dtype=np.float64)


def grid_in_domain(slc, n, margin_rel=1e-6):
    D = domain_np(slc)
    lo, hi = D.min(0), D.max(0)
    us = np.linspace(lo[0], hi[0], n)
    vs = np.linspace(lo[1], hi[1], n)
    U, V = np.meshgrid(us, vs, indexing="xy")
    pts = np.stack([U.ravel(), V.ravel()], 1)
    scale = float(np.max(hi - lo))
    keep = inside_margin(D, pts) > margin_rel * scale
    return pts, keep, (U.shape, us, vs)


# ---------------------------------------------------------------------------------------------- checks
def check_tiling(part, slc, n_probe=1500, seed=0):
    """Regions tile the domain: areas sum to its area, convex CCW, inside it, and no overlaps or gaps."""
    D = domain_np(slc)
    dom_area = shoelace(D)
    scale = float(np.ptp(D, axis=0).max())
    regs = region_list(part)
    assert len(regs) == part.num_regions >= 1
    assert int(part.counts.min()) >= 3
    areas = np.array([shoelace(r) for r in regs])
    assert (areas > 0).all(), f"non-positive areas: {np.sort(areas)[:5]}"
    np.testing.assert_allclose(areas.sum(), dom_area, rtol=1e-9, atol=0)
    np.testing.assert_allclose(np.asarray(part.areas, dtype=np.float64), areas, rtol=1e-7, atol=1e-15 * scale**2)
    # padding repeats vertex 0
    V = np.asarray(part.vertices, dtype=np.float64)
    cnt = np.asarray(part.counts)
    K = V.shape[1]
    pad = np.arange(K)[None, :] >= cnt[:, None]
    assert np.array_equal(V[pad], np.broadcast_to(V[:, :1, :], V.shape)[pad]), "padding must repeat vertex 0"
    # convex, counter-clockwise, inside the domain
    worst = 0.0
    for r in regs:
        e = np.roll(r, -1, 0) - r
        en = np.roll(e, -1, 0)
        cr = e[:, 0] * en[:, 1] - e[:, 1] * en[:, 0]
        worst = min(worst, cr.min() / scale**2)
    assert worst >= -1e-12, f"non-convex or clockwise region (min turn {worst:.3g})"
    allv = np.vstack(regs)
    assert inside_margin(D, allv).min() >= -1e-9 * scale, "a region vertex lies outside the domain"
    # no overlaps and no gaps at random probe points
    rng = np.random.default_rng(seed)
    lo, hi = D.min(0), D.max(0)
    pts = lo + (hi - lo) * rng.random((n_probe, 2))
    pts = pts[inside_margin(D, pts) > 1e-7 * scale]
    Kmax = max(len(r) for r in regs)
    # pad polygons by repeating vertex 0; zero-length edges get +inf distance
    Pp = np.stack([np.vstack([r, np.repeat(r[:1], Kmax - len(r), 0)]) for r in regs])  # (R, K, 2)
    e = np.roll(Pp, -1, axis=1) - Pp
    L = np.linalg.norm(e, axis=2)
    bad = L == 0
    L[bad] = 1.0
    closed = np.zeros(len(pts), int)
    strict = np.zeros(len(pts), int)
    for s in range(0, len(pts), 100):
        q = pts[s : s + 100]
        d = q[:, None, None, :] - Pp[None]
        cr = (e[None, ..., 0] * d[..., 1] - e[None, ..., 1] * d[..., 0]) / L[None]
        cr[:, bad] = np.inf
        m = cr.min(axis=2)  # (q, R)
        closed[s : s + 100] = (m >= -1e-10 * scale).sum(1)
        strict[s : s + 100] = (m > 1e-10 * scale).sum(1)
    assert (closed >= 1).all(), f"{int((closed == 0).sum())} probe points lie in no region (gap)"
    assert (strict <= 1).all(), f"{int((strict > 1).sum())} probe points lie inside two regions (overlap)"
    return areas


def check_vertex_forward(part, model64, slc, input_shape=None, rtol=1e-9):
    """Real forward at every region vertex equals the region's affine map."""
    regs = region_list(part)
    idx = np.concatenate([np.full(len(r), i) for i, r in enumerate(regs)])
    pts = np.vstack(regs)
    y = forward(model64, slc, pts, input_shape).numpy()
    J = np.asarray(part.jacobians, dtype=np.float64)[idx]
    b = np.asarray(part.offsets, dtype=np.float64)[idx]
    y_aff = np.einsum("mok,mk->mo", J, pts) + b
    assert y_aff.shape == y.shape, (y_aff.shape, y.shape)
    scale = 1.0 + np.abs(y).max()
    err = np.abs(y_aff - y).max()
    assert err <= rtol * scale, f"affine map disagrees with the model at a vertex by {err:.3g} (scale {scale:.3g})"
    return err / scale


def check_interior_forward(part, model64, slc, input_shape=None, rtol=1e-9):
    """Pattern-free exactness: the region's affine map equals the model at points strictly inside it too.

    A missed split makes the model non-affine on the region, so the map fails near some vertex.
    """
    regs = region_list(part)
    pts_list = [interior_points(r, frac) for r in regs for frac in (0.05, 0.5)]
    idx = np.concatenate([np.full(len(p), i // 2) for i, p in enumerate(pts_list)])
    pts = np.vstack(pts_list)
    y = forward(model64, slc, pts, input_shape).numpy()
    J = np.asarray(part.jacobians, dtype=np.float64)[idx]
    b = np.asarray(part.offsets, dtype=np.float64)[idx]
    y_aff = np.einsum("mok,mk->mo", J, pts) + b
    scale = 1.0 + np.abs(y).max()
    err = np.abs(y_aff - y).max(axis=1)
    bad = np.unique(idx[err > rtol * scale])
    assert len(bad) == 0, (
        f"{len(bad)} regions are not affine inside (max error {err.max():.3g}, scale {scale:.3g}): "
        f"missing splits, e.g. regions {bad[:5].tolist()}"
    )


def check_one_pattern(part, model64, slc, input_shape=None, pattern_fn=None, distinct=True):
    """Points strictly inside each region (centre and near every vertex) share one brute-force pattern."""
    pattern_fn = pattern_fn or hook_pattern
    regs = region_list(part)
    pts_list = [interior_points(r) for r in regs]
    idx = np.concatenate([np.full(len(p), i) for i, p in enumerate(pts_list)])
    pts = np.vstack(pts_list)
    pat = pattern_fn(model64, slc, pts, input_shape)
    first = np.concatenate([[0], np.cumsum([len(p) for p in pts_list])[:-1]])
    centre = pat[first]
    mism = np.any(pat != centre[idx], axis=1)
    bad_regions = np.unique(idx[mism])
    assert len(bad_regions) == 0, (
        f"{len(bad_regions)} of {len(regs)} regions hold more than one activation pattern "
        f"(e.g. region {bad_regions[:5].tolist()}, areas {[shoelace(regs[i]) for i in bad_regions[:3]]})"
    )
    if distinct:
        n_unique = len(np.unique(centre, axis=0)) if centre.shape[1] else 1
        assert n_unique == len(regs), f"{len(regs) - n_unique} regions repeat another region's pattern"
    return centre


def check_grid(part, model64, slc, n=200, input_shape=None, pattern_fn=None, region_patterns=None):
    """Dense-grid patterns: each is a region's pattern, and points inside a region carry that region's pattern."""
    pattern_fn = pattern_fn or hook_pattern
    regs = region_list(part)
    if region_patterns is None:
        region_patterns = pattern_fn(model64, slc, np.vstack([r.mean(0)[None] for r in regs]), input_shape)
    pts, keep, _ = grid_in_domain(slc, n)
    pts = pts[keep]
    gp = pattern_fn(model64, slc, pts, input_shape)
    if gp.shape[1] == 0:
        assert part.num_regions == 1
        return
    grid_set = {row.tobytes() for row in np.ascontiguousarray(gp)}
    reg_set = {row.tobytes() for row in np.ascontiguousarray(region_patterns)}
    missing = grid_set - reg_set
    assert not missing, f"{len(missing)} grid activation patterns belong to no region"
    assert part.num_regions >= len(grid_set)
    # per point: the region carrying the point's pattern must contain the point (closed polygon)
    index = {row.tobytes(): i for i, row in enumerate(np.ascontiguousarray(region_patterns))}
    loc = np.array([index[row.tobytes()] for row in np.ascontiguousarray(gp)])
    scale = float(np.ptp(domain_np(slc), axis=0).max())
    Kmax = max(len(r) for r in regs)
    Pp = np.stack([np.vstack([r, np.repeat(r[:1], Kmax - len(r), 0)]) for r in regs])
    P = Pp[loc]
    e = np.roll(P, -1, axis=1) - P
    L = np.linalg.norm(e, axis=2)
    zero = L == 0
    L[zero] = 1.0
    d = pts[:, None, :] - P
    cr = (e[..., 0] * d[..., 1] - e[..., 1] * d[..., 0]) / L
    cr[zero] = np.inf
    marg = cr.min(1)
    bad = marg < -1e-9 * scale
    assert not bad.any(), (
        f"{int(bad.sum())} grid points lie outside the region that has their activation pattern "
        f"(worst by {-marg.min() / scale:.3g} of the domain size)"
    )


def full_exactness(part, model64, slc, input_shape=None, pattern_fn=None, distinct=True, grid=150):
    check_tiling(part, slc)
    check_vertex_forward(part, model64, slc, input_shape)
    check_interior_forward(part, model64, slc, input_shape)
    centre = check_one_pattern(part, model64, slc, input_shape, pattern_fn, distinct)
    if grid:
        # region patterns at the vertex mean (same as used inside check_one_pattern)
        check_grid(part, model64, slc, grid, input_shape, pattern_fn, region_patterns=centre)


# ---------------------------------------------------------------------------------------------- arrangements
def plane_lines(W, b, slc):
    """Lines ``a . uv + c = 0`` of first-layer neurons ``W x + b`` restricted to the slice's plane."""
    W = np.asarray(W, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    B = np.asarray(slc.basis, dtype=np.float64)
    o = np.asarray(slc.origin, dtype=np.float64)
    return W @ B.T, W @ o + b


def arrangement_count(A, c, domain, tol=1e-12):
    """``1 + (#lines through the interior) + (#pairwise intersections strictly inside)`` (general position)."""
    D = np.asarray(domain, dtype=np.float64)
    scale = float(np.ptp(D, axis=0).max())
    vals = D @ A.T + c  # (k, n) line values at domain vertices
    an = np.linalg.norm(A, axis=1)
    vals_n = vals / np.where(an == 0, 1, an)
    crossing = (vals_n.min(0) < -tol * scale) & (vals_n.max(0) > tol * scale) & (an > 0)
    idx = np.nonzero(crossing)[0]
    A2, c2 = A[idx], c[idx]
    n = len(idx)
    inter = 0
    if n >= 2:
        i, j = np.triu_indices(n, 1)
        det = A2[i, 0] * A2[j, 1] - A2[i, 1] * A2[j, 0]
        ok = np.abs(det) > 1e-14 * an[idx][i] * an[idx][j]
        x = (-c2[i] * A2[j, 1] + c2[j] * A2[i, 1])[ok] / det[ok]
        y = (-A2[i, 0] * c2[j] + A2[j, 0] * c2[i])[ok] / det[ok]
        pts = np.stack([x, y], 1)
        inter = int((inside_margin(D, pts) > tol * scale).sum())
    return 1 + n + inter, n, inter


# ---------------------------------------------------------------------------------------------- boundary
def seg_point_dist(P, S):
    """Distances ``(m, E)`` from points ``P (m,2)`` to segments ``S (E,2,2)``."""
    a = S[None, :, 0, :]
    b = S[None, :, 1, :]
    ab = b - a
    ap = P[:, None, :] - a
    den = np.maximum((ab**2).sum(-1), 1e-300)
    t = np.clip((ap * ab).sum(-1) / den, 0, 1)
    q = a + t[..., None] * ab
    return np.linalg.norm(P[:, None, :] - q, axis=-1)
