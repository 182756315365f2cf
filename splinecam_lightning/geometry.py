"""Batched convex-polygon geometry on padded tensors.

A batch of convex polygons is a ``(A, K, 2)`` tensor plus ``(A,)`` vertex counts. Slots past a polygon's count
repeat its vertex 0, so the cyclic vertex sequence is the same polygon with zero-length edges appended: shoelace,
centroid and edge loops work on whole rows without masks. Every function here keeps that invariant.
"""

from __future__ import annotations

import numpy as np
import torch

from splinecam_lightning.errors import TooManyRegionsError

__all__ = [
    "polygon_areas",
    "polygon_centroids",
    "polygon_covariances",
    "vertex_means",
    "pad_with_first",
    "vertex_mask",
    "affine_values",
    "widen",
    "split_by_lines",
    "clip_by_halfplanes",
    "line_segments_in_polygons",
    "locate_points",
    "line_arrangement",
]


def _shoelace_terms(vertices: torch.Tensor):
    """Coordinates relative to vertex 0 (no cancellation for tiny far-away regions), their cyclic successors,
    the edge cross products and the signed areas."""
    v0 = vertices[..., :1, :]
    v = vertices - v0
    x, y = v[..., 0], v[..., 1]
    xn, yn = x.roll(-1, -1), y.roll(-1, -1)
    cr = x * yn - xn * y
    return v0, x, y, xn, yn, cr, 0.5 * cr.sum(-1)


def polygon_areas(vertices: torch.Tensor) -> torch.Tensor:
    """Signed shoelace areas of padded polygons (positive for counter-clockwise)."""
    return _shoelace_terms(vertices)[-1]


def _relative_centroids(x, y, xn, yn, cr, a) -> tuple[torch.Tensor, torch.Tensor]:
    return ((x + xn) * cr).sum(-1) / (6 * a), ((y + yn) * cr).sum(-1) / (6 * a)


def polygon_centroids(vertices: torch.Tensor) -> torch.Tensor:
    """Area centroids of padded polygons; vertex means where the area vanishes."""
    v0, x, y, xn, yn, cr, a = _shoelace_terms(vertices)
    cx, cy = _relative_centroids(x, y, xn, yn, cr, a)
    c = torch.stack([cx, cy], -1) + v0[..., 0, :]
    bad = ~torch.isfinite(c).all(-1) | (a.abs() <= 0)
    if bad.any():
        c[bad] = vertices[bad].mean(-2)
    return c


