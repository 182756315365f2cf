"""Batched convex-polygon geometry on padded tensors.

A batch of convex polygons is a ``(A, K, 2)`` tensor plus ``(A,)`` vertex counts. Slots past a polygon's count
repeat its vertex 0, so the cyclic vertex sequence is the same polygon with zero-length edges appended: shoelace,
centroid and edge loops work on whole rows without masks. Every function here keeps that invariant.
"""

from __future__ import annotations

import torch

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
