"""Refining a set of convex regions by one nonlinear layer, in batch.

Each region carries a *conflict list*: the units of the layer whose breakpoint crosses it. In every round each
region is split by the first unit of its list (units are taken in a fixed random order), and each child keeps
the rest of its parent's list that still crosses it. This is randomized incremental construction: every round
is a few tensor operations over all regions and all pending (region, unit) pairs, no Python loop runs over
regions, and the total work stays close to the size of the output.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch

from splinecam_lightning import geometry, memory
from splinecam_lightning.errors import TooManyRegionsError

__all__ = [
    "BreakpointFamily",
    "LineFamily",
    "WindowFamily",
    "TooManyRegionsError",
    "refine",
    "split_by_argmax",
    "REL_TOL",
    "VALUE_WEIGHT",
]

# Breakpoints within REL_TOL * (magnitude of the terms) of a vertex count as passing through it. Float64
# rounding is ~1e-16 of the same magnitude, which leaves room for error growth through deep nets. Where units
# vary across the domain about as much as their size, this merges regions thinner than ~1e-11 of the domain.
REL_TOL = 1e-11
# The constant part of those terms (a unit's value at the domain centre, a threshold) weighs this much less.
# A value's own rounding is ~1e-16 of it, so 1e-13 still leaves ~500x room for error growth through the layers
# (the variation part leaves 45,000x); the constant part only dominates on a slice tiny next to the values
# (radius 1e-6 where ReLU6's threshold 6 is crossed, max pooling between inputs of size 1e4), which then
# resolves regions ~1e-13 * value / variation thin instead of merging strips a hundred times wider.
VALUE_WEIGHT = 1e-2

# Soft cap on elements per temporary tensor when testing regions against many units.
_CHUNK_ELEMS = 1 << 23
# Elements per (regions, units) block of the crossing pre-filter: its dozen temporaries stay in cache.
_FILTER_ELEMS = 1 << 15


def _scale(M: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """Magnitude of the terms of ``a*u + b*v + c`` over the domain, per (region, unit): ``(P, F)``; the constant
    weighs :data:`VALUE_WEIGHT`."""
    return M[:, 0].abs() * extent[0] + M[:, 1].abs() * extent[1] + M[:, 2].abs() * VALUE_WEIGHT


def unit_bounds(M: torch.Tensor, points: torch.Tensor, extent: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Values ``(n, F)`` of the maps ``M`` (``(n, 3, F)``) at ``points`` (``(n, 2)``), and each unit's gradient
    norm and term scale (:func:`_scale`), the bounds of the window pre-test."""
    s = geometry.affine_values(M[:, 0], M[:, 1], M[:, 2], points[:, 0:1], points[:, 1:2])
    return s, torch.hypot(M[:, 0], M[:, 1]), _scale(M, extent)


def box_bounds(M: torch.Tensor, centre: torch.Tensor, half: torch.Tensor, extent: torch.Tensor) -> tuple:
    """Values ``(n, F)`` of the maps ``M`` (``(n, 3, F)``, or ``(1, 3, F)`` for one map) at ``centre`` (``(n, 2)``),
    and each unit's reach over the box ``centre +- half``: ``|a| h_u + |b| h_v`` (the exact largest change over
    the box), plus four tolerances of the unit's term scale (:func:`_scale`)."""
    s = geometry.affine_values(M[:, 0], M[:, 1], M[:, 2], centre[:, 0:1], centre[:, 1:2])
    t = 4 * REL_TOL
    A = M.abs()
    reach = A[:, 0] * (half[:, 0:1] + t * extent[0])
    reach.addcmul_(A[:, 1], half[:, 1:2] + t * extent[1]).add_(A[:, 2], alpha=t * VALUE_WEIGHT)
    return s, reach


