"""The all-lines-at-once arrangement path of refine(): same partitions as rounds, fallbacks on degeneracy."""

import pytest
import torch
from torch import nn

import splinecam_lightning.refine as refine_mod
from splinecam_lightning import Slice, compute_partition, geometry

SQ = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
EXT = torch.tensor([1.0, 1.0], dtype=torch.float64)


def _lines_through_square(n, seed):
    g = torch.Generator().manual_seed(seed)
    ab = torch.randn(n, 2, generator=g, dtype=torch.float64)
    pts = torch.rand(n, 2, generator=g, dtype=torch.float64) * 1.6 - 0.8
    c = -(ab * pts).sum(1)
    lines = torch.cat([ab, c[:, None]], 1)
    return lines, 1e-11 * lines.abs().sum(1)


def _random_polygons(g, n, sides, r_min, half_span):
    """``n`` regular ``sides``-gons with random rotation, radius in ``[r_min, r_min + 0.2]`` and centre in
    ``[-half_span, half_span]^2``: ``(n, sides, 2)``."""
    ang = torch.rand(n, 1, generator=g, dtype=torch.float64) * 6.283
    r = r_min + 0.2 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    cen = torch.rand(n, 1, 2, generator=g, dtype=torch.float64) * (2 * half_span) - half_span
    k = torch.arange(sides, dtype=torch.float64) * (6.283 / sides)
    return cen + r[..., None] * torch.stack([torch.cos(ang + k), torch.sin(ang + k)], -1)


def _signature(part):
    """Regions as (centroid, area, vertex count), sorted by centroid: independent of region order."""
    cen = geometry.polygon_centroids(part.vertices)
    key = torch.stack([cen[:, 0], cen[:, 1], part.areas, part.counts.to(torch.float64)], 1)
    order = torch.argsort(torch.round(cen[:, 0] * 1e8) * 1e9 + torch.round(cen[:, 1] * 1e8))
    return key[order]


@pytest.mark.parametrize("n,seed", [(1, 0), (7, 1), (40, 2)])
def test_arrangement_matches_euler_and_area(n, seed):
    lines, tol = _lines_through_square(n, seed)
    owner = torch.zeros(n, dtype=torch.long)
    fv, fc, fo, bad = geometry.line_arrangement(SQ[None], torch.tensor([4]), owner, lines, tol, EXT)
    assert not bad.any()
    # Faces of n lines in general position inside a convex polygon: 1 + n + interior crossings.
    det = lines[:, None, 0] * lines[None, :, 1] - lines[None, :, 0] * lines[:, None, 1]
    x = torch.linalg.solve(
        torch.stack([lines[:, None, :2].expand(n, n, 2), lines[None, :, :2].expand(n, n, 2)], 2)[det != 0],
        -torch.stack([lines[:, None, 2].expand(n, n), lines[None, :, 2].expand(n, n)], 2)[det != 0],
    )
    inner = int(((x.abs() < 1).all(1)).sum()) // 2
    assert fv.shape[0] == 1 + n + inner
    areas = geometry.polygon_areas(fv)
    assert (areas > 0).all()
    assert abs(float(areas.sum()) - 4.0) < 1e-12
    assert (fo == 0).all()


def test_concurrent_lines_are_flagged_and_others_kept():
    # Polygon 0: three lines through one point (degenerate); polygon 1: two generic lines.
    sq2 = SQ + torch.tensor([3.0, 0.0], dtype=torch.float64)
    V = torch.stack([SQ, sq2])
    conc = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    gen = torch.tensor([[1.0, 0.2, -3.1], [0.3, 1.0, -0.5]], dtype=torch.float64)
    lines = torch.cat([conc, gen])
    owner = torch.tensor([0, 0, 0, 1, 1])
    fv, fc, fo, bad = geometry.line_arrangement(
        V, torch.tensor([4, 4]), owner, lines, 1e-11 * lines.abs().sum(1), torch.tensor([4.0, 1.0])
    )
    assert bad.tolist() == [True, False]
    assert fv.shape[0] == 4 and (fo == 1).all()
    assert abs(float(geometry.polygon_areas(fv).sum()) - 4.0) < 1e-12