def polygon_covariances(vertices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(var_u, var_v, cov_uv)`` of the uniform distribution on each padded polygon."""
    _, x, y, xn, yn, cr, a = _shoelace_terms(vertices)
    cx, cy = _relative_centroids(x, y, xn, yn, cr, a)
    ixx = (cr * (x * x + x * xn + xn * xn)).sum(-1) / (12 * a) - cx * cx
    iyy = (cr * (y * y + y * yn + yn * yn)).sum(-1) / (12 * a) - cy * cy
    ixy = (cr * (x * yn + 2 * x * y + 2 * xn * yn + xn * y)).sum(-1) / (24 * a) - cx * cy
    return ixx, iyy, ixy


def vertex_means(vertices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean of each polygon's real vertices: a point strictly inside any non-degenerate convex polygon."""
    K = vertices.shape[1]
    mask = vertex_mask(counts, K).to(vertices.dtype)
    return (vertices * mask[..., None]).sum(1) / counts[:, None].to(vertices.dtype)


def vertex_mask(counts: torch.Tensor, K: int) -> torch.Tensor:
    """``(P, K)`` True at the real vertices of padded polygons (the first ``counts[p]`` of row ``p``)."""
    return torch.arange(K, device=counts.device)[None, :] < counts[:, None]


def affine_values(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """``c0 * x + c1 * y + c2`` (broadcast), as two fused multiply-adds: the one kernel for evaluating affine
    maps or lines at points (an inner dimension of 2 is faster this way than as a batch of tiny matmuls)."""
    return torch.addcmul(torch.addcmul(c2, x, c0), y, c1)


def widen(x: torch.Tensor, width: int) -> torch.Tensor:
    """Pad dimension 1 of ``x`` to ``width`` by repeating entry 0 (padded polygons repeat their first vertex)."""
    if x.shape[1] >= width:
        return x
    return torch.cat([x, x[:, :1].expand(-1, width - x.shape[1], *x.shape[2:])], 1)


def pad_with_first(vertices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Copy of ``vertices`` whose slots past each polygon's count hold its vertex 0."""
    K = vertices.shape[1]
    pad = torch.arange(K, device=vertices.device)[None, :, None] >= counts[:, None, None]
    return torch.where(pad, vertices[:, :1, :], vertices)


def _compact(
    cand: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Move kept candidate vertices to the front of each row (order preserved) and pad with vertex 0."""
    counts = keep.sum(1)
    width = max(int(counts.max()), 1) if counts.numel() else 1
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    out = pad_with_first(torch.gather(cand, 1, order[..., None].expand(-1, -1, 2)), counts)
    lab = torch.gather(labels, 1, order) if labels is not None else None
    return out, counts, lab


def _signs(f: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    t = tol[:, None]
    return (f > t).view(torch.int8) - (f < -t).view(torch.int8)


def split_by_lines(
    vertices: torch.Tensor,
    counts: torch.Tensor,
    lines: torch.Tensor,
    tol: torch.Tensor,
    labels: torch.Tensor | None = None,
    cut_label: torch.Tensor | None = None,
) -> tuple:
    """Split each convex polygon by its own line ``a*u + b*v + c = 0``.

    Vertices with ``|a*u + b*v + c| <= tol`` count as on the line and go to both sides; a new vertex is made
    only on edges whose ends are strictly on opposite sides. The crossing point is computed once per edge,
    so both children share it bit for bit.

    Args:
        vertices: ``(A, K, 2)`` padded polygons.
        counts: ``(A,)`` vertex counts.
        lines: ``(A, 3)`` coefficients ``(a, b, c)``.
        tol: ``(A,)`` absolute tolerance on the line's value.
        labels: optional ``(A, K)`` label of the edge that starts at each vertex.
        cut_label: ``(A,)`` label given to the new edge on the cut line (needed with ``labels``).

    Returns:
        ``(pos_vertices, pos_counts, neg_vertices, neg_counts)`` for the sides where the line is positive and
        negative, plus ``(pos_labels, neg_labels)`` when ``labels`` is given. A side with fewer than 3 vertices
        is empty.
    """
    A, K, _ = vertices.shape
    f = affine_values(lines[:, 0:1], lines[:, 1:2], lines[:, 2:3], vertices[..., 0], vertices[..., 1])
    s = _signs(f, tol)
    valid = vertex_mask(counts, K)
    f_next = f.roll(-1, 1)
    s_next = s.roll(-1, 1)
    cross = (s * s_next) < 0
    t = f / torch.where(cross, f - f_next, torch.ones_like(f))
    x = vertices + t[..., None] * (vertices.roll(-1, 1) - vertices)
    cand = torch.stack([vertices, x], 2).reshape(A, 2 * K, 2)
    keep_pos = torch.stack([valid & (s >= 0), cross], 2).reshape(A, 2 * K)
    keep_neg = torch.stack([valid & (s <= 0), cross], 2).reshape(A, 2 * K)
    if labels is None:
        pv, pc, _ = _compact(cand, keep_pos, None)
        nv, nc, _ = _compact(cand, keep_neg, None)
        return pv, pc, nv, nc
    cut = cut_label[:, None].expand(-1, K)
    # Label of the edge leaving each candidate vertex: the cut line where the child's boundary turns onto it.
    lab_pos = torch.stack(
        [torch.where((s == 0) & (s_next < 0), cut, labels), torch.where(s > 0, cut, labels)], 2
    ).reshape(A, 2 * K)
    lab_neg = torch.stack(
        [torch.where((s == 0) & (s_next > 0), cut, labels), torch.where(s < 0, cut, labels)], 2
    ).reshape(A, 2 * K)
    pv, pc, pl = _compact(cand, keep_pos, lab_pos)
    nv, nc, nl = _compact(cand, keep_neg, lab_neg)
    return pv, pc, nv, nc, pl, nl


def clip_by_halfplanes(
    vertices: torch.Tensor,
    counts: torch.Tensor,
    lines: torch.Tensor,
    tol: torch.Tensor,
    keep_if_on_line: torch.Tensor,
    labels: torch.Tensor | None = None,
    cut_label: torch.Tensor | None = None,
) -> tuple:
    """Intersect each polygon with the half-plane ``a*u + b*v + c >= 0``.

    A polygon lying entirely within ``tol`` of the line is kept whole where ``keep_if_on_line`` is true and
    dropped otherwise; this breaks ties between equal affine functions. Dropped polygons get count 0.

    Returns:
        ``(vertices, counts)`` plus ``labels`` when given.
    """
    A, K, _ = vertices.shape
    f = affine_values(lines[:, 0:1], lines[:, 1:2], lines[:, 2:3], vertices[..., 0], vertices[..., 1])
    s = _signs(f, tol)
    valid = vertex_mask(counts, K)
    any_pos = ((s > 0) & valid).any(1)
    any_neg = ((s < 0) & valid).any(1)
    empty_in = counts < 3
    whole = (~any_neg & any_pos) | (~any_neg & ~any_pos & keep_if_on_line)
    # Only polygons with vertices on both sides are cut; the rest are kept whole or dropped as they are.
    cut = any_pos & any_neg & ~empty_in
    ci = torch.nonzero(cut)[:, 0]
    res = split_by_lines(
        vertices[ci],
        counts[ci],
        lines[ci],
        tol[ci],
        labels[ci] if labels is not None else None,
        cut_label[ci] if cut_label is not None else None,
    )
    pv = res[0]
    W = max(pv.shape[1], K)
    out = torch.zeros(A, W, 2, dtype=vertices.dtype, device=vertices.device)
    out[ci, : pv.shape[1]] = pv
    out[:, :K] = torch.where(whole[:, None, None], vertices, out[:, :K])
    pc = torch.zeros_like(counts)
    pc[ci] = res[1]
    cnt = torch.where(whole, counts, pc)
    cnt = torch.where(~any_pos & ~whole, torch.zeros_like(cnt), cnt)
    cnt = torch.where(empty_in | (cnt < 3), torch.zeros_like(cnt), cnt)
    out = pad_with_first(out, cnt.clamp(min=1))
    if labels is None:
        return out, cnt
    lab = torch.zeros(A, W, dtype=labels.dtype, device=labels.device)
    lab[ci, : res[4].shape[1]] = res[4]
    lab[:, :K] = torch.where(whole[:, None], labels, lab[:, :K])
    return out, cnt, lab


def line_segments_in_polygons(
    vertices: torch.Tensor, counts: torch.Tensor, lines: torch.Tensor, tol: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The segment where each polygon's line crosses its interior.

    Returns:
        ``(segments (A, 2, 2), crossed (A,) bool)``; a polygon is crossed when it has vertices strictly on
        both sides of its line. Lines that only touch a vertex or run along an edge give no segment.
    """
    A, K, _ = vertices.shape
    if vertices.device.type == "cpu":
        with np.errstate(divide="ignore", invalid="ignore"):  # masked-out slots may divide by zero
            seg, ok = _line_segments_np(vertices.numpy(), counts.numpy(), lines.numpy(), tol.numpy())
        return torch.from_numpy(seg), torch.from_numpy(ok)
    f = affine_values(lines[:, 0:1], lines[:, 1:2], lines[:, 2:3], vertices[..., 0], vertices[..., 1])
    s = _signs(f, tol)
    valid = vertex_mask(counts, K)
    crossed = ((s > 0) & valid).any(1) & ((s < 0) & valid).any(1)
    s_next = s.roll(-1, 1)
    cross = (s * s_next) < 0
    t = f / torch.where(cross, f - f.roll(-1, 1), torch.ones_like(f))
    x = vertices + t[..., None] * (vertices.roll(-1, 1) - vertices)
    cand = torch.stack([vertices, x], 2).reshape(A, 2 * K, 2)
    keep = torch.stack([valid & (s == 0), cross], 2).reshape(A, 2 * K)
    pts, n, _ = _compact(cand, keep, None)
    last = (n - 1).clamp(min=0)
    seg = torch.stack([pts[:, 0], pts[torch.arange(A, device=pts.device), last]], 1)
    return seg, crossed & (n >= 2)


def _roll1(x: np.ndarray) -> np.ndarray:
    """``np.roll(x, -1, 1)`` (each row's next slot, cyclically) without its generic overhead."""
    return np.concatenate([x[:, 1:], x[:, :1]], 1)


def _line_segments_np(V, counts, lines, tol):
    """NumPy twin of :func:`line_segments_in_polygons` (same formulas, far fewer microseconds per call)."""
    A, K, _ = V.shape
    f = lines[:, 2:3] + V[..., 0] * lines[:, 0:1] + V[..., 1] * lines[:, 1:2]
    t_ = tol[:, None]
    s = (f > t_).astype(np.int8) - (f < -t_).astype(np.int8)
    valid = np.arange(K)[None, :] < counts[:, None]
    crossed = ((s > 0) & valid).any(1) & ((s < 0) & valid).any(1)
    cross = (s * _roll1(s)) < 0
    keep = np.stack([valid & (s == 0), cross], 2).reshape(A, 2 * K)
    n = keep.sum(1)
    rows = np.arange(A)
    ends = []
    # Candidate 2j is vertex j, candidate 2j+1 the crossing on edge j; only the first and last kept are used.
    for j in (keep.argmax(1), 2 * K - 1 - keep[:, ::-1].argmax(1)):
        k, on_edge = j // 2, (j % 2) == 1
        k1 = (k + 1) % K
        f0, f1 = f[rows, k], f[rows, k1]
        t = np.where(on_edge, f0 / np.where(on_edge, f0 - f1, 1.0), 0.0)
        v0 = V[rows, k]
        ends.append(v0 + t[:, None] * (V[rows, k1] - v0))
    seg = np.stack(ends, 1)
    seg = np.where((n > 0)[:, None, None], seg, V[:, :1])
    return seg, crossed & (n >= 2)


def locate_points(vertices: torch.Tensor, counts: torch.Tensor, uv: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the first polygon containing each point (``-1`` if none), by half-plane tests.

    Scale-free: coordinates are taken relative to the polygons' bounding-box centre, and a point counts as
    inside an edge's half-plane when its signed distance is above ``-1e-12`` of the bounding-box diagonal.
    """
    R, K, _ = vertices.shape
    flat = vertices.reshape(-1, 2)
    lo, hi = flat.amin(0), flat.amax(0)
    centre = (lo + hi) / 2
    diam = float((hi - lo).norm())
    v = vertices - centre
    p_all = uv - centre
    e = v.roll(-1, 1) - v  # (R, K, 2); padded edges have zero length and always pass
    elen = e.norm(dim=-1)
    # Unit edge directions; zero-length edges get a zero direction, so their test reads 0 >= -tol.
    eu = e / torch.where(elen > 0, elen, torch.ones_like(elen))[..., None]
    tol = 1e-12 * diam
    out = torch.full((uv.shape[0],), -1, dtype=torch.long)
    rchunk = max(1, (1 << 22) // max(1, K * min(chunk, max(1, uv.shape[0]))))
    for i in range(0, uv.shape[0], chunk):
        p = p_all[i : i + chunk]
        found = torch.full((p.shape[0],), -1, dtype=torch.long)
        for r0 in range(0, R, rchunk):
            vv, ee = v[r0 : r0 + rchunk], eu[r0 : r0 + rchunk]
            d = p[:, None, None, :] - vv[None]  # (m, r, K, 2)
            dist = ee[None, ..., 0] * d[..., 1] - ee[None, ..., 1] * d[..., 0]  # signed distance, left > 0
            inside = (dist >= -tol).all(-1)  # (m, r)
            hit = inside.any(1) & (found < 0)
            if hit.any():
                found[hit] = r0 + inside[hit].to(torch.int8).argmax(1)
        out[i : i + chunk] = found
    return out


def line_arrangement(
    vertices: torch.Tensor,
    counts: torch.Tensor,
    owner: torch.Tensor,
    lines: torch.Tensor,
    tol: torch.Tensor,
    extent: torch.Tensor,
    max_faces: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each convex polygon by all of its lines at once: the faces of a batch of line arrangements.

    All pairwise intersections of a polygon's lines are computed once and sorted along each line; the faces
    are the cycles of a half-edge structure (turn left at every vertex), walked from each face's lowest vertex.
    The work is a fixed number of array operations whatever the number of lines. It runs in NumPy on the CPU
    (a few microseconds per operation instead of torch's tens, which dominates small problems).

    Only *certified* polygons are cut: every line strictly crosses its polygon, no line passes within ``tol``
    (plus a bound on rounding) of a polygon vertex, of another line's end point or of a neighbouring
    intersection, and the face count matches Euler's formula. Anything closer is a degenerate configuration;
    those polygons are flagged in ``bad`` and must be cut some other way (their lines are ignored here).

    Args:
        vertices: ``(A, K, 2)`` padded convex polygons, counter-clockwise.
        counts: ``(A,)`` vertex counts.
        owner: ``(L,)`` polygon of each line, non-decreasing; every line must strictly cross its polygon.
        lines: ``(L, 3)`` coefficients ``(a, b, c)`` of ``a*u + b*v + c = 0``.
        tol: ``(L,)`` absolute tolerance on each line's value (as in :func:`split_by_lines`).
        extent: ``(2,)`` largest ``|u|``, ``|v|`` over the domain (scales rounding bounds).
        max_faces: raise :class:`~splinecam_lightning.errors.TooManyRegionsError` before building more faces.

    Returns:
        ``(faces (R, W, 2), face_counts (R,), face_owner (R,), bad (A,) bool)`` on the input's device; faces of
        certified polygons only, counter-clockwise and padded with their vertex 0.
    """
    dev = vertices.device
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # parallel pairs are masked out
        res = _arrangement_np(
            vertices.detach().cpu().numpy(),
            counts.cpu().numpy(),
            owner.cpu().numpy(),
            lines.detach().cpu().numpy(),
            tol.detach().cpu().numpy(),
            float(extent.norm()),
            max_faces,
        )
    return tuple(torch.from_numpy(r).to(dev) for r in res)


def _starts(n: np.ndarray) -> np.ndarray:
    return np.cumsum(n) - n


def _stable_group(key: np.ndarray, n: int) -> np.ndarray:
    """Stable argsort of non-negative integers below ``n``, by 15-bit radix passes (NumPy's radix sort)."""
    order = np.argsort((key & 0x7FFF).astype(np.int16), kind="stable")
    shift = 15
    while (n - 1) >> shift:
        order = order[np.argsort(((key[order] >> shift) & 0x7FFF).astype(np.int16), kind="stable")]
        shift += 15
    return order


def _sort_within_groups(group: np.ndarray, val: np.ndarray, n: int) -> np.ndarray:
    """Argsort by ``(group, val)``: group by radix sort, then sort each group's values as one padded row."""
    g = _stable_group(group, n)
    cnt = np.bincount(group, minlength=n)
    width = int(cnt.max()) if cnt.size else 0
    rows = np.nonzero(cnt)[0]
    if rows.shape[0] * width > 4 * group.shape[0] + 1024:  # very uneven groups: one global sort instead
        return np.lexsort((val, group))
    gs = group[g]
    st = np.cumsum(cnt) - cnt
    row_of = np.searchsorted(rows, gs)
    slot = np.arange(g.shape[0]) - st[gs]
    mat = np.full((rows.shape[0], width), np.inf, dtype=val.dtype)
    mat[row_of, slot] = val[g]
    ro = np.argsort(mat, axis=1)
    take = (st[rows][:, None] + ro)[np.arange(width)[None, :] < cnt[rows][:, None]]
    return g[take]


def _arrangement_np(V, counts, owner, lines, tol, scale_x, max_faces, bad=None):
    A, K, _ = V.shape
    L = owner.shape[0]
    dt = V.dtype
    eps = np.finfo(dt).eps
    if bad is None:
        bad = np.zeros(A, dtype=bool)
    if L == 0:
        return V[:0], counts[:0], owner[:0], bad
    a, b, c = lines[:, 0], lines[:, 1], lines[:, 2]
    nrm = np.hypot(a, b)
    margin = tol + nrm * (16 * eps * scale_x)
    li = np.arange(L)

    # ---- each line against its polygon: exactly two crossed edges, no vertex near the line
    pv = np.take(V, owner, axis=0)  # (L, K, 2); np.take: NumPy's fancy indexing is ~6x slower on rows
    f = c[:, None] + pv[..., 0] * a[:, None] + pv[..., 1] * b[:, None]
    valid = np.arange(K)[None, :] < counts[owner][:, None]
    near = (valid & (np.abs(f) <= margin[:, None])).any(1)
    pos = f > 0
    cross = pos != _roll1(pos)
    bad_line = near | (cross.sum(1) != 2)
    if bad_line.any():
        bad[owner[bad_line]] = True
        cross[bad_line] = False
        cross[bad_line, :2] = True  # placeholders keep the shapes; these polygons are redone without them
    e = np.nonzero(cross)[1].reshape(L, 2)  # crossed edges, increasing
    e_n = np.where(e + 1 < K, e + 1, 0)  # the crossed edges' end vertices
    rows = li[:, None]
    f_e = f[rows, e]
    f_n = f[rows, e_n]
    # A bad line's placeholder edges may not cross it (parallel to it: 0 / 0); keep its points finite, since a
    # NaN sort key would misplace other lines' intersections in the sorts below.
    t_e = np.where(bad_line[:, None], 0.5, f_e / (f_e - f_n))
    p0 = pv[rows, e]
    p1 = pv[rows, e_n]
    X = p0 + t_e[..., None] * (p1 - p0)  # (L, 2, 2)
    # Direction d = (-b, a): the line's value grows to its left; s = d . x orders points along the line.
    sX = -b[:, None] * X[..., 0] + a[:, None] * X[..., 1]
    sw = sX[:, 0] > sX[:, 1]
    X[sw] = X[sw][:, ::-1]
    sX[sw] = sX[sw][:, ::-1]
    e[sw] = e[sw][:, ::-1]
    t_e[sw] = t_e[sw][:, ::-1]  # now [entry, exit]

    # ---- all pairs of lines of one polygon
    m = np.bincount(owner, minlength=A)
    start = _starts(m)
    npart = start[owner] + m[owner] - li - 1  # partners k > i
    pi = np.repeat(li, npart)
    pk = pi + 1 + np.arange(pi.shape[0]) - np.repeat(_starts(npart), npart)
    ai, bi, ci, ak, bk, ck = a[pi], b[pi], c[pi], a[pk], b[pk], c[pk]
    det = ai * bk - ak * bi
    nz = det != 0
    sdet = np.where(nz, det, 1.0)
    xu = (bi * ck - bk * ci) / sdet
    xv = (ak * ci - ai * ck) / sdet
    si = -bi * xu + ai * xv
    sk = -bk * xu + ak * xv
    in_i = nz & (si > sX[pi, 0]) & (si < sX[pi, 1])
    in_k = nz & (sk > sX[pk, 0]) & (sk < sX[pk, 1])
    # Each line's end points must be clearly off the polygon's other lines.
    Xi, Xk = np.take(X, pi, axis=0), np.take(X, pk, axis=0)
    fk_i = ck[:, None] + Xi[..., 0] * ak[:, None] + Xi[..., 1] * bk[:, None]
    fi_k = ci[:, None] + Xk[..., 0] * ai[:, None] + Xk[..., 1] * bi[:, None]
    pair_bad = (in_i != in_k) | (np.abs(fk_i) <= margin[pk, None]).any(1) | (np.abs(fi_k) <= margin[pi, None]).any(1)
    inside = in_i & in_k
    # Rounding of an intersection point grows as 1 / sin(angle).
    sin = np.abs(det) / (nrm[pi] * nrm[pk])
    pair_bad |= inside & (sin < 1e-9)
    if pair_bad.any():
        bad[owner[pi[pair_bad]]] = True
    vsel = np.nonzero(inside)[0]
    vi, vk = pi[vsel], pk[vsel]
    vx = np.stack([xu[vsel], xv[vsel]], 1)
    verr = 16 * eps * (scale_x + np.abs(vx).sum(1)) / sin[vsel]
    vdet_pos = det[vsel] > 0
    nV = vsel.shape[0]

    # ---- points along each line, sorted: [vertices on line i | on line k | entries | exits]
    E_line = np.concatenate([vi, vk, li, li])
    E_s = np.concatenate([si[vsel], sk[vsel], sX[:, 0], sX[:, 1]])
    N = E_line.shape[0]
    po = _sort_within_groups(E_line, E_s, L)  # sorted position -> entry
    inv = np.empty(N, dtype=np.int64)
    inv[po] = np.arange(N)
    lpos_first = inv[2 * nV + li]
    lpos_last = inv[2 * nV + L + li]
    npts = np.bincount(E_line, minlength=L)
    lstart = _starts(npts)
    order_bad = (lpos_first != lstart) | (lpos_last != lstart + npts - 1)
    if order_bad.any():
        bad[owner[order_bad]] = True
    is_int = po < 2 * nV
    vid = np.where(is_int, po % max(nV, 1), 0)
    line_of = E_line[po]
    # Neighbouring vertices along a line must be clearly off each other's second line.
    if nV:
        other = np.where(po < nV, vk[vid], vi[vid])
        j = np.nonzero(is_int[:-1] & is_int[1:] & (line_of[:-1] == line_of[1:]))[0]
        va, vb, la, lb = vid[j], vid[j + 1], other[j], other[j + 1]
        err = verr[va] + verr[vb]
        fa = a[lb] * vx[va, 0] + b[lb] * vx[va, 1] + c[lb]
        fb = a[la] * vx[vb, 0] + b[la] * vx[vb, 1] + c[la]
        close = (np.abs(fa) <= tol[lb] + nrm[lb] * err) | (np.abs(fb) <= tol[la] + nrm[la] * err) | (la == lb)
        if close.any():
            bad[owner[line_of[j[close]]]] = True
    if bad[owner].any():
        return _redo(V, counts, owner, lines, tol, scale_x, max_faces, bad)
    # Faces of a simple arrangement in a convex polygon: 1 + lines + interior vertices, per polygon.
    expect = (m > 0) + m + np.bincount(owner[vi], minlength=A)
    if max_faces is not None and int(expect.sum()) > max_faces:
        raise TooManyRegionsError(
            f"the partition has more than max_regions={max_faces} regions; raise max_regions or use a smaller domain"
        )

    # ---- boundary cycle of every polygon with the line end points on it, counter-clockwise
    poly = np.nonzero(m)[0]
    pc = counts[poly]
    pv_own = np.repeat(poly, pc)
    pv_slot = np.arange(pv_own.shape[0]) - np.repeat(_starts(pc), pc)
    nPV = pv_own.shape[0]
    B_key = np.concatenate([pv_own * K + pv_slot, np.repeat(owner, 2) * K + e.reshape(-1)])
    B_t = np.concatenate([np.full(nPV, -1.0, dtype=dt), t_e.reshape(-1)])
    B_xy = np.concatenate([np.take(V.reshape(-1, 2), pv_own * K + pv_slot, axis=0), X.reshape(-1, 2)])
    bperm = _sort_within_groups(B_key, B_t, A * K)
    nB = bperm.shape[0]
    binv = np.empty(nB, dtype=np.int64)
    binv[bperm] = np.arange(nB)
    B_own = B_key[bperm] // K
    bcnt = np.bincount(B_own, minlength=A)[poly]
    bfirst = np.repeat(_starts(bcnt), bcnt)
    bpos = np.arange(nB)
    bsucc = np.where(bpos == bfirst + np.repeat(bcnt, bcnt) - 1, bfirst, bpos + 1)

    # ---- half-edges: 2p forward from sorted point p, 2p+1 backward into p, 2N+beta along the boundary
    H = 2 * N + nB
    ids = np.arange(H)
    not_last = np.ones(N, dtype=bool)
    not_last[lpos_last] = False
    sib = inv[np.where(po < nV, po + nV, po - nV).clip(0, N - 1)]
    dsg = (po < nV) == vdet_pos[vid] if nV else np.ones(N, dtype=bool)  # det(this line, other line) > 0
    bp_end = binv[nPV + np.arange(2 * L)].reshape(L, 2)
    # Forward 2p ends at p+1, backward 2p+1 ends at p: turn left onto the other line, or follow the boundary.
    pf = np.minimum(np.arange(N) + 1, N - 1)
    pb = np.arange(N)
    nx_f = np.where(is_int[pf], np.where(dsg[pf], 2 * sib[pf], 2 * sib[pf] - 1), 2 * N + bp_end[line_of[pf], 1])
    nx_b = np.where(is_int[pb], np.where(dsg[pb], 2 * sib[pb] - 1, 2 * sib[pb]), 2 * N + bp_end[line_of[pb], 0])
    orig = bperm[bsucc] - nPV  # boundary half-edge beta ends at succ(beta): a polygon vertex or a line end
    ln_b = np.maximum(orig, 0) // 2
    nx_line = np.where(orig % 2 == 0, 2 * lpos_first[ln_b], 2 * lpos_last[ln_b] - 1)
    nx_bd = np.where(orig < 0, 2 * N + bsucc, nx_line)
    nx = np.concatenate([np.stack([nx_f, nx_b], 1).reshape(-1), nx_bd])
    hvalid = np.concatenate([np.repeat(not_last, 2), np.ones(nB, dtype=bool)])
    nx = np.where(hvalid, nx, ids)
    E_xy = np.take(np.concatenate([vx, vx, X[:, 0], X[:, 1]]), po, axis=0)
    start_xy = np.concatenate([np.stack([E_xy, np.roll(E_xy, -1, 0)], 1).reshape(-1, 2), np.take(B_xy, bperm, axis=0)])

    # ---- faces: each convex face has one lowest vertex (by (v, u)); walk its cycle from there
    sel = np.nonzero(hvalid)[0]
    prv = ids.copy()
    prv[nx[sel]] = sel
    y, x = start_xy[:, 1], start_xy[:, 0]

    def below(h: np.ndarray, q: np.ndarray) -> np.ndarray:
        yh, yq = np.take(y, h), np.take(y, q)
        return (yh < yq) | ((yh == yq) & (np.take(x, h) < np.take(x, q)))

    hid = sel[below(sel, prv[sel])]
    hid = hid[below(hid, nx[hid])]
    own_h = np.concatenate([np.repeat(owner[line_of], 2), B_own])
    fown = own_h[hid]
    # Two local minima (rounding on nearly collinear vertices) would show as a wrong face count.
    wrong = np.bincount(fown, minlength=A) != expect
    R = hid.shape[0]
    cap = K + 2 * int(m.max()) + 4  # no face has more edges than its polygon and its lines together
    slots = np.empty((R, min(cap, 8)), dtype=np.int64)
    fcnt = np.zeros(R, dtype=np.int64)
    act = np.arange(R)
    cur = hid
    step = 0
    while act.shape[0] and step < cap:
        if step == slots.shape[1]:
            slots = np.concatenate([slots, np.empty_like(slots)], 1)
        slots[act, step] = cur
        cur = nx[cur]
        step += 1
        alive = cur != hid[act]
        fcnt[act[~alive]] = step
        act, cur = act[alive], cur[alive]
    if act.shape[0]:
        wrong[fown[act]] = True
    if wrong.any():
        return _redo(V, counts, owner, lines, tol, scale_x, max_faces, bad | wrong)
    W = int(fcnt.max())
    slots = slots[:, :W]
    pad = np.arange(W)[None, :] >= fcnt[:, None]
    slots[pad] = np.broadcast_to(slots[:, :1], slots.shape)[pad]
    return np.take(start_xy, slots, axis=0), fcnt, fown, bad


def _redo(V, counts, owner, lines, tol, scale_x, max_faces, bad):
    """Certification is per polygon: drop the flagged ones' lines and cut the rest again."""
    keep = ~bad[owner]
    return _arrangement_np(V, counts, owner[keep], lines[keep], tol[keep], scale_x, max_faces, bad)