def gather_units(M: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Maps ``(m, 3, k)`` of units ``idx[i]`` (``(m, k)``) of rows ``rows[i]`` of ``M`` (``(R, 3, F)``; ``R == 1``:
    one map for every row), as flat gathers: several times faster than ``M[rows[:, None], :, idx]``."""
    m, k = idx.shape
    F = M.shape[2]
    if M.shape[0] == 1:
        g = M[0].t().contiguous().index_select(0, idx.reshape(-1))  # (m k, 3)
    else:
        base = (rows[:, None] * (3 * F) + idx).reshape(-1, 1)
        g = torch.take(M, base + torch.arange(0, 3 * F, F, device=M.device))
    return g.view(m, k, 3).transpose(1, 2)


def _ragged(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For counts ``n`` (``(A,)``): the owner ``a`` and position ``0..n[a]-1`` of each of ``n.sum()`` slots."""
    owner = torch.repeat_interleave(torch.arange(n.shape[0], device=n.device), n)
    return owner, torch.arange(owner.shape[0], device=n.device) - (torch.cumsum(n, 0) - n)[owner]


def _values_at(M: torch.Tensor | FactoredMaps, points: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """Values ``(n, F)`` of the maps ``M`` (``(P, 3, F)``, ``P`` may be 1; or factored) of each point's region."""
    dense = isinstance(M, torch.Tensor)
    if dense and M.shape[0] == 1:
        return torch.addmm(M[0, 2:3, :], points, M[0, :2, :])
    # Inner dimension 2: two fused multiply-adds beat a batch of tiny matmuls.
    Mr = M[root] if dense else M.rows(root)
    return geometry.affine_values(Mr[:, 0], Mr[:, 1], Mr[:, 2], points[:, 0:1], points[:, 1:2])


def _centre_radius(vertices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each polygon's vertex mean ``(R, 2)`` and, with generous slack, its largest distance to a vertex ``(R,)``.

    Padded slots repeat vertex 0, so the mean is still a point inside the convex hull."""
    cen = vertices.mean(1)
    return cen, (vertices - cen[:, None]).norm(dim=2).amax(1) * (1 + 1e-9)


def _centre_lead(
    cen: torch.Tensor, rad: torch.Tensor, M: torch.Tensor, extent: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """How far the best of ``k`` affine functions leads each other one anywhere near a point, minus a margin.

    ``M`` is ``(R, 3, ..., k)``: function ``j`` of row ``r`` is ``M[r, :, ..., j]``; ``cen`` ``(R, 2)`` and ``rad``
    ``(R,)`` give each row's point and radius; ``valid`` (broadcast to ``(..., k)``) masks out padded members.
    Returns ``(R, ..., k)``: ``gap_j - |grad(best - j)| * rad - 4 tol_j`` with ``tol_j = REL_TOL * (scale_best +
    scale_j)``, ``+inf`` for the best itself and for masked members. Where every entry is ``>= 0`` the argmax is
    constant within ``rad`` of the point and the exact tests agree (their rounding is far below the margin;
    functions that are identically zero give 0)."""
    view = (-1,) + (1,) * (M.dim() - 2)
    s = geometry.affine_values(M[:, 0], M[:, 1], M[:, 2], cen[:, 0].view(view), cen[:, 1].view(view))
    if valid is not None:
        s = torch.where(valid, s, torch.full_like(s, -torch.inf))
    best = s.argmax(-1, keepdim=True)
    D = torch.gather(M, -1, best.unsqueeze(1).expand(*M.shape[:-1], 1)) - M
    sc = _scale(M, extent)
    lead = torch.gather(s, -1, best) - s
    lead -= torch.hypot(D[:, 0], D[:, 1]).mul_(rad.view(view))
    lead -= (torch.gather(sc, -1, best) + sc).mul_(4 * REL_TOL)
    return lead.scatter_(-1, best, torch.inf)


def _is_arange(r: torch.Tensor, start: int) -> bool:
    n = r.shape[0]
    return n == 0 or (int(r[0]) == start and int(r[-1]) == start + n - 1 and bool((r.diff() == 1).all()))


class BreakpointFamily(Protocol):
    """What :func:`refine` needs of a layer's breakpoints: :class:`LineFamily` and :class:`WindowFamily`.

    Items are the layer's units (or windows); ``root`` indexes the per-region maps ``M`` of the layer's input.
    """

    num_items: int

    def initial_pairs(self, vertices: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``(region, item)`` pairs whose breakpoint crosses the region, region-major."""
        ...

    def crosses(self, vertices: torch.Tensor, root: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """Whether each item's breakpoint crosses its polygon."""
        ...

    def split(self, vertices: torch.Tensor, counts: torch.Tensor, root: torch.Tensor, item: torch.Tensor) -> tuple:
        """The pieces of each polygon cut by its item: ``(vertices, counts, parent)``."""
        ...

    def codes(self, points: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
        """The piece of every item at interior points."""
        ...


class FactoredMaps(Protocol):
    """Per-region maps ``(P, 3, F)`` kept factored (a unit-wise activation's output): a family reads whole rows
    or single units of them without their ever being materialised."""

    shape: tuple[int, ...]

    def rows(self, idx: torch.Tensor | slice) -> torch.Tensor:
        """Maps ``(n, 3, F)`` of regions ``idx``."""

    def units(self, r: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Maps ``(m, 3, k)`` of units ``idx[i]`` (``(m, k)``) of region ``r[i]``."""

    def bounds(self, idx: torch.Tensor | slice, points: torch.Tensor, extent: torch.Tensor) -> tuple:
        """:func:`unit_bounds` of regions ``idx``'s maps (the last two may be larger, never smaller, up to
        rounding)."""

    def monotone_source(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(parent, M)`` when unit ``f`` of region ``p`` is a nondecreasing function of unit ``f`` of the
        per-group maps ``M[parent[p]]`` (``(G, 3, F)``), the same function throughout the region; else ``None``."""


class _RootedMaps:
    """Shared by the families: per-region maps ``M`` (``P == 1``: one map for every region)."""

    M: torch.Tensor

    def _root(self, root: torch.Tensor) -> torch.Tensor:
        return root if self.M.shape[0] > 1 else torch.zeros_like(root)


class LineFamily(_RootedMaps):
    """Scalar breakpoints: unit ``f`` switches piece where its input crosses ``thresholds[t]``.

    Item ``t * F + f`` is the line ``M[root, :, f] . (u, v, 1) = thresholds[t]``.

    Args:
        M: ``(P, 3, F)`` the layer's input as affine maps of ``(u, v)``; ``P`` is 1 when it is the same map
            for all regions.
        thresholds: breakpoints, increasing.
        extent: ``(2,)`` largest ``|u|``, ``|v|`` over the domain (for tolerances).
    """

    def __init__(self, M: torch.Tensor, thresholds: list[float], extent: torch.Tensor) -> None:
        self.M = M
        self.F = M.shape[2]
        self.thr = torch.tensor(thresholds, dtype=M.dtype, device=M.device)
        self.extent = extent
        self.num_items = self.F * len(thresholds)

    def lines(self, root: torch.Tensor, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = item % self.F
        t = item // self.F
        c = self.M[self._root(root), :, f].clone()  # (m, 3)
        c[:, 2] -= self.thr[t]
        tol = REL_TOL * (
            c[:, 0].abs() * self.extent[0]
            + c[:, 1].abs() * self.extent[1]
            + (self.M[self._root(root), 2, f].abs() + self.thr[t].abs()) * VALUE_WEIGHT
        )
        return c, tol

    def crosses(self, vertices: torch.Tensor, root: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        c, tol = self.lines(root, item)
        f = geometry.affine_values(c[:, 0:1], c[:, 1:2], c[:, 2:3], vertices[..., 0], vertices[..., 1])
        lo, hi = torch.aminmax(f, dim=1)
        return (hi > tol) & (lo < -tol)

    def initial_pairs(self, vertices: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All (region, item) pairs whose line crosses the region, region-major."""
        P = vertices.shape[0]
        # Pre-filter at the vertex mean: |f(v) - f(c)| <= |grad f| * max|v - c| <= (|a| + |b|) * max|v - c|, so
        # a unit whose value there is further than that (plus the tolerance) from a threshold cannot cross. Only
        # the survivors are tested at every vertex, by the same test as before, so the result is unchanged and
        # the (P, K, F) work shrinks to a dozen (P, F) passes, in blocks that stay in cache.
        cen, rad = _centre_radius(vertices)
        rad = rad[:, None]
        e0, e1 = float(self.extent[0]), float(self.extent[1])
        k0, k1 = rad + 2 * REL_TOL * e0, rad + 2 * REL_TOL * e1  # (P, 1)
        thr = self.thr.tolist()
        step = max(1, _FILTER_ELEMS // max(1, self.F))
        # refine() passes root = arange(P): slice the maps instead of copying them with a gather.
        own = self.M.shape[0] == P and _is_arange(root, 0)
        qs, its = [], []
        for p0 in range(0, P, step):
            Mr = self.M[p0 : p0 + step] if own else self.M[self._root(root[p0 : p0 + step])]
            c = cen[p0 : p0 + step]
            fc = geometry.affine_values(Mr[:, 0], Mr[:, 1], Mr[:, 2], c[:, 0:1], c[:, 1:2])  # (p, F)
            # Reach plus twice the tolerance's scale |a| e0 + |b| e1 + |c|, as one affine combination.
            slack = Mr[:, 2].abs().mul_(2 * REL_TOL * VALUE_WEIGHT)
            slack.addcmul_(Mr[:, 0].abs(), k0[p0 : p0 + step]).addcmul_(Mr[:, 1].abs(), k1[p0 : p0 + step])
            for t, th in enumerate(thr):
                if th == 0:
                    near = fc.abs() <= slack
                else:
                    near = (fc - th).abs_() <= slack + 2 * REL_TOL * VALUE_WEIGHT * abs(th)
                q, f = torch.nonzero(near, as_tuple=True)
                qs.append(q + p0)
                its.append(f + t * self.F)
        dev = vertices.device
        q = (torch.cat(qs) if len(qs) > 1 else qs[0]) if qs else torch.zeros(0, dtype=torch.long, device=dev)
        it = (torch.cat(its) if len(its) > 1 else its[0]) if its else torch.zeros(0, dtype=torch.long, device=dev)
        if q.numel() == 0:
            return q, it
        zero = thr == [0.0]  # one threshold at 0 (ReLU): subtracting it changes nothing, bit for bit
        # The exact test on the survivors: values at every vertex strictly on both sides of the threshold.
        hit = torch.empty(q.shape[0], dtype=torch.bool, device=dev)
        step = max(1, _CHUNK_ELEMS // (8 * vertices.shape[1]))
        for i in range(0, q.shape[0], step):
            qi, ii = q[i : i + step], it[i : i + step]
            f = ii if zero else ii % self.F
            mq = self.M[qi if own else self._root(root[qi]), :, f]  # (n, 3)
            v = vertices[qi]  # (n, K, 2)
            val = geometry.affine_values(mq[:, 0:1], mq[:, 1:2], mq[:, 2:3], v[..., 0], v[..., 1])
            lo, hi = torch.aminmax(val, dim=1)
            sc = _scale(mq[:, :, None], self.extent)[:, 0]
            if zero:
                tol = REL_TOL * sc
                hit[i : i + step] = (hi > tol) & (lo < -tol)
            else:
                th = self.thr[ii // self.F]
                tol = REL_TOL * (sc + th.abs() * VALUE_WEIGHT)
                hit[i : i + step] = (hi - th > tol) & (lo - th < -tol)
        return q[hit], it[hit]

    def split(self, vertices, counts, root, item):
        c, tol = self.lines(root, item)
        pv, pc, nv, nc = geometry.split_by_lines(vertices, counts, c, tol)
        A = vertices.shape[0]
        W = max(pv.shape[1], nv.shape[1])
        out = torch.zeros(A, 2, W, 2, dtype=vertices.dtype, device=vertices.device)
        out[:, 0, : pv.shape[1]] = pv
        out[:, 1, : nv.shape[1]] = nv
        cnt = torch.stack([pc, nc], 1)
        out = out.reshape(2 * A, W, 2)
        cnt = cnt.reshape(2 * A)
        out = geometry.pad_with_first(out, cnt)
        parent = torch.arange(A, device=vertices.device).repeat_interleave(2)
        ok = cnt >= 3
        return out[ok], cnt[ok], parent[ok]

    def codes(self, points: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
        """Piece index of every unit at interior points: how many thresholds the unit's input exceeds."""
        n, F = points.shape[0], self.F
        code = memory.empty((n, F), points, torch.int8)
        # Blocks of ~2**18 values stay in cache between the matmul and the comparisons.
        step = max(1, (1 << 18) // max(1, F))
        cpu = points.device.type == "cpu"
        thr = self.thr.tolist()
        buf = self.M.new_empty(min(n, step), F) if self.M.shape[0] == 1 else None
        for i in range(0, n, step):
            pts = points[i : i + step]
            if buf is not None:  # one map for every point: its values are one small matmul
                val = torch.addmm(self.M[0, 2:3, :], pts, self.M[0, :2, :], out=buf[: pts.shape[0]])
            else:
                val = _values_at(self.M, pts, root[i : i + step])
            out = code[i : i + step]
            if cpu:  # NumPy's comparisons are several times faster than torch's here (same results)
                v, o = val.numpy(), out.numpy()
                np.greater(v, thr[0], out=o.view(np.bool_))
                for th in thr[1:]:
                    o += v > th
            else:
                torch.gt(val, thr[0], out=out.view(torch.bool))
                for th in thr[1:]:
                    out += (val > th).view(torch.int8)
        return code


class WindowFamily(_RootedMaps):
    """Max over windows: item ``w`` is the argmax partition of units ``windows[w]`` (``-1`` pads).

    Ties between equal affine functions go to the lowest position in the window, as ``torch.max`` does.
    """

    def __init__(self, M: torch.Tensor | FactoredMaps, windows: torch.Tensor, extent: torch.Tensor) -> None:
        self.M = M
        self._factored = not isinstance(M, torch.Tensor)
        self.windows = windows
        self.k = windows.shape[1]
        self.extent = extent
        self.num_items = windows.shape[0]
        self._flat = windows.clamp(min=0).reshape(-1)
        self._pad_mask = (windows < 0)[..., None]
        self._padded = bool(self._pad_mask.any())

    def rows(self, root: torch.Tensor | slice) -> torch.Tensor:
        """The whole maps ``(n, 3, F)`` of regions ``root``."""
        if self._factored:
            return self.M.rows(root)
        if self.M.shape[0] > 1 or isinstance(root, slice):
            return self.M[root]
        return self.M.expand(root.shape[0], -1, -1)  # one map for every region

    def _members(self, root: torch.Tensor, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.windows[item]  # (m, k)
        valid = idx >= 0
        # Gather only the window's units, never a region's whole (3, F) map.
        r = self._root(root)
        if self._factored:
            return self.M.units(r, idx.clamp(min=0)), valid
        return gather_units(self.M, r, idx.clamp(min=0)), valid

    def _constant_argmax(self, vertices: torch.Tensor, g: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """True where one member beats all others (within tolerance) at every vertex."""
        val = torch.baddbmm(g[:, 2:3, :], vertices, g[:, :2, :])  # (m, K, k)
        neg = torch.finfo(val.dtype).min
        val = torch.where(valid[:, None, :], val, torch.full_like(val, neg))
        centre = val.mean(1)  # (m, k): value at the vertex mean, since val is affine in the vertex
        best = centre.argmax(1)
        vb = torch.gather(val, 2, best[:, None, None].expand(-1, val.shape[1], 1))  # (m, K, 1)
        diff = torch.where(valid[:, None, :], vb - val, torch.zeros_like(val))
        sc = _scale(g, self.extent)  # (m, k)
        sb = torch.gather(sc, 1, best[:, None])
        tol = REL_TOL * (sb + sc)  # (m, k)
        return (diff >= -tol[:, None, :]).all(2).all(1)

    def crosses(self, vertices, root, item):
        g, valid = self._members(root, item)
        return ~self._constant_argmax(vertices, g, valid)

    def initial_pairs(self, vertices, root):
        """(region, window) pairs whose argmax is not constant on the region, region-major.

        Most pairs are settled at the vertex mean ``c``: where the best member there leads every other member
        ``j`` by at least its reach over the polygon, ``|grad(best - j)| * max|v - c|``, plus four tolerances
        (dead units pooled together: all three zero), the exact test cannot find a crossing. Only the other
        pairs go through the exact test at every vertex (:meth:`crosses`), so the result is unchanged and the
        ``(P, K, F)`` values at every vertex are never formed. A first, cheaper pass works unit by unit, on
        whole maps: each unit's values near ``c`` lie within ``s +- (|grad| * max|v - c| + 4 tol)``, and a
        window whose best lower end is above every other member's upper end passes the lead test too (by the
        triangle inequality), so only the rest of the windows are gathered for it. Where the maps allow it
        (:meth:`_grouped_pairs`) that first pass runs once per group of regions instead.
        """
        k = self.k
        cen, rad = _centre_radius(vertices)
        grouped = self._grouped_pairs(vertices, cen, root)
        if grouped is not None:  # the lead test on the group-level survivors
            q, w = grouped
            qs, ws = [q[:0]], [w[:0]]  # every pair may be settled at the group level
            step = max(1, (1 << 16) // max(1, 3 * k))
            for i in range(0, q.shape[0], step):
                qi, wi = q[i : i + step], w[i : i + step]
                keep = self._unled(cen[qi], rad[qi], *self._members(root[qi], wi))
                qs.append(qi[keep])
                ws.append(wi[keep])
        else:
            qs, ws = self._unsettled_pairs(cen, rad, root)
        q, w = torch.cat(qs), torch.cat(ws)
        hit = torch.empty(q.shape[0], dtype=torch.bool, device=vertices.device)
        step = max(1, _CHUNK_ELEMS // max(1, 2 * vertices.shape[1] * k))
        for i in range(0, q.shape[0], step):
            qi = q[i : i + step]
            hit[i : i + step] = self.crosses(vertices[qi], root[qi], w[i : i + step])
        return q[hit], w[hit]

    def _unsettled_pairs(self, cen, rad, root) -> tuple[list, list]:
        """The block-by-block pre-test of :meth:`initial_pairs`: lists of the unsettled pairs' regions and
        windows."""
        P = cen.shape[0]
        W, k = self.windows.shape
        own = self.M.shape[0] == P and _is_arange(root, 0)
        # Blocks of ~2**16 values per temporary: the dozen of them stay in cache.
        step = max(1, (1 << 16) // max(1, W * k))
        qs, ws = [], []
        lo_buf = torch.empty(self.M.shape[2], min(P, step), dtype=cen.dtype, device=cen.device)
        hi_buf = torch.empty_like(lo_buf)
        for p0 in range(0, P, step):
            rows = slice(p0, p0 + step) if own else self._root(root[p0 : p0 + step])
            c, r = cen[p0 : p0 + step], rad[p0 : p0 + step]
            if self._factored:
                s, grad, sc = self.M.bounds(rows, c, self.extent)
            else:
                s, grad, sc = unit_bounds(self.rows(rows), c, self.extent)  # (p, F) each
            settled = self._settled(s, grad, sc, r, lo_buf, hi_buf)  # (W, p)
            q, w = torch.nonzero(~settled.t(), as_tuple=True)  # region-major
            keep = self._unled(c[q], r[q], *self._members(root[p0 + q], w))  # the unsettled windows' members
            qs.append(q[keep] + p0)
            ws.append(w[keep])
        return qs, ws

    def _unled(self, cen, rad, G, valid) -> torch.Tensor:
        """``(n,)`` pairs the lead certificate (:func:`_centre_lead`) leaves unsettled, from their members ``G``
        (``(n, 3, k)``, ``valid`` ``(n, k)``), points and radii."""
        return ~(_centre_lead(cen, rad, G, self.extent, valid if self._padded else None) >= 0).all(1)

    def _settled(self, s, grad, sc, rad, lo_buf, hi_buf) -> torch.Tensor:
        """``(W, p)`` windows settled by unit-wise intervals ``s +- (grad * rad + 4 tol sc)`` (``(p, F)`` each)."""
        return self._settled_within(s, grad.mul_(rad[:, None]).add_(sc, alpha=4 * REL_TOL), lo_buf, hi_buf)

    def _settled_within(self, s, reach, lo_buf, hi_buf) -> torch.Tensor:
        """``(W, p)`` windows whose best member's interval ``s +- reach`` (``(p, F)`` each) lies above every
        other member's."""
        # Unit-major (F, p): a window's members are then whole rows, gathered several times faster than
        # along the unit axis.
        n = s.shape[0]
        lo = self._by_window(torch.sub(s.t(), reach.t(), out=lo_buf[:, :n]))
        hi = self._by_window(torch.add(s.t(), reach.t(), out=hi_buf[:, :n]))
        lo_best, best = lo.max(1, keepdim=True)  # ties go to the first member, as in torch.max
        return hi.scatter_(1, best, -torch.inf).amax(1) <= lo_best[:, 0]

    def _grouped_pairs(self, vertices, cen, root) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Candidate pairs found group by group, or ``None`` where the maps do not allow it.

        When each region's units are a nondecreasing function (ReLU, leaky ReLU, hardtanh) of its group's
        maps ``M[g]`` (the regions one unit-wise layer made from one region), a window whose source argmax is
        constant by a margin over the box holding the whole group keeps that argmax in every region of the
        group: the winner's image is a maximum, and members tied with it are tied throughout a region (their
        pieces are constant there). So the pre-test runs once per group on the source maps, and only the
        unsettled windows are tested region by region.
        """
        src = self.M.monotone_source() if self._factored else None
        if src is None or cen.shape[0] == 0:
            return None
        parent, M = src
        par = parent[root]
        P = par.shape[0]
        # Groups are the regions of one parent within one cell of a grid over the regions' centres, with
        # ~_GROUP_SIZE regions per cell: a group's disc then stays small even when one parent has many regions.
        n = max(1, int(math.sqrt(P / _GROUP_SIZE)))
        lo, span = cen.amin(0), cen.amax(0) - cen.amin(0)
        cell = ((cen - lo) / torch.where(span > 0, span, 1.0) * n).long().clamp_(0, n - 1)
        key, gid = torch.unique(par * (n * n) + cell[:, 1] * n + cell[:, 0], return_inverse=True)
        G = key.shape[0]
        if G > _GROUPS_MAX * P:  # mostly groups of one region: little to share
            return None
        row = key // (n * n)  # each group's row of M
        cnt = torch.bincount(gid, minlength=G)
        # Each group's bounding box of its polygons' vertices (padded slots repeat vertex 0): a grid cell's
        # regions fill a box, where |a| h_u + |b| h_v bounds a unit's change more tightly than a disc does.
        big = torch.finfo(cen.dtype).max
        glo = torch.full((G, 2), big, dtype=cen.dtype, device=cen.device)
        ghi = torch.full((G, 2), -big, dtype=cen.dtype, device=cen.device)
        glo.scatter_reduce_(0, gid[:, None].expand(-1, 2), vertices.amin(1), "amin")
        ghi.scatter_reduce_(0, gid[:, None].expand(-1, 2), vertices.amax(1), "amax")
        gcen = (glo + ghi) / 2
        half = torch.maximum(ghi - gcen, gcen - glo) * (1 + 1e-9)
        group_rad = torch.linalg.vector_norm(half, dim=1)  # a disc holding the box, for the lead test
        W, k = self.windows.shape
        step = max(1, (1 << 16) // max(1, W * k))
        lo_buf = torch.empty(M.shape[2], min(G, step), dtype=cen.dtype, device=cen.device)
        hi_buf = torch.empty_like(lo_buf)
        gs, ws = [], []
        for i in range(0, G, step):
            g = torch.arange(i, min(G, i + step), device=cen.device)
            c, r, mr = gcen[g], group_rad[g], row[g]
            bounds = box_bounds(M[mr] if M.shape[0] > 1 else M, c, half[g], self.extent)
            settled = self._settled_within(*bounds, lo_buf, hi_buf)
            gi, w = torch.nonzero(~settled.t(), as_tuple=True)
            idx = self.windows[w]
            keep = self._unled(c[gi], r[gi], gather_units(M, mr[gi], idx.clamp(min=0)), idx >= 0)
            gs.append(g[gi[keep]])
            ws.append(w[keep])
        gp, wp = torch.cat(gs), torch.cat(ws)
        # Every region of each unsettled group, with that window; region-major.
        order = torch.argsort(gid, stable=True)
        start = torch.cumsum(cnt, 0) - cnt
        pair, e = _ragged(cnt[gp])
        q = order[start[gp][pair] + e]
        w = wp[pair]
        o = torch.argsort(q * W + w)
        return q[o], w[o]

    def two_member_lines(self, vertices, root, q, item) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which crossing pairs ``(q, item)`` split their polygon by one line, and that line ``x_i - x_j = 0`` with
        its tolerance: ``(ok (n,), lines (n, 3), tol (n,))``.

        A pair qualifies when two members ``i < j`` win every vertex of the polygon, every other member loses by
        more than the tolerance at every vertex to ``i`` or to ``j`` (affine, so everywhere: it never reaches
        ``max(x_i, x_j)``), and the line has vertices strictly on both sides. Every polygon inside this one then
        has the same two cells, so the window can be cut together with others in one line arrangement."""
        n = q.shape[0]
        dev = vertices.device
        ok = torch.zeros(n, dtype=torch.bool, device=dev)
        lines = torch.zeros(n, 3, dtype=vertices.dtype, device=dev)
        tol = torch.zeros(n, dtype=vertices.dtype, device=dev)
        step = max(1, _CHUNK_ELEMS // max(1, 4 * vertices.shape[1] * self.k))
        for s0 in range(0, n, step):
            sl = slice(s0, s0 + step)
            V = vertices[q[sl]]
            g, valid = self._members(root[q[sl]], item[sl])
            val, i, j, two = self._vertex_winners(V, g, valid)  # val (m, K, k)
            sc = _scale(g, self.extent)  # (m, k)
            line, t, crosses, _, _, si, sj = self._cut_line(V, g, sc, i, j)
            others = valid.clone()
            others.scatter_(1, i[:, None], False).scatter_(1, j[:, None], False)
            lose = ~others
            for w, sw in ((i, si), (j, sj)):
                vw = torch.gather(val, 2, w[:, None, None].expand(-1, val.shape[1], 1))  # (m, K, 1)
                lose |= ((vw - val) > (REL_TOL * (sw + sc))[:, None, :]).all(1)
            ok[sl] = two & lose.all(1) & crosses
            lines[sl], tol[sl] = line, t
        return ok, lines, tol

    def split(self, vertices, counts, root, item):
        """The argmax cells of each polygon's window: ``(vertices, counts, parent)``, grouped by parent.

        Most windows that cross a polygon have just two cells there, split by one line: where the polygon's
        vertices are all won by two members ``i`` and ``j``, it is cut by ``x_i = x_j``, and the cut stands
        when every other member loses by more than the tolerance at every vertex of both pieces (the loss is
        affine on each piece, so it then loses everywhere). The other windows are clipped (:meth:`_clip`)."""
        v, c, par = self._cells(vertices, counts, root, item, with_labels=False)
        order = torch.sort(par, stable=True).indices  # children grouped by parent, as _rounds expects
        return v[order], c[order], par[order]

    def cells(self, vertices, counts, root, item) -> tuple:
        """The argmax cells of each polygon's window with their member and edge labels: ``(vertices, counts,
        polygon, member, labels)``, where ``labels[c, e]`` is the member whose cut made edge ``e`` of cell ``c``
        (``-1``: an edge of the polygon). One certified line where it suffices (:meth:`split`), else clipping."""
        return self._cells(vertices, counts, root, item, with_labels=True)

    def _cells(self, vertices, counts, root, item, with_labels: bool) -> tuple:
        g, valid = self._members(root, item)  # (A, 3, k), (A, k)
        ok, pieces = self._two_cells(vertices, counts, g, valid, with_labels)
        rest = torch.nonzero(~ok)[:, 0]
        if rest.numel() == 0:
            return pieces
        v, c, poly, *more = self._clip(vertices[rest], counts[rest], g[rest], valid[rest], with_labels)
        W = max(pieces[0].shape[1], v.shape[1])
        return tuple(
            torch.cat([geometry.widen(x, W), geometry.widen(y, W)] if x.dim() > 1 else [x, y])
            for x, y in zip(pieces, (v, c, rest[poly], *more), strict=True)
        )

    def _vertex_winners(self, vertices, g, valid) -> tuple[torch.Tensor, ...]:
        """Members' values at each polygon's vertices ``(A, K, k)`` (padded members at the lowest value), the
        lowest and highest vertex winners ``i``, ``j`` and whether those two win every vertex."""
        neg = torch.finfo(vertices.dtype).min
        val = torch.baddbmm(g[:, 2:3, :], vertices, g[:, :2, :])  # padded slots repeat vertex 0
        val = torch.where(valid[:, None, :], val, torch.full_like(val, neg))
        win = val.argmax(2)  # (A, K)
        i, j = win.amin(1), win.amax(1)
        return val, i, j, (i != j) & ((win == i[:, None]) | (win == j[:, None])).all(1)

    @staticmethod
    def _cut_line(vertices, g, sc, i, j) -> tuple[torch.Tensor, ...]:
        """The line ``x_i - x_j = 0`` of each polygon's members ``i``, ``j`` (``(n, 3)``), its tolerance ``(n,)``,
        whether it has vertices strictly on both sides, and the two members' maps ``(n, 3)`` and term scales
        ``(n, 1)``."""
        gi = torch.gather(g, 2, i[:, None, None].expand(-1, 3, 1))[..., 0]
        gj = torch.gather(g, 2, j[:, None, None].expand(-1, 3, 1))[..., 0]
        si, sj = torch.gather(sc, 1, i[:, None]), torch.gather(sc, 1, j[:, None])
        line, tol = gi - gj, REL_TOL * (si + sj)[:, 0]
        f = geometry.affine_values(line[:, 0:1], line[:, 1:2], line[:, 2:3], vertices[..., 0], vertices[..., 1])
        crosses = (f > tol[:, None]).any(1) & (f < -tol[:, None]).any(1)
        return line, tol, crosses, gi, gj, si, sj

    def _two_cells(self, vertices, counts, g, valid, with_labels: bool = False) -> tuple[torch.Tensor, tuple]:
        """Polygons whose window has exactly two cells, certified, and the cells of those (see :meth:`split`):
        ``(vertices, counts, polygon)``, with ``(member, labels)`` as :meth:`_clip` gives them."""
        A = vertices.shape[0]
        _, i, j, two = self._vertex_winners(vertices, g, valid)
        a = torch.nonzero(two)[:, 0]
        i, j = i[a], j[a]
        ga, va = g[a], valid[a]
        sc = _scale(ga, self.extent)  # (n, k)
        line, tol, crosses, gi, gj, si, sj = self._cut_line(vertices[a], ga, sc, i, j)
        if with_labels:  # the cut edge of i's cell is labelled j, and of j's cell i; the polygon's edges -1
            none = torch.full(vertices[a].shape[:2], -1, dtype=torch.long, device=vertices.device)
            pv, pc, nv, nc, pl, nl = geometry.split_by_lines(vertices[a], counts[a], line, tol, none, j)
            nl = torch.where(nl == j[:, None], i[:, None], nl)
        else:
            pv, pc, nv, nc = geometry.split_by_lines(vertices[a], counts[a], line, tol)
        good = crosses & (pc >= 3) & (nc >= 3)  # the line crosses: vertices strictly on both sides
        # Every other member loses to the piece's winner by more than the tolerance at every vertex.
        others = va.clone()
        others.scatter_(1, i[:, None], False).scatter_(1, j[:, None], False)
        for piece, best, sb in ((pv, gi, si), (nv, gj, sj)):
            d = best[:, :, None] - ga  # (n, 3, k): winner minus each member
            dv = torch.baddbmm(d[:, 2:3, :], piece, d[:, :2, :])  # (n, K', k)
            tol = REL_TOL * (sb + sc)  # (n, k)
            lose = (dv > tol[:, None, :]).all(1) | ~others  # padded slots repeat vertex 0
            good &= lose.all(1)
        ok = torch.zeros(A, dtype=torch.bool, device=vertices.device)
        ok[a[good]] = True
        a, pv, pc, nv, nc = a[good], pv[good], pc[good], nv[good], nc[good]
        W = max(pv.shape[1], nv.shape[1])
        cells = torch.stack([geometry.widen(pv, W), geometry.widen(nv, W)], 1).reshape(-1, W, 2)
        out = (cells, torch.stack([pc, nc], 1).reshape(-1), a.repeat_interleave(2))
        if not with_labels:
            return ok, out
        member = torch.stack([i[good], j[good]], 1).reshape(-1)
        labels = torch.stack([geometry.widen(pl[good], W), geometry.widen(nl[good], W)], 1).reshape(-1, W)
        return ok, (*out, member, labels)

    def _clip(self, vertices, counts, g, valid, with_labels: bool = False):
        """Up to ``k`` argmax cells per polygon, by clipping with ``x_i >= x_j`` for every other member.

        A member that another beats by more than the tolerance at every vertex has no cell and bounds no other
        cell, so it is left out: each member costs a clipping pass over all polygons."""
        A, K, _ = vertices.shape
        sc = _scale(g, self.extent)
        k = self.k
        val = torch.baddbmm(g[:, 2:3, :], vertices, g[:, :2, :])  # (A, K, k); padded slots repeat vertex 0
        lead = val[:, :, :, None] - val[:, :, None, :]  # (A, K, x, m): member x minus member m
        beaten = (lead > REL_TOL * (sc[:, None, :, None] + sc[:, None, None, :])).all(1) & valid[:, :, None]
        valid = valid & ~beaten.any(1)
        cv = vertices.repeat_interleave(k, 0)  # (A*k, K, 2): candidate i of polygon a at row a*k + i
        cc = counts.repeat_interleave(k, 0)
        cand = torch.arange(k, device=vertices.device).repeat(A)
        poly = torch.arange(A, device=vertices.device).repeat_interleave(k)
        cc = torch.where(valid.reshape(-1), cc, torch.zeros_like(cc))
        gi = g.repeat_interleave(k, 0)  # (A*k, 3, k)
        si = sc.repeat_interleave(k, 0)
        own = torch.gather(gi, 2, cand[:, None, None].expand(-1, 3, 1))[..., 0]  # (A*k, 3)
        own_s = torch.gather(si, 1, cand[:, None])[:, 0]
        labels = torch.full((A * k, K), -1, dtype=torch.long, device=vertices.device) if with_labels else None
        for j in range(k):
            active = (cand != j) & valid[poly, j] & (cc >= 3)
            if not active.any():
                continue
            lines = own - gi[:, :, j]
            tol = REL_TOL * (own_s + si[:, j])
            res = geometry.clip_by_halfplanes(
                cv[active],
                cc[active],
                lines[active],
                tol[active],
                keep_if_on_line=cand[active] < j,
                labels=labels[active] if with_labels else None,
                cut_label=torch.full_like(cand[active], j) if with_labels else None,
            )
            nv, nc = res[0], res[1]
            if nv.shape[1] > cv.shape[1]:
                cv = geometry.widen(cv, nv.shape[1])
                if with_labels:
                    labels = geometry.widen(labels, nv.shape[1])
            W = cv.shape[1]
            if nv.shape[1] < W:
                nv = geometry.widen(nv, W)
            cv[active] = nv
            cc[active] = nc
            if with_labels:
                nl = res[2]
                if nl.shape[1] < W:
                    nl = geometry.widen(nl, W)
                labels[active] = nl
        ok = cc >= 3
        cv = geometry.pad_with_first(cv, cc.clamp(min=1))
        if with_labels:
            return cv[ok], cc[ok], poly[ok], cand[ok], labels[ok]
        return cv[ok], cc[ok], poly[ok]

    def codes(self, points: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
        """Argmax position inside each window at interior points: ``(n, W)``."""
        return self.codes_of_values(_values_at(self.M, points, root))

    def codes_of_values(self, val: torch.Tensor) -> torch.Tensor:
        """Argmax position inside each window, from the units' values ``(n, F)`` at interior points."""
        # max's indices, not argmax: over the middle dimension torch's argmax is ~10x slower (same first index).
        _, best = self._by_window(val.t().contiguous()).max(1)
        return best.t().to(torch.int8 if self.k <= 127 else torch.int16)

    def _by_window(self, unit_major: torch.Tensor) -> torch.Tensor:
        """Values ``(F, n)`` (unit-major) regrouped by window, ``(W, k, n)``; padded members are ``-inf``.

        Gathering whole rows of regions is several times faster than gathering along the unit axis."""
        W, k = self.windows.shape
        g = unit_major.index_select(0, self._flat).view(W, k, unit_major.shape[1])
        if self._padded:
            g.masked_fill_(self._pad_mask, -torch.inf)
        return g


# Line pairs per line-arrangement batch (each pair costs ~200 bytes of temporaries); a single region with more
# pairs than this is cut in rounds instead.
_MAX_ARRANGEMENT_PAIRS = 1 << 21


def _too_many(max_regions: int) -> TooManyRegionsError:
    return TooManyRegionsError(
        f"the partition has more than max_regions={max_regions} regions; raise max_regions or use a smaller domain"
    )


# The window pre-test runs by groups when there are at most this many groups per region; groups hold regions
# of one parent in one cell of a grid with ~_GROUP_SIZE regions per cell.
_GROUPS_MAX = 0.8
_GROUP_SIZE = 8

# Work (regions x vertices x functions) above which split_by_argmax first certifies constant regions cheaply.
_ARGMAX_FILTER_MIN = 1 << 16


def split_by_argmax(
    vertices: torch.Tensor, counts: torch.Tensor, M: torch.Tensor, extent: torch.Tensor
) -> tuple[torch.Tensor, WindowFamily, tuple[torch.Tensor, ...]]:
    """Cut each region by the argmax of its ``k`` affine functions ``M[r, :, j]`` (``(R, 3, k)``).

    Returns:
        ``(idx, family, cells)``: the regions the argmax is not constant on, the one-window family (for codes),
        and their cells ``(vertices, counts, region, cls, labels)`` where ``cls`` is the cell's argmax and
        ``labels[c, i]`` the function whose cut made edge ``i`` of cell ``c`` (``-1``: an edge of the region).
    """
    dev = vertices.device
    R, k = M.shape[0], M.shape[2]
    fam = WindowFamily(M, torch.arange(k, device=dev)[None], extent)
    root = torch.arange(R, device=dev)
    item = torch.zeros(R, dtype=torch.long, device=dev)
    if R * vertices.shape[1] * k > _ARGMAX_FILTER_MIN and k > 1:
        # Only regions not certified constant by the centre test go through the exact test at every vertex.
        lead = _centre_lead(*_centre_radius(vertices), M, extent).amin(-1)
        cand = torch.nonzero(~(lead >= 0))[:, 0]
        idx = cand[fam.crosses(vertices[cand], cand, item[cand])]
    else:
        idx = torch.nonzero(fam.crosses(vertices, root, item))[:, 0]
    if idx.numel() == 0:
        none = torch.zeros(0, dtype=torch.long, device=dev)
        labels = torch.zeros(0, vertices.shape[1], dtype=torch.long, device=dev)
        return idx, fam, (vertices[:0], counts[:0], none, none, labels)
    cells = fam.cells(vertices[idx], counts[idx], idx, item[idx])
    return idx, fam, cells


def refine(
    vertices: torch.Tensor,
    counts: torch.Tensor,
    family: BreakpointFamily,
    *,
    max_regions: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split every region by every breakpoint of ``family`` that crosses it.

    Lines (:class:`LineFamily`) cut each region all at once as a line arrangement
    (:func:`~splinecam_lightning.geometry.line_arrangement`), and so do the windows of :class:`WindowFamily`
    that cut their region by one line (:meth:`WindowFamily.two_member_lines`). Regions whose lines are
    degenerate within the tolerance (concurrent lines, lines through vertices, coincident lines) are cut in
    rounds by randomized incremental construction, and so are the arrangement's faces by a region's other
    crossing windows.

    Args:
        vertices, counts: the current regions (padded).
        family: a :class:`LineFamily` or :class:`WindowFamily`; its maps are indexed by current region.
        max_regions: raise :class:`TooManyRegionsError` as soon as the count would exceed this.
        generator: CPU generator for the processing order (the result's geometry does not depend on it).

    Returns:
        ``(vertices, counts, parent)``: the refined regions and the index of the region each came from.
    """
    dev = vertices.device
    P = vertices.shape[0]
    root = torch.arange(P, device=dev)
    q, item = family.initial_pairs(vertices, root)
    if q.numel() == 0:
        return vertices, counts, root
    has = torch.zeros(P, dtype=torch.bool, device=dev)
    has[q] = True
    done_v = [vertices[~has]]
    done_c = [counts[~has]]
    done_r = [root[~has]]
    n_done = done_c[0].shape[0]
    bad = torch.zeros(P, dtype=torch.bool, device=dev)  # regions cut in rounds, all their pairs with them
    gen = None  # regions with a window not cut by one line: their faces wait for those windows
    pend_v, pend_c, pend_r = [], [], []
    if isinstance(family, LineFamily):
        if family.thr.shape[0] > 1:  # with one threshold the pairs come sorted by region
            order = torch.sort(q, stable=True).indices
            q, item = q[order], item[order]
        arranged = None  # every pair; lines computed batch by batch
    else:
        # Windows cut by one line join a line arrangement; the others then cut its faces in rounds.
        one_line, win_lines, win_tol = family.two_member_lines(vertices, root, q, item)
        gen = torch.zeros(P, dtype=torch.bool, device=dev)
        gen[q[~one_line]] = True
        arranged = torch.nonzero(one_line)[:, 0]
    qa = q if arranged is None else q[arranged]
    L = qa.shape[0]
    if L * (L - 1) // 2 <= _MAX_ARRANGEMENT_PAIRS:
        # Few lines in all: one batch, and no region can have too many pairs.
        sels = [None] if L else []
    else:
        m = torch.bincount(qa, minlength=P)
        pairs = m * (m - 1) // 2
        # Regions with too many line pairs for memory go to rounds; the rest in batches of bounded pair count.
        big = (pairs > _MAX_ARRANGEMENT_PAIRS) & (m > 0)
        batch = torch.cumsum(torch.where(big, 0, pairs), 0) // _MAX_ARRANGEMENT_PAIRS
        bad |= big
        line_batch = batch[qa]
        sels = [(line_batch == b) & ~big[qa] for b in torch.unique(line_batch[~big[qa]]).tolist()]
    n_pend = 0
    for sel in sels:
        qb = qa if sel is None else qa[sel]
        if arranged is None:
            c, tol = family.lines(qb, item if sel is None else item[sel])
        else:
            pick = arranged if sel is None else arranged[sel]
            c, tol = win_lines[pick], win_tol[pick]
        fv, fc, fown, bad_b = geometry.line_arrangement(
            vertices, counts, qb, c, tol, family.extent, max_faces=max_regions - n_done - n_pend
        )
        bad |= bad_b
        if gen is not None:
            later = gen[fown]
            pend_v.append(fv[later])
            pend_c.append(fc[later])
            pend_r.append(fown[later])
            n_pend += int(later.sum())
            fv, fc, fown = fv[~later], fc[~later], fown[~later]
        done_v.append(fv)
        done_c.append(fc)
        done_r.append(fown)
        n_done += fc.shape[0]
        if n_done + n_pend > max_regions:
            raise _too_many(max_regions)
    busy = None  # the faces that wait for a region's other windows
    if gen is not None and bool(gen.any()):
        fv, fc, fr, busy, fq, fitem = _pending_faces(
            vertices, counts, root, q, item, one_line, gen & ~bad, pend_v, pend_c, pend_r, family
        )
        done_v.append(fv[~busy])
        done_c.append(fc[~busy])
        done_r.append(fr[~busy])
        n_done += int((~busy).sum())
    if not bool(bad.any()) and (busy is None or not bool(busy.any())):
        return _gather(done_v, done_c, done_r)
    keep = bad[q]
    q, item, has = q[keep], item[keep], bad
    if busy is not None:  # one set of rounds for the faces and the regions cut whole
        K = max(vertices.shape[1], fv.shape[1])
        vertices = torch.cat([geometry.widen(vertices, K), geometry.widen(fv, K)])
        counts, root, has = torch.cat([counts, fc]), torch.cat([root, fr]), torch.cat([has, busy])
        q, item = torch.cat([q, fq + P]), torch.cat([item, fitem])
    _rounds(vertices, counts, root, has, q, item, family, max_regions, generator, done_v, done_c, done_r, n_done)
    return _gather(done_v, done_c, done_r)


def _pending_faces(vertices, counts, root, q, item, one_line, gen, pend_v, pend_c, pend_r, family):
    """The faces of regions ``gen`` (those the arrangement made, or the region itself where it had no one-line
    window) paired with the region's other crossing windows: ``(faces, counts, root, busy, q, item)``, where
    ``busy`` marks the faces some window crosses and ``(q, item)`` are those pairs (``q`` into the faces)."""
    has_faces = torch.zeros_like(gen)
    for r in pend_r:
        has_faces[r] = True
    whole = torch.nonzero(gen & ~has_faces)[:, 0]
    pend = [(v, c, r) for v, c, r in zip(pend_v, pend_c, pend_r, strict=True) if r.numel()]
    pend.append((vertices[whole], counts[whole], whole))
    K = max(v.shape[1] for v, _, _ in pend)
    fv = torch.cat([geometry.widen(v, K) for v, _, _ in pend])
    fc = torch.cat([c for _, c, _ in pend])
    fown = torch.cat([r for _, _, r in pend])
    order = torch.sort(fown, stable=True).indices
    fv, fc, fown = fv[order], fc[order], fown[order]
    sel = ~one_line & gen[q]  # the other windows, region-major as q
    fq, fitem = _crossing_children(fv, root[fown], fown, q[sel], item[sel], gen.shape[0], family)
    busy = torch.zeros(fv.shape[0], dtype=torch.bool, device=vertices.device)
    busy[fq] = True
    return fv, fc, root[fown], busy, fq, fitem


def _crossing_children(cv, croot, cpar, pq, pitem, A, family) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair ``(pq, pitem)`` (sorted by parent, of ``A`` parents) with every child of its parent (children
    ``cv``, grouped by parent ``cpar``, with their maps' rows ``croot``), child-major so that the pairs stay in
    their order within a child: the ``(child, item)`` pairs whose item crosses the child."""
    nchild = torch.bincount(cpar, minlength=A)
    npair = torch.bincount(pq, minlength=A)
    cstart = torch.cumsum(nchild, 0) - nchild
    pstart = torch.cumsum(npair, 0) - npair
    par, e = _ragged(nchild * npair)
    ci = cstart[par] + torch.div(e, npair[par], rounding_mode="floor")
    it = pitem[pstart[par] + e % npair[par]]
    hit = torch.zeros(ci.shape[0], dtype=torch.bool, device=cv.device)
    step = max(1, _CHUNK_ELEMS // max(1, cv.shape[1] * 8))
    for s0 in range(0, ci.shape[0], step):
        sl = slice(s0, s0 + step)
        hit[sl] = family.crosses(cv[ci[sl]], croot[ci[sl]], it[sl])
    return ci[hit], it[hit]


def _gather(done_v, done_c, done_r):
    done_v = [v for v in done_v if v.shape[0]] or done_v[:1]
    K = max(v.shape[1] for v in done_v)
    out_v = torch.cat([geometry.widen(v, K) for v in done_v])
    return out_v, torch.cat(done_c), torch.cat(done_r)


def _rounds(vertices, counts, root, has, q, item, family, max_regions, generator, done_v, done_c, done_r, n_done):
    """Randomized incremental construction on the regions in ``has``; appends finished regions to ``done_*``."""
    dev = vertices.device
    # A random processing order keeps the conflict lists short (as in randomized incremental construction).
    rank = torch.randperm(family.num_items, generator=generator).to(dev)
    order = torch.argsort(q * family.num_items + rank[item])
    q, item = q[order], item[order]
    remap = torch.cumsum(has, 0) - 1
    verts, cnts, rt = vertices[has], counts[has], root[has]
    q = remap[q]

    while q.numel():
        A = verts.shape[0]
        first = torch.ones_like(q, dtype=torch.bool)
        first[1:] = q[1:] != q[:-1]
        pivot = item[first]
        rest_q, rest_item = q[~first], item[~first]
        cv, cc, cpar = family.split(verts, cnts, rt, pivot)
        crt = rt[cpar]
        C = cv.shape[0]
        if n_done + C > max_regions:
            raise _too_many(max_regions)
        new_q, new_item = _crossing_children(cv, crt, cpar, rest_q, rest_item, A, family)
        busy = torch.zeros(C, dtype=torch.bool, device=dev)
        busy[new_q] = True
        done_v.append(cv[~busy])
        done_c.append(cc[~busy])
        done_r.append(crt[~busy])
        n_done += int((~busy).sum())
        remap = torch.cumsum(busy, 0) - 1
        verts, cnts, rt = cv[busy], cc[busy], crt[busy]
        if verts.shape[0]:
            verts = verts[:, : int(cnts.max())]
        q, item = remap[new_q], new_item
