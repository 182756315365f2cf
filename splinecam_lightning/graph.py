"""Region adjacency graphs and connected pieces of class regions.

Two regions are adjacent when they share a boundary segment of positive length (touching at a vertex does not
count). Edges are grouped by their supporting line; on each line the intervals of regions lying on one side are
disjoint, so matching them against the other side is a sorted sweep (``searchsorted``), with no loop over
regions or lines. graph-tool is optional: :func:`to_graph_tool` converts when it is installed.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from splinecam_lightning import geometry
from splinecam_lightning.boundary import class_cells

__all__ = ["polygon_adjacency", "region_adjacency", "class_cells", "class_pieces", "to_graph_tool"]

# Collinearity and overlap tolerance, relative to the domain's size.
_GEOM_RTOL = 1e-9


def polygon_adjacency(vertices: torch.Tensor, counts: torch.Tensor, return_segments: bool = False):
    """Pairs ``(i, j)``, ``i < j``, of padded convex polygons sharing a segment of positive length.

    The polygons must tile a region without overlaps (as a partition does).

    Returns:
        ``(E, 2)`` int64 array, each pair once, sorted; with ``return_segments`` also the ``(E, 2, 2)`` float64
        array of the shared segments.
    """
    empty = (np.zeros((0, 2), dtype=np.int64), np.zeros((0, 2, 2)))
    v = vertices.detach().to("cpu", torch.float64)
    counts = counts.detach().to("cpu")  # the sweep runs in numpy, whatever device the partition was built on
    R, K, _ = v.shape
    if R < 2:
        return empty if return_segments else empty[0]
    span = float((v.reshape(-1, 2).amax(0) - v.reshape(-1, 2).amin(0)).max())
    tol = _GEOM_RTOL * max(span, 1e-300)
    p = v
    q = v.roll(-1, 1)
    d = q - p
    length = d.norm(dim=-1)
    valid = geometry.vertex_mask(counts, K) & (length > tol)
    reg = torch.arange(R)[:, None].expand(R, K)[valid]
    p, q, d, length = p[valid], q[valid], d[valid], length[valid]
    u = d / length[:, None]
    # Canonical direction: angle in [0, pi). Interior of a CCW polygon lies left of its edges; flipping the
    # direction puts it on the right, so `side` tells which side of the canonical line the region is on.
    flip = (u[:, 1] < 0) | ((u[:, 1] == 0) & (u[:, 0] < 0))
    u = torch.where(flip[:, None], -u, u)
    side = flip.long()
    theta = torch.atan2(u[:, 1], u[:, 0]) % torch.pi
    # Angles near pi wrap to 0 together with their sign-flipped twins.
    near_pi = theta > torch.pi - 1e-12
    theta = torch.where(near_pi, theta - torch.pi, theta)
    u = torch.where(near_pi[:, None], -u, u)
    side = torch.where(near_pi, 1 - side, side)
    off = u[:, 0] * p[:, 1] - u[:, 1] * p[:, 0]  # signed distance of the line from the origin
    t0 = (p * u).sum(-1)
    t1 = (q * u).sum(-1)
    lo, hi = torch.minimum(t0, t1), torch.maximum(t0, t1)

    # Group collinear edges: sort by (angle, offset) and start a new group wherever either jumps.
    order = np.lexsort((off.numpy(), theta.numpy()))
    th, of = theta.numpy()[order], off.numpy()[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (np.diff(th) * span > tol) | (np.abs(np.diff(of)) > tol)
    group = np.empty(len(order), dtype=np.int64)
    group[order] = np.cumsum(new) - 1
    lo_n, hi_n, side_n, reg_n = lo.numpy(), hi.numpy(), side.numpy(), reg.numpy()

    # Sweep: for each left-side interval, the right-side intervals of the same group that overlap it form a
    # contiguous run in (group, lo) order. Keys embed the group so one searchsorted serves all groups: interval
    # ends are taken relative to their group's first end and scaled by the domain size, so every key is
    # `2 * group + [0, 1.5)` and float64 keeps ~1e-10 relative resolution for up to ~1e5 groups.
    G = int(group.max()) + 1
    gmin = np.full(G, np.inf)
    np.minimum.at(gmin, group, lo_n)
    scale = max(span, 1e-300)
    key_lo = 2.0 * group + (lo_n - gmin[group]) / scale
    key_hi = 2.0 * group + (hi_n - gmin[group]) / scale
    tol = _GEOM_RTOL
    L = np.nonzero(side_n == 0)[0]
    Rt = np.nonzero(side_n == 1)[0]
    if len(L) == 0 or len(Rt) == 0:
        return empty if return_segments else empty[0]
    ro = Rt[np.argsort(key_lo[Rt], kind="stable")]
    r_lo, r_hi = key_lo[ro], key_hi[ro]
    # Right intervals on one line are disjoint, so their ends are sorted like their starts.
    start = np.searchsorted(r_hi, key_lo[L] + tol, side="left")
    stop = np.searchsorted(r_lo, key_hi[L] - tol, side="left")
    n = np.clip(stop - start, 0, None)
    li = np.repeat(L, n)
    first = np.repeat(start, n)
    within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    rj = ro[first + within]
    overlap = np.minimum(key_hi[li], key_hi[rj]) - np.maximum(key_lo[li], key_lo[rj])
    ok = (overlap > tol) & (group[li] == group[rj])
    li, rj = li[ok], rj[ok]
    a, b = reg_n[li], reg_n[rj]
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], 1)
    distinct = pairs[:, 0] != pairs[:, 1]
    pairs, li, rj = pairs[distinct], li[distinct], rj[distinct]
    if not len(pairs):
        return empty if return_segments else empty[0]
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    if not return_segments:
        return pairs
    li, rj = li[first], rj[first]
    # Shared segment: the overlap of the two intervals on the left edge's line, x = t * u + offset * normal.
    t_lo = np.maximum(lo_n[li], lo_n[rj])
    t_hi = np.minimum(hi_n[li], hi_n[rj])
    un, on = u.numpy()[li], off.numpy()[li]
    w = np.stack([-un[:, 1], un[:, 0]], 1)
    seg = np.stack([t_lo[:, None] * un + on[:, None] * w, t_hi[:, None] * un + on[:, None] * w], 1)
    return pairs, seg


def region_adjacency(partition, as_edge_list: bool = False):
    """Region adjacency graph of a :class:`~splinecam_lightning.Partition`.

    Args:
        partition: the partition.
        as_edge_list: return the ``(E, 2)`` array of pairs ``i < j`` instead of a matrix.

    Returns:
        A symmetric ``scipy.sparse.csr_matrix`` of shape ``(R, R)`` with ones where regions share an edge,
        or the edge list.
    """
    pairs = polygon_adjacency(partition.vertices, partition.counts)
    if as_edge_list:
        return pairs
    R = partition.num_regions
    data = np.ones(2 * len(pairs), dtype=np.int8)
    rows = np.concatenate([pairs[:, 0], pairs[:, 1]])
    cols = np.concatenate([pairs[:, 1], pairs[:, 0]])
    return sp.csr_matrix((data, (rows, cols)), shape=(R, R))


def class_pieces(partition) -> dict[int, int]:
    """Number of connected pieces of each class's decision region inside the slice.

    A piece is a maximal set of class cells (see :func:`class_cells`) of one class connected through shared
    edges of positive length. Classes absent from the slice are left out.
    """
    verts, counts, cls, _ = class_cells(partition)
    pairs = polygon_adjacency(verts, counts)
    cl = cls.numpy()
    same = pairs[cl[pairs[:, 0]] == cl[pairs[:, 1]]] if len(pairs) else pairs
    n = len(cl)
    g = sp.csr_matrix((np.ones(len(same)), (same[:, 0], same[:, 1])), shape=(n, n))
    _, labels = connected_components(g, directed=False)
    out: dict[int, int] = {}
    for c in np.unique(cl):
        out[int(c)] = int(len(np.unique(labels[cl == c])))
    return out


def to_graph_tool(partition):
    """The region adjacency graph as an undirected ``graph_tool.Graph`` (vertex ``i`` is region ``i``).

    Raises:
        ImportError: graph-tool is not installed (it is not on PyPI; see https://graph-tool.skewed.de).
    """
    from splinecam_lightning._imports import require_graph_tool

    gt = require_graph_tool()
    g = gt.Graph(directed=False)
    g.add_vertex(partition.num_regions)
    g.add_edge_list(region_adjacency(partition, as_edge_list=True))
    return g
