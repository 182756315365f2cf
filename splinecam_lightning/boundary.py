"""Decision boundaries and level sets inside an exact partition."""

from __future__ import annotations

import numpy as np
import torch

from splinecam_lightning import geometry
from splinecam_lightning.refine import REL_TOL, _centre_lead, _centre_radius, _scale, split_by_argmax

__all__ = ["decision_boundary", "sample_boundary", "class_cells", "cells_of_classes"]

# Work (regions x vertices x outputs) above which the tie check first clears regions by a centre test.
_LEAD_FILTER_MIN = 1 << 16


def decision_boundary(
    vertices: torch.Tensor,
    counts: torch.Tensor,
    jacobians: torch.Tensor,
    offsets: torch.Tensor,
    extent: torch.Tensor,
    class_pair: tuple[int, int] | None = None,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact decision boundary of a piecewise-affine map over its regions.

    For one output it is the zero level set: the segment where each region's affine output crosses 0. For
    several outputs it is the boundary between argmax classes: inside each region the class cells are the
    argmax partition of the region's affine scores, and the boundary is every cell edge that lies inside the
    region (ties go to the lower class index, as in ``argmax``).

    Args:
        vertices, counts: regions (padded).
        jacobians: ``(R, O, 2)``; offsets: ``(R, O)`` per-region affine outputs.
        extent: ``(2,)`` largest ``|u|``, ``|v|`` over the domain (scales the tolerance).
        class_pair: keep only the boundary between these two classes (several outputs only).
        groups: ``(R,)`` index of the partition each region belongs to, when several partitions (of slices
            batched together, each in its own plane coordinates) are passed at once.

    Returns:
        ``(segments (E, 2, 2), region index (E,), class pair (E, 2))``.
    """
    if offsets.shape[1] == 1 and vertices.device.type == "cpu":
        segs, regs, pairs, tied = _one_output_np(vertices, counts, jacobians, offsets, extent)
    else:
        segs, regs, pairs = _boundary_inside_regions(vertices, counts, jacobians, offsets, extent, class_pair)
        tied = _tied_edge_regions(vertices, counts, jacobians, offsets, extent)
    if groups is None and bool(tied.any()):
        s2, r2, p2 = _boundary_along_edges(vertices, counts, jacobians, offsets, extent, class_pair)
        segs, regs, pairs = torch.cat([segs, s2]), torch.cat([regs, r2]), torch.cat([pairs, p2])
    elif groups is not None:
        # Edge matching assumes one tiling, so it runs per group, only for the (rare) groups with such ties.
        for g in torch.unique(groups[tied]).tolist():
            idx = torch.nonzero(groups == g)[:, 0]
            s2, r2, p2 = _boundary_along_edges(
                vertices[idx], counts[idx], jacobians[idx], offsets[idx], extent, class_pair
            )
            segs, regs, pairs = torch.cat([segs, s2]), torch.cat([regs, idx[r2]]), torch.cat([pairs, p2])
    return segs, regs, pairs


def _output_maps(jacobians: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The outputs as the engine's maps ``(R, 3, O)`` (rows ``du``, ``dv``, value at 0), e.g. for :func:`_scale`."""
    return torch.cat([jacobians.transpose(1, 2), offsets[:, None, :]], 1)


def _tied_edge_regions(vertices, counts, jacobians, offsets, extent) -> torch.Tensor:
    """Cheap test, ``(R,)``: has some edge of the region the top two classes tied (output 0) at both ends?"""
    R, O = offsets.shape
    if O > 1 and R * vertices.shape[1] * O > _LEAD_FILTER_MIN:
        # Regions whose best class leads clearly everywhere (centre test) have no tie; test the others.
        M = _output_maps(jacobians, offsets)  # (R, 3, O)
        sc = _scale(M, extent)  # (R, O)
        lead = _centre_lead(*_centre_radius(vertices), M, extent).amin(-1)
        cand = torch.nonzero(~(lead > REL_TOL * 2 * sc.amax(1) * (1 + 1e-6)))[:, 0]
        tied = torch.zeros(R, dtype=torch.bool, device=vertices.device)
        tied[cand] = _tied_edge_regions_exact(vertices[cand], counts[cand], jacobians[cand], offsets[cand], extent)
        return tied
    return _tied_edge_regions_exact(vertices, counts, jacobians, offsets, extent)


def _tied_edge_regions_exact(vertices, counts, jacobians, offsets, extent) -> torch.Tensor:
    R, O = offsets.shape
    K = vertices.shape[1]
    y = torch.einsum("rok,rvk->rvo", jacobians, vertices) + offsets[:, None, :]  # (R, K, O)
    if O == 1:
        y = torch.cat([torch.zeros_like(y), y], 2)
    sc = _scale(_output_maps(jacobians, offsets), extent)  # (R, O)
    tol = REL_TOL * 2 * sc.amax(1, keepdim=True)  # (R, 1)
    top = y.topk(2, dim=2).values
    tie = (top[..., 0] - top[..., 1]) <= tol  # (R, K)
    valid = geometry.vertex_mask(counts, K)
    last = torch.arange(K, device=vertices.device)[None, :] == (counts[:, None] - 1)
    nxt = torch.where(last, tie[:, :1].expand(-1, K), tie.roll(-1, 1))
    # A region tied everywhere (the output vanishes on it) has no sign change of its own.
    everywhere = (tie | ~valid).all(1, keepdim=True)
    return (tie & nxt & valid & ~everywhere).any(1)


def _one_output_np(vertices, counts, jacobians, offsets, extent):
    """One output on the CPU: :func:`_boundary_inside_regions` and :func:`_tied_edge_regions` with the same
    formulas in NumPy (the same results, in far fewer microseconds for small partitions)."""
    V, cnt = vertices.numpy(), counts.numpy()
    J, off = jacobians.numpy()[:, 0], offsets.numpy()[:, 0]  # (R, 2), (R,)
    R, K, _ = V.shape
    lines = np.stack([J[:, 0], J[:, 1], off], 1)
    sc = _scale(_output_maps(jacobians, offsets), extent)[:, 0].numpy()
    tol = REL_TOL * sc
    valid = np.arange(K)[None, :] < cnt[:, None]
    # Segments only for the regions the zero line crosses (vertices strictly on both sides), as the NumPy
    # segment step would find them: its rows are independent.
    f = lines[:, 2:3] + V[..., 0] * lines[:, 0:1] + V[..., 1] * lines[:, 1:2]
    cand = np.nonzero(((f > tol[:, None]) & valid).any(1) & ((f < -tol[:, None]) & valid).any(1))[0]
    with np.errstate(divide="ignore", invalid="ignore"):  # masked-out slots may divide by zero
        seg, ok = geometry._line_segments_np(V[cand], cnt[cand], lines[cand], tol[cand])
    idx, seg = cand[ok], seg[ok]
    # Tied edges: the output is 0 (within tolerance) at both ends of some edge; the top two of (0, y) differ
    # by |y| exactly.
    y = (J[:, None, 0] * V[..., 0] + J[:, None, 1] * V[..., 1]) + off[:, None]
    tie = (np.abs(y) <= (REL_TOL * 2) * sc[:, None]) & valid
    tied = np.zeros(R, dtype=bool)
    r = np.nonzero(tie.sum(1) >= 2)[0]  # an edge tied at both ends needs two tied vertices
    if r.shape[0]:
        tie, valid, c = tie[r], valid[r], cnt[r]
        last = np.arange(K)[None, :] == (c[:, None] - 1)
        nxt = np.where(last, tie[:, :1], geometry._roll1(tie))
        everywhere = (tie | ~valid).all(1, keepdims=True)
        tied[r] = (tie & nxt & ~everywhere).any(1)
    cls = torch.tensor([[0, 1]], dtype=torch.long).expand(len(idx), -1).contiguous()
    return torch.from_numpy(seg), torch.from_numpy(idx), cls, torch.from_numpy(tied)


def _boundary_along_edges(vertices, counts, jacobians, offsets, extent, class_pair):
    """Boundary segments that run exactly along region edges: shared by class cells of different regions."""
    from splinecam_lightning.graph import polygon_adjacency

    dev = vertices.device
    cv, cc, cls, region = cells_of_classes(vertices, counts, jacobians, offsets, extent)
    pairs, seg = polygon_adjacency(cv, cc, return_segments=True)
    if len(pairs):
        pairs_t = torch.as_tensor(pairs, device=dev)
        ca, cb = cls[pairs_t[:, 0]], cls[pairs_t[:, 1]]
        keep = (region[pairs_t[:, 0]] != region[pairs_t[:, 1]]) & (ca != cb)
        lo, hi = torch.minimum(ca, cb), torch.maximum(ca, cb)
        if class_pair is not None:
            a, b = sorted(int(c) for c in class_pair)
            keep &= (lo == a) & (hi == b)
        seg_t = torch.as_tensor(seg, dtype=vertices.dtype, device=dev)[keep]
        # Attribute each segment to the region of its lower-class cell.
        owner = torch.where(ca <= cb, region[pairs_t[:, 0]], region[pairs_t[:, 1]])[keep]
        return seg_t, owner, torch.stack([lo, hi], 1)[keep]
    return (
        torch.zeros(0, 2, 2, dtype=vertices.dtype, device=dev),
        torch.zeros(0, dtype=torch.long, device=dev),
        torch.zeros(0, 2, dtype=torch.long, device=dev),
    )


def _boundary_inside_regions(vertices, counts, jacobians, offsets, extent, class_pair):
    """Boundary segments that cross region interiors (the generic case)."""
    dev = vertices.device
    R, O = offsets.shape
    if O == 1:
        lines = torch.cat([jacobians[:, 0, :], offsets], 1)  # (R, 3)
        tol = REL_TOL * _scale(lines[:, :, None], extent)[:, 0]
        seg, ok = geometry.line_segments_in_polygons(vertices, counts, lines, tol)
        idx = torch.nonzero(ok)[:, 0]
        cls = torch.tensor([[0, 1]], dtype=torch.long, device=dev).expand(len(idx), -1)
        return seg[idx], idx, cls.contiguous()
    M = _output_maps(jacobians, offsets)  # (R, 3, O)
    idx, _, (cv, cc, poly, cls, lab) = split_by_argmax(vertices, counts, M, extent)
    if idx.numel() == 0:
        return (
            torch.zeros(0, 2, 2, dtype=vertices.dtype, device=dev),
            idx,
            torch.zeros(0, 2, dtype=torch.long, device=dev),
        )
    K = cv.shape[1]
    valid = geometry.vertex_mask(cc, K)
    # An edge cut by class j inside a cell of class i separates i from j; keep each shared edge once (i < j).
    keep = valid & (lab >= 0) & (cls[:, None] < lab)
    if class_pair is not None:
        a, b = sorted(int(c) for c in class_pair)
        keep &= (cls[:, None] == a) & (lab == b)
    nxt = cv.roll(-1, 1)
    # The edge leaving the last real vertex closes the polygon at vertex 0.
    last = torch.arange(K, device=dev)[None, :] == (cc[:, None] - 1)
    nxt = torch.where(last[..., None], cv[:, :1].expand(-1, K, -1), nxt)
    c_i, k_i = torch.nonzero(keep, as_tuple=True)
    seg = torch.stack([cv[c_i, k_i], nxt[c_i, k_i]], 1)
    length = (seg[:, 1] - seg[:, 0]).norm(dim=1)
    nz = length > 0
    pairs = torch.stack([cls[c_i], lab[c_i, k_i]], 1)
    return seg[nz], idx[poly[c_i]][nz], pairs[nz]


def sample_boundary(partition, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Points spread uniformly by length along the decision boundary, in input space.

    Args:
        partition: a :class:`~splinecam_lightning.Partition`.
        n: number of points.
        generator: CPU ``torch.Generator`` for reproducible draws (the global RNG is used only without one).

    Returns:
        ``(n, D)`` float64 flat input points.

    Raises:
        ValueError: the slice contains no decision boundary.
    """
    seg = partition.boundary
    if seg.shape[0] == 0:
        raise ValueError("the partition has no decision boundary inside its slice")
    length = (seg[:, 1] - seg[:, 0]).norm(dim=1)
    idx = torch.multinomial(length, n, replacement=True, generator=generator)
    t = torch.rand(n, 1, generator=generator, dtype=torch.float64)
    uv = seg[idx, 0] + t * (seg[idx, 1] - seg[idx, 0])
    return partition.slice.to_input(uv)


def class_cells(partition) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Regions cut along the decision boundary into cells of constant predicted class.

    Returns:
        ``(vertices, counts, cls, region)``: padded cells, their class (argmax, or ``output > 0`` for one
        output) and the region each cell lies in.
    """
    return cells_of_classes(
        partition.vertices,
        partition.counts,
        partition.jacobians,
        partition.offsets,
        partition.slice.domain.abs().amax(0),
    )


def cells_of_classes(
    v: torch.Tensor, c: torch.Tensor, jacobians: torch.Tensor, offsets: torch.Tensor, extent: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Array form of :func:`class_cells` (works on any device)."""
    R, O = offsets.shape
    dev = v.device
    scores = _output_maps(jacobians, offsets)  # (R, 3, O)
    # One output: class 1 where output > 0, i.e. the argmax of (0, output).
    M = torch.cat([torch.zeros_like(scores[:, :, :1]), scores], 2) if O == 1 else scores
    # The window is arange(k), so each cell's window position is its class.
    idx, fam, (cv, cc, poly, cls, _) = split_by_argmax(v, c, M, extent)
    cut = torch.zeros(R, dtype=torch.bool, device=dev)
    cut[idx] = True
    keep = torch.nonzero(~cut)[:, 0]
    cls_keep = fam.codes(geometry.vertex_means(v[keep], c[keep]), keep)[:, 0].long()
    region = idx[poly]
    W = max(v.shape[1], cv.shape[1])
    verts = torch.cat([geometry.widen(v[keep], W), geometry.widen(cv, W)])
    return verts, torch.cat([c[keep], cc]), torch.cat([cls_keep, cls]), torch.cat([keep, region])