@pytest.mark.parametrize("seed", [0, 1])
def test_arrangement_equals_rounds(seed, monkeypatch):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 1))
    sl = Slice.from_vertices(SQ)
    fast = compute_partition(net, sl)
    monkeypatch.setattr(refine_mod, "_MAX_ARRANGEMENT_PAIRS", 3)  # many small batches, big regions in rounds
    batched = compute_partition(net, sl)
    monkeypatch.setattr(refine_mod, "_MAX_ARRANGEMENT_PAIRS", -1)  # every region in rounds
    rounds = compute_partition(net, sl)
    assert fast.num_regions == batched.num_regions == rounds.num_regions
    a, b = _signature(fast), _signature(rounds)
    assert torch.equal(a[:, 3], b[:, 3])  # same vertex counts, region by region
    assert torch.allclose(a[:, :3], b[:, :3], rtol=0, atol=1e-12)
    assert torch.allclose(_signature(batched), a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("thresholds", [[0.0], [-0.3, 0.4]])
def test_initial_pairs_equal_the_test_at_every_vertex(thresholds, monkeypatch):
    """The pre-filter (at the vertex mean, in cache-sized blocks) drops no crossing pair and keeps no other."""
    monkeypatch.setattr(refine_mod, "_FILTER_ELEMS", 64)  # many blocks
    g = torch.Generator().manual_seed(0)
    P, F = 50, 16
    verts = _random_polygons(g, P, 5, 0.05, 0.7)
    M = torch.randn(P, 3, F, generator=g, dtype=torch.float64)
    M[:, 2] *= 0.2
    M[0, :, 0] = torch.tensor([0.0, 0.0, thresholds[0]])  # constant at a threshold: never crosses
    fam = refine_mod.LineFamily(M, thresholds, EXT)
    q, it = fam.initial_pairs(verts, torch.arange(P))
    val = torch.einsum("pkc,pcf->pkf", verts, M[:, :2]) + M[:, 2:3]  # (P, K, F)
    want = []
    for t, th in enumerate(thresholds):
        sc = M[:, 0].abs() * EXT[0] + M[:, 1].abs() * EXT[1] + M[:, 2].abs()
        tol = 1e-11 * (sc + abs(th))
        hit = ((val.amax(1) - th) > tol) & ((val.amin(1) - th) < -tol)
        p, f = torch.nonzero(hit, as_tuple=True)
        want.append(p * 1000 + f + t * F)
    got = torch.sort(q * 1000 + it).values
    assert got.numel() > 10 and torch.equal(got, torch.sort(torch.cat(want)).values)


def test_argmax_prefilter_keeps_the_exact_result(monkeypatch):
    """split_by_argmax certifies constant regions at their centre first: the cut regions and cells are those
    of the exact test alone."""
    g = torch.Generator().manual_seed(3)
    R, k = 400, 5
    verts = _random_polygons(g, R, 6, 0.02, 0.8)
    counts = torch.full((R,), 6)
    M = torch.randn(R, 3, k, generator=g, dtype=torch.float64)
    M[:20, :, 1] = M[:20, :, 0]  # exact ties between two functions
    monkeypatch.setattr(refine_mod, "_ARGMAX_FILTER_MIN", 0)
    idx, _, cells = refine_mod.split_by_argmax(verts, counts, M, EXT)
    monkeypatch.setattr(refine_mod, "_ARGMAX_FILTER_MIN", 1 << 60)
    idx0, _, cells0 = refine_mod.split_by_argmax(verts, counts, M, EXT)
    assert 20 < idx.numel() < R and torch.equal(idx, idx0)
    assert len(cells) == len(cells0) and all(torch.equal(x, y) for x, y in zip(cells, cells0, strict=True))


@pytest.mark.parametrize("shared", [False, True])
def test_window_initial_pairs_equal_the_test_at_every_vertex(shared):
    """Max-pool windows: the certificate at the vertex mean drops no crossing window and keeps no other, with
    identical members (dead units pooled together), padded windows and near ties."""
    g = torch.Generator().manual_seed(4)
    P, F = 300, 24
    verts = _random_polygons(g, P, 5, 0.02, 0.8)
    M = torch.randn(1 if shared else P, 3, F, generator=g, dtype=torch.float64)
    M[:, :, 4:8] = 0.0  # a window of dead units: ties everywhere, constant argmax
    M[:, :, 9] = M[:, :, 8]  # identical members
    M[:, :, 13] = M[:, :, 12]
    M[:, 2, 13] += 1e-13  # a near tie
    windows = torch.arange(F).reshape(-1, 4)
    windows = torch.cat([windows, torch.tensor([[0, 5, -1, -1]])])  # padded
    fam = refine_mod.WindowFamily(M, windows, EXT)
    q, w = fam.initial_pairs(verts, torch.arange(P))
    W = windows.shape[0]
    pp, ww = torch.arange(P).repeat_interleave(W), torch.arange(W).repeat(P)
    hit = fam.crosses(verts[pp], pp, ww)
    assert 20 < int(hit.sum()) < hit.numel() // 2
    assert torch.equal(q, pp[hit]) and torch.equal(w, ww[hit])  # same pairs, region-major


@pytest.mark.parametrize("k", [2, 4])
def test_window_split_equals_clipping(k):
    """Windows split by one certified line give the cells that clipping by every member gives; windows with a
    third cell that wins no vertex (a middle cell) or three winning members fall back to clipping."""
    g = torch.Generator().manual_seed(5)
    A = 600
    verts = _random_polygons(g, A, 6, 0.3, 0.5)
    counts = torch.full((A,), 6)
    M = torch.randn(A, 3, k, generator=g, dtype=torch.float64)
    if k == 4:
        # Polygon 3a + 1: members 0 and 1 win the vertices, member 2 (a constant) only a band in the middle.
        mid = verts[1::3].mean(1)[:, 0]
        zero = torch.zeros_like(mid)
        M[1::3, :, 0] = torch.stack([zero + 1, zero, -mid], 1)  # u - mid
        M[1::3, :, 1] = torch.stack([zero - 1, zero, mid], 1)  # mid - u
        M[1::3, :, 2] = torch.stack([zero, zero, zero + 0.1], 1)
        M[1::3, :, 3] = torch.stack([zero, zero, zero - 10], 1)  # never wins
    fam = refine_mod.WindowFamily(M, torch.arange(k)[None], EXT)
    root, item = torch.arange(A), torch.zeros(A, dtype=torch.long)
    crossing = fam.crosses(verts, root, item)
    a = torch.nonzero(crossing)[:, 0]
    v, c, par = fam.split(verts[a], counts[a], root[a], item[a])
    gm, valid = fam._members(root[a], item[a])
    v0, c0, par0 = fam._clip(verts[a], counts[a], gm, valid)
    ok, _ = fam._two_cells(verts[a], counts[a], gm, valid)
    # Two members always give two cells; with four, both paths run.
    assert bool(ok.all()) if k == 2 else 0 < int(ok.sum()) < ok.numel()
    assert torch.equal(par, torch.sort(par).values)  # children grouped by parent, as _rounds expects

    def cells(v, c, par):
        areas = geometry.polygon_areas(geometry.pad_with_first(v, c))
        cen = geometry.polygon_centroids(geometry.pad_with_first(v, c))
        key = torch.stack([par.to(torch.float64), cen[:, 0], cen[:, 1], areas], 1)
        return key[torch.argsort(par * 10**9 + torch.round((cen[:, 0] + 2) * 1e8).long())]

    got, want = cells(v, c, par), cells(v0, c0, par0)
    assert got.shape == want.shape and got.shape[0] > 2 * a.numel() - 1
    assert (got - want).abs().max() < 1e-12
    # The cells tile their polygons.
    area = geometry.polygon_areas(verts[a])
    assert torch.allclose(torch.zeros(a.numel(), dtype=torch.float64).index_add_(0, par, got[:, 3]), area, rtol=1e-12)
    # With members and edge labels (the decision boundary's cells): the same cells, members and cut edges.
    v1, c1, p1, m1, l1 = fam.cells(verts[a], counts[a], root[a], item[a])
    v2, c2, p2, m2, l2 = fam._clip(verts[a], counts[a], gm, valid, with_labels=True)

    def labelled(v, c, p, m, lab):
        key = cells(v, c, p * k + m)
        cen = geometry.polygon_centroids(geometry.pad_with_first(v, c))
        order = torch.argsort((p * k + m) * 10**9 + torch.round((cen[:, 0] + 2) * 1e8).long())
        real = geometry.vertex_mask(c, lab.shape[1])
        cuts = [sorted(lab[i][real[i] & (lab[i] >= 0)].tolist()) for i in order.tolist()]
        return key, cuts

    (k1, cuts1), (k2, cuts2) = labelled(v1, c1, p1, m1, l1), labelled(v2, c2, p2, m2, l2)
    assert (k1 - k2).abs().max() < 1e-12 and cuts1 == cuts2
    assert sum(len(x) for x in cuts1) >= 2 * a.numel()  # every polygon has a cut edge on each side


def test_line_parallel_to_the_first_edge_through_a_vertex():
    """A dyadic Hardtanh MLP on a box: a line through a vertex (so a degenerate polygon, redone in rounds) that is
    parallel to the polygon's first edge once made the arrangement's placeholder crossing 0 / 0, and the NaN sort
    key indexed past its group (IndexError) or into the next polygon's."""
    import oracles

    l1, l2 = nn.Linear(2, 7).double(), nn.Linear(7, 2).double()
    with torch.no_grad():
        l1.weight.copy_(
            torch.tensor([[0.5, 0.0], [-0.5, -1.0], [1.0, 0.0], [0.5, 1.0], [-0.5, 0.5], [-1.0, -1.0], [-0.5, -0.5]])
        )
        l1.bias.copy_(torch.tensor([1.0, 0.0, -1.0, 0.0, 1.0, -1.0, -1.0]))
        l2.weight.copy_(torch.tensor([[0.5, -1.0, 0.0, 0.0, 0.5, -0.5, 0.0], [-1.0, 0.5, -0.5, 0.5, 1.0, 0.5, 0.5]]))
        l2.bias.copy_(torch.tensor([-0.5, 0.0]))
    net = nn.Sequential(l1, nn.Hardtanh(-0.5, 0.5), l2, nn.Hardtanh(-0.5, 0.5))
    slc = Slice.box(0, 2, -1, 1)
    part = compute_partition(net, slc)
    oracles.check_tiling(part, slc)
    oracles.check_vertex_forward(part, net, slc)
    oracles.check_interior_forward(part, net, slc)
    centre = oracles.check_one_pattern(part, net, slc)
    oracles.check_grid(part, net, slc, 150, region_patterns=centre)
