"""Batched convex-polygon geometry on padded tensors.

A batch of convex polygons is a ``(A, K, 2)`` tensor plus ``(A,)`` vertex counts. Slots past a polygon's count
repeat its vertex 0, so the cyclic vertex sequence is the same polygon with zero-length edges appended: shoelace,
centroid and edge loops work on whole rows without masks. Every function here keeps that invariant.
"""

from __future__ import annotations

import torch

from splinecam_lightning.errors import TooManyRegionsError

__all__ = [
    "polygon_areas",
    "polygon_centroids",
    "polygon_covariances",
    "vertex_means",
    "pad_with_first",
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
    mask = (torch.arange(K, device=vertices.device)[None, :] < counts[:, None]).to(vertices.dtype)
    return (vertices * mask[..., None]).sum(1) / counts[:, None].to(vertices.dtype)


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
    f = torch.addcmul(torch.addcmul(lines[:, 2:3], vertices[..., 0], lines[:, 0:1]), vertices[..., 1], lines[:, 1:2])
    s = _signs(f, tol)
    valid = torch.arange(K, device=vertices.device)[None, :] < counts[:, None]
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
    f = torch.addcmul(torch.addcmul(lines[:, 2:3], vertices[..., 0], lines[:, 0:1]), vertices[..., 1], lines[:, 1:2])
    s = _signs(f, tol)
    valid = torch.arange(K, device=vertices.device)[None, :] < counts[:, None]
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
    f = torch.addcmul(torch.addcmul(lines[:, 2:3], vertices[..., 0], lines[:, 0:1]), vertices[..., 1], lines[:, 1:2])
    s = _signs(f, tol)
    valid = torch.arange(K, device=vertices.device)[None, :] < counts[:, None]
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


def _segment_starts(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


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

    All pairwise intersections of a polygon's lines are computed once, sorted along each line, and the faces
    are the cycles of a half-edge structure (turn left at every vertex), found by pointer jumping. The work
    is a fixed number of tensor operations, independent of the number of lines.

    The result is only used for *certified* polygons: every line strictly crosses its polygon, no line passes
    within ``tol`` (plus a bound on rounding) of a polygon vertex or of another pair's intersection, and no
    intersection is ambiguous about being inside. Anything closer is a degenerate configuration; those polygons
    are reported in ``bad`` and must be cut some other way (their lines are ignored here).

    Args:
        vertices: ``(A, K, 2)`` padded convex polygons, counter-clockwise.
        counts: ``(A,)`` vertex counts.
        owner: ``(L,)`` polygon of each line, non-decreasing; every line must strictly cross its polygon.
        lines: ``(L, 3)`` coefficients ``(a, b, c)`` of ``a*u + b*v + c = 0``.
        tol: ``(L,)`` absolute tolerance on each line's value (as in :func:`split_by_lines`).
        extent: ``(2,)`` largest ``|u|``, ``|v|`` over the domain (scales rounding bounds).
        max_faces: raise :class:`~splinecam_lightning.errors.TooManyRegionsError` before building more faces.

    Returns:
        ``(faces (R, W, 2), face_counts (R,), face_owner (R,), bad (A,) bool)``; faces of certified polygons
        only, counter-clockwise and padded with their vertex 0.
    """
    dev, dt = vertices.device, vertices.dtype
    A, K, _ = vertices.shape
    L = owner.shape[0]
    eps = torch.finfo(dt).eps
    a, b, c = lines[:, 0], lines[:, 1], lines[:, 2]
    nrm = torch.hypot(a, b)
    scale_x = float(extent.norm())
    bad = torch.zeros(A, dtype=torch.bool, device=dev)

    # ---- each line against its polygon: two boundary crossings, no vertex near the line
    pv = vertices[owner]  # (L, K, 2)
    f = torch.addcmul(torch.addcmul(c[:, None], pv[..., 0], a[:, None]), pv[..., 1], b[:, None])
    valid = torch.arange(K, device=dev)[None, :] < counts[owner][:, None]
    margin = tol + nrm * (16 * eps * scale_x)
    near = (valid & (f.abs() <= margin[:, None])).any(1)
    s = torch.where(f > 0, 1, -1).to(torch.int8)
    cross = (s * s.roll(-1, 1)) < 0
    two = cross.sum(1) == 2
    bad_line = near | ~two
    cross &= ~bad_line[:, None]
    cross[bad_line, :2] = True  # placeholder edges keep the shapes; the polygon is dropped below
    e = torch.nonzero(cross)[:, 1].reshape(L, 2)  # crossed edge indices, increasing
    f_e = torch.gather(f, 1, e)
    f_n = torch.gather(f.roll(-1, 1), 1, e)
    t_e = f_e / (f_e - f_n)
    p0 = torch.gather(pv, 1, e[..., None].expand(-1, -1, 2))
    p1 = torch.gather(pv.roll(-1, 1), 1, e[..., None].expand(-1, -1, 2))
    X = p0 + t_e[..., None] * (p1 - p0)  # (L, 2, 2) the two boundary points
    # Direction d = (-b, a): the line's value grows to its left. s = d . x orders points along the line.
    sX = -b[:, None] * X[..., 0] + a[:, None] * X[..., 1]
    swap = sX[:, 0] > sX[:, 1]
    ent = torch.where(swap, 1, 0)
    idx2 = torch.stack([ent, 1 - ent], 1)
    X = torch.gather(X, 1, idx2[..., None].expand(-1, -1, 2))  # [entry, exit]
    sX = torch.gather(sX, 1, idx2)
    eX = torch.gather(e, 1, idx2)
    tX = torch.gather(t_e, 1, idx2)
    bad[owner[bad_line]] = True

    # ---- all pairs of lines of the same polygon
    m = torch.bincount(owner, minlength=A)
    start = _segment_starts(m)
    li = torch.arange(L, device=dev)
    npart = start[owner] + m[owner] - li - 1  # partners k > i in the same polygon
    tot = int(npart.sum())
    pi = torch.repeat_interleave(li, npart)
    pk = pi + 1 + torch.arange(tot, device=dev) - _segment_starts(npart)[pi]
    ai, bi, ci, ak, bk, ck = a[pi], b[pi], c[pi], a[pk], b[pk], c[pk]
    det = ai * bk - ak * bi
    nz = det != 0
    sdet = torch.where(nz, det, torch.ones_like(det))
    xu = (bi * ck - bk * ci) / sdet
    xv = (ak * ci - ai * ck) / sdet
    si = -bi * xu + ai * xv
    sk = -bk * xu + ak * xv
    in_i = nz & (si > sX[pi, 0]) & (si < sX[pi, 1])
    in_k = nz & (sk > sX[pk, 0]) & (sk < sX[pk, 1])
    # Each line's end points must be clearly off every other line of its polygon.
    Xi, Xk = X.index_select(0, pi), X.index_select(0, pk)
    fk_i = torch.addcmul(torch.addcmul(ck[:, None], Xi[..., 0], ak[:, None]), Xi[..., 1], bk[:, None])
    fi_k = torch.addcmul(torch.addcmul(ci[:, None], Xk[..., 0], ai[:, None]), Xk[..., 1], bi[:, None])
    pair_bad = (in_i != in_k) | (fk_i.abs() <= margin[pk, None]).any(1) | (fi_k.abs() <= margin[pi, None]).any(1)
    inside = in_i & in_k
    # Rounding of an intersection point grows as 1 / sin(angle); bound it for the neighbour tests below.
    sin = det.abs() / (nrm[pi] * nrm[pk])
    pair_bad |= inside & (sin < 1e-9)
    bad[owner[pi[pair_bad]]] = True

    V_idx = torch.nonzero(inside)[:, 0]
    vi, vk = pi[V_idx], pk[V_idx]
    vx = torch.stack([xu[V_idx], xv[V_idx]], 1)  # (V, 2) interior vertices
    verr = 16 * eps * (scale_x + vx.abs().sum(1)) / sin[V_idx]
    vdet = det[V_idx]
    nV = V_idx.shape[0]

    # ---- points along each line: [interior vertices on line i, on line k, entries, exits], sorted
    E_line = torch.cat([vi, vk, li, li])
    E_s = torch.cat([si[V_idx], sk[V_idx], sX[:, 0], sX[:, 1]])
    N = E_line.shape[0]
    o1 = torch.argsort(E_s)
    o2 = torch.sort(E_line[o1], stable=True).indices
    perm = o1[o2]  # sorted position -> original entry
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(N, device=dev)
    lpos_first = inv[2 * nV + li]  # sorted position of each line's entry point
    lpos_last = inv[2 * nV + L + li]
    npts = torch.bincount(E_line, minlength=L)
    lstart = _segment_starts(npts)
    # The entry must sort first and the exit last on every line (strict insideness guarantees it).
    order_bad = (lpos_first != lstart) | (lpos_last != lstart + npts - 1)
    bad[owner[order_bad]] = True

    # Neighbouring vertices along a line: each must be clearly off the other's second line.
    po = perm
    is_int = po < 2 * nV
    vid = torch.where(is_int, po % max(nV, 1), 0)  # vertex of each sorted point (interior ones)
    other = torch.where(po < nV, vk[vid] if nV else po, vi[vid] if nV else po)  # the second line there
    nb = is_int[:-1] & is_int[1:] & (E_line[po[:-1]] == E_line[po[1:]]) if N > 1 else is_int[:0]
    if nV and bool(nb.any()):
        j = torch.nonzero(nb)[:, 0]
        va, vb = vid[j], vid[j + 1]
        la, lb = other[j], other[j + 1]  # the second lines at the two vertices
        fa = a[lb] * vx[va, 0] + b[lb] * vx[va, 1] + c[lb]
        fb = a[la] * vx[vb, 0] + b[la] * vx[vb, 1] + c[la]
        close = (fa.abs() <= tol[lb] + nrm[lb] * (verr[va] + verr[vb])) | (
            fb.abs() <= tol[la] + nrm[la] * (verr[va] + verr[vb])
        )
        close |= la == lb
        bad[owner[E_line[po[j[close]]]]] = True

    if bool(bad.any()):
        keep = ~bad[owner]
        if not bool(keep.any()):
            empty = vertices[:0]
            return empty, counts[:0], owner[:0], bad
        # Certification is per polygon, so the certified ones pass again on their own.
        fv, fc, fo, bad2 = line_arrangement(vertices, counts, owner[keep], lines[keep], tol[keep], extent, max_faces)
        return fv, fc, fo, bad | bad2
    # Faces of a simple arrangement in a convex polygon: 1 + lines + interior vertices, per polygon.
    if max_faces is not None and int(torch.unique(owner).shape[0]) + L + nV > max_faces:
        raise TooManyRegionsError(
            f"the partition has more than max_regions={max_faces} regions; raise max_regions or use a smaller domain"
        )

    # ---- boundary cycle of every polygon with its crossing points, counter-clockwise
    Pidx = torch.unique(owner)  # polygons that have lines (all of them, in practice)
    pv_cnt = counts[Pidx]
    pv_own = torch.repeat_interleave(Pidx, pv_cnt)
    pv_slot = torch.arange(pv_own.shape[0], device=dev) - _segment_starts(pv_cnt).repeat_interleave(pv_cnt)
    B_key = torch.cat([pv_own * K + pv_slot, owner.repeat_interleave(2) * K + eX.reshape(-1)])
    B_t = torch.cat([torch.full((pv_own.shape[0],), -1.0, dtype=dt, device=dev), tX.reshape(-1)])
    B_xy = torch.cat([vertices[pv_own, pv_slot], X.reshape(-1, 2)])
    nPV = pv_own.shape[0]
    q1 = torch.argsort(B_t)
    q2 = torch.sort(B_key[q1], stable=True).indices
    bperm = q1[q2]
    nB = bperm.shape[0]
    binv = torch.empty_like(bperm)
    binv[bperm] = torch.arange(nB, device=dev)
    B_own = B_key[bperm] // K
    bcnt = torch.bincount(B_own, minlength=A)[Pidx]
    bstart = _segment_starts(bcnt)
    bpos = torch.arange(nB, device=dev)
    bfirst = torch.repeat_interleave(bstart, bcnt)
    blast = bfirst + torch.repeat_interleave(bcnt, bcnt) - 1
    bsucc = torch.where(bpos == blast, bfirst, bpos + 1)

    # ---- half-edges: 2*pi forward from sorted point pi, 2*pi+1 backward into pi, 2N+beta along the boundary
    H = 2 * N + nB
    last_on_line = torch.zeros(N, dtype=torch.bool, device=dev)
    last_on_line[lpos_last] = True
    sib = torch.where(is_int, inv[torch.where(po < nV, po + nV, po - nV).clamp(max=N - 1)], 0)
    dsg = torch.where(po < nV, 1, -1) * torch.where(vdet[vid] > 0, 1, -1) if nV else torch.ones_like(po)
    # Boundary-cycle position of the line end points (entries then exits, in original order).
    bp_of_end = binv[nPV + torch.arange(2 * L, device=dev)].reshape(L, 2)
    line_of = E_line[po]
    # Forward half-edge 2*pi ends at pi+1; backward 2*pi+1 ends at pi.
    end_f = (torch.arange(N, device=dev) + 1).clamp(max=N - 1)
    end_b = torch.arange(N, device=dev)

    def after_interior(endp: torch.Tensor, fwd: bool) -> torch.Tensor:
        ln = line_of[endp]
        sgn = dsg[endp] if fwd else -dsg[endp]  # turn left onto the other line
        sp = sib[endp]
        nxt_int = torch.where(sgn > 0, 2 * sp, 2 * (sp - 1) + 1)
        on_bd = ~is_int[endp]
        nxt_bd = 2 * N + bp_of_end[ln, 1 if fwd else 0]
        return torch.where(on_bd, nxt_bd, nxt_int)

    nx_f = after_interior(end_f, True)
    nx_b = after_interior(end_b, False)
    nx_int = torch.stack([nx_f, nx_b], 1).reshape(-1)
    hv_int = (~last_on_line).repeat_interleave(2)
    # Boundary half-edge beta ends at succ(beta): a polygon vertex (continue along the boundary) or a line end.
    bs = bsucc
    orig = bperm[bs]
    is_pv = orig < nPV
    end_id = (orig - nPV).clamp(min=0)
    ln_b = end_id // 2
    is_entry = (end_id % 2) == 0
    nxt_line = torch.where(is_entry, 2 * lpos_first[ln_b], 2 * (lpos_last[ln_b] - 1) + 1)
    nx_bd = torch.where(is_pv, 2 * N + bs, nxt_line)
    ids = torch.arange(H, device=dev)
    nx = torch.cat([nx_int, nx_bd])
    hvalid = torch.cat([hv_int, torch.ones(nB, dtype=torch.bool, device=dev)])
    nx = torch.where(hvalid, nx, ids)

    # ---- faces are the cycles of nx. Each convex face has one lowest vertex (by (v, u)); walk from the
    # half-edge leaving it. Random gathers stay proportional to the output size.
    E_xy = torch.cat([vx, vx, X[:, 0], X[:, 1]]).index_select(0, po)  # (N, 2) points in sorted order
    start_int = torch.stack([E_xy, torch.cat([E_xy[1:], E_xy[:1]])], 1).reshape(-1, 2)
    start = torch.cat([start_int, B_xy.index_select(0, bperm)])
    sel = torch.nonzero(hvalid)[:, 0]
    prv = ids.clone()
    prv[nx[sel]] = sel
    sp, sn = start.index_select(0, prv), start.index_select(0, nx)

    def below(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (p[:, 1] < q[:, 1]) | ((p[:, 1] == q[:, 1]) & (p[:, 0] < q[:, 0]))

    is_head = hvalid & below(start, sp) & below(start, sn)
    hid = torch.nonzero(is_head)[:, 0]
    own_h = torch.cat([owner[line_of].repeat_interleave(2), B_own])
    fown = own_h[hid]
    # A face with two local minima (rounding on nearly collinear vertices) would show as a wrong face count.
    expect = 1 + torch.bincount(owner, minlength=A) + torch.bincount(owner[vi], minlength=A)
    got = torch.bincount(fown, minlength=A)
    wrong = (got != expect) & (torch.bincount(owner, minlength=A) > 0)
    R = hid.shape[0]
    cap = K + 2 * int(m.max()) + 4  # no face has more edges than its polygon plus its lines
    slots = torch.empty(R, min(cap, 8), dtype=torch.long, device=dev)
    fcnt = torch.zeros(R, dtype=torch.long, device=dev)
    act = torch.arange(R, device=dev)
    cur = hid
    step = 0
    while act.numel() and step < cap:
        if step == slots.shape[1]:
            slots = torch.cat([slots, torch.empty_like(slots)], 1)
        slots[act, step] = cur
        cur = nx[cur]
        step += 1
        alive = cur != hid[act]
        fcnt[act[~alive]] = step
        act, cur = act[alive], cur[alive]
    if act.numel():
        wrong[fown[act]] = True
    if bool(wrong.any()):
        keep = ~wrong[owner]
        fv, fc, fo, bad2 = line_arrangement(vertices, counts, owner[keep], lines[keep], tol[keep], extent, max_faces)
        return fv, fc, fo, wrong | bad2
    W = int(fcnt.max()) if R else 1
    slots = slots[:, :W]
    valid_slot = torch.arange(W, device=dev)[None, :] < fcnt[:, None]
    out = start.index_select(0, torch.where(valid_slot, slots, slots[:, :1]).reshape(-1)).reshape(R, W, 2)
    return out, fcnt, fown, bad
