"""Exact local complexity: the partitions of small squares around many data points, in one batched pass.

:func:`local_complexity` builds the square ``Slice.around(points[i], radius, generator)`` for every point and
runs the exact engine once on all of them: the engine starts from one region per square, each with its own
input map, so every layer refines all squares together and no Python loop runs over points or regions. Each
final region remembers its square (``root``), and per-point statistics are segment reductions over regions.
Each point's statistics are those :func:`~splinecam_lightning.compute_partition` gives on ``slices[i]``.

Optionally (``sampled=True``) it also computes the sampled statistic of the grokking literature: per layer, the
number of units whose activation piece differs among the neighbourhood's vertices (see
:func:`local_complexity` for how it differs from the exact count).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from splinecam_lightning import geometry, memory
from splinecam_lightning.boundary import decision_boundary
from splinecam_lightning.engine import (
    DEFAULT_MAX_REGIONS,
    ROOT_CODE,
    PreparedModel,
    _Aff,
    _Interpreter,
    _prepared,
    _probe_shape,
)
from splinecam_lightning.partition import Partition
from splinecam_lightning.scheduling import log_spaced_steps  # re-exported: the schedule local tracking uses
from splinecam_lightning.slices import Slice
from splinecam_lightning.stats import STAT_KEYS, region_eccentricity, region_vertex_distance_ratio

__all__ = ["LocalComplexity", "LocalConfig", "local_complexity", "log_spaced_steps", "LOCAL_STAT_KEYS"]

#: Per-point statistics of :class:`LocalComplexity`, in a stable order (same definitions as
#: :func:`~splinecam_lightning.stats.partition_stats`, plus ``crossing_units``).
LOCAL_STAT_KEYS = (*(k for k in STAT_KEYS if k != "decision_pieces"), "crossing_units")


@dataclass(frozen=True)
class LocalConfig:
    """What local complexity to track while training (for ``SplineCamCallback(local=LocalConfig(...))``).

    Args:
        radius: Half-width of the square around each point, in input units.
        count: Number of points per split.
        splits: Which data to take points from: ``"train"`` and/or ``"val"``.
        points: Points to use instead of drawing them from the data: a tensor ``(N, ...)`` (used for every
            split) or a dict ``split -> tensor``.
        sampled: Also compute the sampled statistic (units whose piece differs among the square's corners).
    """

    radius: float
    count: int = 256
    splits: tuple[str, ...] = ("train", "val")
    points: Any = None
    sampled: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.radius, (int, float)) and math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"LocalConfig.radius must be a positive finite number, got {self.radius!r}")
        if not (isinstance(self.count, int) and self.count >= 1):
            raise ValueError(f"LocalConfig.count must be a positive int, got {self.count!r}")
        splits = (self.splits,) if isinstance(self.splits, str) else tuple(self.splits)
        bad = [s for s in splits if s not in ("train", "val")]
        if bad or not splits:
            raise ValueError(f"LocalConfig.splits must be a non-empty subset of ('train', 'val'), got {self.splits!r}")
        object.__setattr__(self, "splits", splits)
        if isinstance(self.points, dict):
            extra = set(self.points) - set(splits)
            if extra:
                raise ValueError(f"LocalConfig.points has splits {sorted(extra)} that are not in splits={splits}")


def _segment_sum(x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, seg, x)


def _segment_reduce(x: torch.Tensor, seg: torch.Tensor, n: int, how: str, fill: float) -> torch.Tensor:
    out = torch.full((n, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    index = seg.reshape(-1, *([1] * (x.dim() - 1))).expand_as(x)
    return out.scatter_reduce_(0, index, x, reduce=how, include_self=False)


@dataclass
class LocalComplexity:
    """Exact partitions of squares around ``N`` points, with per-point statistics.

    Every statistic is a float64 tensor of shape ``(N,)``; point ``i``'s value is what
    ``compute_partition(model, slices[i]).stats()`` gives (``crossing_units`` is the exact counterpart of the
    sampled statistic: the units whose breakpoint passes through the square). The regions of all squares are
    kept batched: region ``r`` lies in square ``root[r]``, in that slice's plane coordinates.

    Attributes:
        slices: The ``N`` squares, in the order of the points.
        num_regions, mean_area, ..., crossing_units: per-point statistics (see :data:`LOCAL_STAT_KEYS`).
        units_exact: per nonlinear layer, ``(N,)`` number of its units whose piece changes inside the square.
        units_sampled: per nonlinear layer, ``(N,)`` number of its units whose piece differs among the square's
            4 corners (``None`` unless ``sampled=True``); ``sampled_units`` is their sum over layers.
        vertices, counts, root, jacobians, offsets, codes: the batched regions (plane coordinates of their slice).
        boundary, boundary_regions, boundary_classes: the batched decision-boundary segments.
        seconds: Wall time of the call.
    """

    slices: list[Slice]
    num_regions: torch.Tensor
    mean_area: torch.Tensor
    std_area: torch.Tensor
    min_area: torch.Tensor
    max_area: torch.Tensor
    region_density: torch.Tensor
    mean_vertices: torch.Tensor
    mean_eccentricity: torch.Tensor
    mean_eccentricity_paper: torch.Tensor
    boundary_length: torch.Tensor
    boundary_regions: torch.Tensor
    mean_slope_norm: torch.Tensor
    crossing_units: torch.Tensor
    units_exact: dict[str, torch.Tensor]
    vertices: torch.Tensor
    counts: torch.Tensor
    root: torch.Tensor
    jacobians: torch.Tensor
    offsets: torch.Tensor
    codes: dict[str, torch.Tensor]
    boundary: torch.Tensor
    boundary_root: torch.Tensor = field(repr=False)
    boundary_region_index: torch.Tensor = field(repr=False)
    boundary_classes: torch.Tensor = field(repr=False)
    units_sampled: dict[str, torch.Tensor] | None = None
    sampled_units: torch.Tensor | None = None
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.slices)

    def __repr__(self) -> str:
        n = self.num_regions
        return (
            f"LocalComplexity({len(self)} points, {int(n.sum())} regions, per point median "
            f"{float(n.median()):g}, max {float(n.max()):g}, {self.seconds:.3f} s)"
        )

    def stats(self) -> dict[str, torch.Tensor]:
        """Per-point statistics ``name -> (N,)`` (with ``sampled_units`` when it was computed)."""
        out = {k: getattr(self, k) for k in LOCAL_STAT_KEYS}
        if self.sampled_units is not None:
            out["sampled_units"] = self.sampled_units
        return out

    def summary(self, flat: bool = False) -> dict[str, Any]:
        """Mean, median and (population) std across points of every statistic.

        Returns:
            ``{stat: {"mean", "median", "std"}}``, or with ``flat=True`` the logging form
            ``{stat: mean, stat + "_median": median, stat + "_std": std}``.
        """
        out: dict[str, Any] = {}
        for k, v in self.stats().items():
            v = v.double()
            s = {
                "mean": float(v.mean()),
                "median": float(torch.quantile(v, 0.5)),
                "std": float(v.std(unbiased=False)) if v.numel() > 1 else 0.0,
            }
            if flat:
                out.update({k: s["mean"], f"{k}_median": s["median"], f"{k}_std": s["std"]})
            else:
                out[k] = s
        return out

    def partition(self, i: int) -> Partition:
        """The exact :class:`~splinecam_lightning.Partition` of ``slices[i]`` (for rendering or inspection)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"point index {i} out of range for {len(self)} points")
        i = i % len(self)
        idx = torch.nonzero(self.root == i)[:, 0]
        b = torch.nonzero(self.boundary_root == i)[:, 0]
        new = torch.full((self.root.shape[0],), -1, dtype=torch.long)
        new[idx] = torch.arange(idx.numel())
        K = int(self.counts[idx].max())
        return Partition(
            slice=self.slices[i],
            vertices=self.vertices[idx, :K].clone(),
            counts=self.counts[idx].clone(),
            jacobians=self.jacobians[idx].clone(),
            offsets=self.offsets[idx].clone(),
            codes={k: v[idx].clone() for k, v in self.codes.items()},
            boundary=self.boundary[b].clone(),
            boundary_regions=new[self.boundary_region_index[b]],
            boundary_classes=self.boundary_classes[b].clone(),
        )


def _as_points(points: Any, input_shape: Sequence[int] | None) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    pts = torch.as_tensor(points).detach().to("cpu", torch.float64)
    if pts.dim() < 2 or pts.shape[0] < 1:
        raise ValueError(f"points must have shape (N, D) or (N, *input_shape) with N >= 1, got {tuple(pts.shape)}")
    if not torch.isfinite(pts).all():
        raise ValueError("points contain NaN or Inf values")
    if input_shape is None and pts.dim() > 2:
        input_shape = tuple(pts.shape[1:])
    if input_shape is not None and math.prod(input_shape) != math.prod(pts.shape[1:]):
        raise ValueError(
            f"points of shape {tuple(pts.shape)} do not match input_shape {tuple(input_shape)} "
            f"({math.prod(pts.shape[1:])} vs {math.prod(input_shape)} values per point)"
        )
    return pts.reshape(pts.shape[0], -1), (tuple(int(d) for d in input_shape) if input_shape is not None else None)


def _sampled_units(prep: PreparedModel, slices: list[Slice], input_shape, dev) -> dict[str, torch.Tensor]:
    """Units whose piece differs among the 4 corners of each square, per nonlinear layer: ``name -> (N,)``.

    Reuses the engine on constant maps (zero derivative rows), one per corner: no breakpoint crosses a constant
    map, so nothing is split and the engine's codes are the activation pieces at the corners, with exactly the
    engine's conventions for every layer kind (ReLU sign, Hardtanh's three pieces, max-pool argmax, ...).
    """
    N = len(slices)
    origin = torch.stack([s.origin for s in slices])  # (N, D)
    basis = torch.stack([s.basis for s in slices])  # (N, 2, D)
    corners = torch.stack([s.domain for s in slices])  # (N, 4, 2): the square's vertices
    x = origin[:, None] + torch.einsum("nck,nkd->ncd", corners, basis)  # (N, 4, D)
    x = x.transpose(0, 1).reshape(4 * N, -1)  # corner-major: row c * N + i
    gen = torch.Generator().manual_seed(0)
    it = _Interpreter.for_slices(prep.graph_module, prep.kinds, slices * 4, input_shape, dev, 4 * N, gen)
    rows = torch.zeros(4 * N, 3, x.shape[1], dtype=torch.float64, device=dev)
    rows[:, 2] = x.to(dev)
    it.input = _Aff(rows.reshape(4 * N, 3, *it.input.data.shape[2:]))
    it.run()
    order = torch.argsort(it.codes.pop(ROOT_CODE))  # nothing splits, but chunks could reorder rows
    out = {}
    for name, code in it.codes.items():
        c = code[order].reshape(4, N, -1)
        out[name] = (c != c[:1]).any(0).sum(1).to("cpu", torch.float64)
    return out


def _one_pass(prep: PreparedModel, slices: list[Slice], input_shape, max_regions: int, seed: int, budget) -> tuple:
    """One batched engine pass over ``slices``; regions and boundary on the CPU in each slice's plane units."""
    gm, kinds, dev = prep.graph_module, prep.kinds, prep.device
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        shape = tuple(input_shape) if input_shape is not None else (slices[0].input_dim,)
        widths = _probe_shape(gm, shape, dev) if math.prod(shape) == slices[0].input_dim else None
        it = _Interpreter.for_slices(
            gm, kinds, slices, input_shape, dev, max_regions, gen, budget=budget, widths=widths
        )
        out = it.run()
        root = it.codes.pop(ROOT_CODE)
        P = it.verts.shape[0]
        data = out.data.reshape(out.P, 3, -1).expand(P, -1, -1)
        jac = data[:, :2].transpose(1, 2).contiguous()  # (P, O, 2) in the engine's coordinates
        val0 = data[:, 2].contiguous()
        seg, seg_r, seg_c = decision_boundary(it.verts, it.counts, jac, val0, it.extent, groups=root)
    cpu = torch.device("cpu")
    # Back from the engine's coordinates (uv - centre) / scale to each slice's plane units: exact when the
    # centre is 0 and the scale 1, as for squares of one radius.
    root = root.to(cpu)
    sc, ce = it.scale.to(cpu)[root], it.centre.to(cpu)[root]  # (P, 2)
    seg_r = seg_r.to(cpu)
    jac = jac.to(cpu) / sc[:, None, :]
    return (
        it.verts.to(cpu) * sc[:, None, :] + ce[:, None, :],
        it.counts.to(cpu),
        root,
        jac,
        val0.to(cpu) - (jac @ ce[:, :, None])[..., 0],  # y = J (uv - c) / s + b = J' uv + (b - J' c)
        {k: v.to(cpu) for k, v in it.codes.items()},
        seg.to(cpu) * sc[seg_r][:, None, :] + ce[seg_r][:, None, :],
        seg_r,
        seg_c.to(cpu),
    )


def _merge(parts: list[tuple], step: int) -> tuple:
    """Concatenate passes: pad polygons to one width, offset roots by the pass's first point and boundary
    region indices by the regions before it."""
    if len(parts) == 1:
        return parts[0]
    K = max(p[0].shape[1] for p in parts)
    verts = torch.cat([geometry.widen(p[0], K) for p in parts])
    nreg = torch.tensor([0] + [p[0].shape[0] for p in parts[:-1]]).cumsum(0).tolist()
    return (
        verts,
        torch.cat([p[1] for p in parts]),
        torch.cat([p[2] + k * step for k, p in enumerate(parts)]),
        torch.cat([p[3] for p in parts]),
        torch.cat([p[4] for p in parts]),
        {name: torch.cat([p[5][name] for p in parts]) for name in parts[0][5]},
        torch.cat([p[6] for p in parts]),
        torch.cat([p[7] + nreg[k] for k, p in enumerate(parts)]),
        torch.cat([p[8] for p in parts]),
    )


def local_complexity(
    model: nn.Module | PreparedModel,
    points: Any,
    radius: float | Sequence[float] | torch.Tensor,
    *,
    input_shape: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    max_memory: int | None = None,
    sampled: bool = False,
    max_regions: int = DEFAULT_MAX_REGIONS,
    device: Any = None,
    seed: int = 0,
    points_per_pass: int | None = None,
    output: int | str | None = None,
) -> LocalComplexity:
    """Exact local complexity around ``N`` points: the partitions of ``N`` squares, in one batched engine pass.

    Square ``i`` is ``Slice.around(points[i], radius, generator)``: a randomly oriented 2D square of half-width
    ``radius`` centred on the point (orientations drawn from ``generator`` in point order). All squares start
    the engine together, one region each with its own input map and plane coordinates, so each layer refines
    every square at once; point ``i``'s statistics equal ``compute_partition(model, slices[i]).stats()``, with
    the same per-slice tolerances.

    The sampled statistic (``sampled=True``), as in the grokking literature's "local complexity": per nonlinear
    layer, the number of units whose activation piece (ReLU sign, max-pool argmax, ...) differs among the
    neighbourhood's vertices, evaluated by a forward pass at those vertices. Differences from the exact count:

    - The vertices here are the square's 4 corners in its 2D plane. The grokking papers use the ``2 D``
      vertices of a cross-polytope (``x +- r e_k`` for every input axis ``k``) in the full input space, so their
      neighbourhood is ``D``-dimensional; ours is the 2D slice that the exact count sees.
    - It counts units, not regions. The exact number of regions also counts how breakpoints intersect: one
      layer of ``k`` crossing lines makes ``1 + k + intersections`` regions.
    - It only sees sign changes at the vertices. For the first nonlinear layer the pre-activations are affine
      on the square, so a unit's breakpoint crosses the square exactly when its sign differs at the corners;
      deeper units are piecewise linear on the square and can cross it (even twice, folded) with the same sign
      at every corner, so the sampled count is a lower bound of the exact ``units_exact`` (ties aside).

    Args:
        model: A supported network or a :class:`~splinecam_lightning.PreparedModel`.
        points: ``(N, *input_shape)`` or ``(N, D)`` centres.
        radius: Half-width of the squares: a number, or one per point (then each square keeps its own
            tolerances; the engine scales each slice's plane coordinates to a common extent).
        input_shape: Per-sample input shape; inferred from ``points`` of more than two dimensions.
        generator: CPU ``torch.Generator`` for the squares' orientations (the global RNG without one).
        max_memory: Bytes one engine pass may hold at once on the compute device (as for
            :func:`~splinecam_lightning.compute_partition`: regions are processed in chunks, depth first, to stay
            within it); the default is a share of the free memory.
        sampled: Also compute the sampled statistic (``units_sampled``, ``sampled_units``).
        max_regions: Limit on the total number of regions of one pass (all squares by default).
        device: Where to compute (default: the model's device).
        seed: Seed of the engine's processing order (the partitions do not depend on it).
        points_per_pass: Partition at most this many squares per engine pass (default: all in one). Memory
            grows with the regions of a pass; smaller passes bound it at some speed cost. Results do not change.
        output: The index or key of the value to partition when the forward returns several (as for
            :func:`~splinecam_lightning.compute_partition`).

    Returns:
        A :class:`LocalComplexity` on the CPU.

    Raises:
        ValueError: bad points (shape, NaN/Inf, fewer than 2 dimensions), radius or ``max_memory``.
        UnsupportedModelError, TooManyRegionsError, MemoryBudgetError: as for
            :func:`~splinecam_lightning.compute_partition`.
    """
    t0 = time.perf_counter()
    if max_memory is not None and not (isinstance(max_memory, int) and max_memory > 0):
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    if max_regions < 1:
        raise ValueError(f"max_regions must be >= 1, got {max_regions}")
    flat, input_shape = _as_points(points, input_shape)
    N = flat.shape[0]
    radii = torch.as_tensor(radius, dtype=torch.float64).reshape(-1)
    if radii.numel() not in (1, N):
        raise ValueError(f"radius must be a number or one per point ({N} values), got {radii.numel()} values")
    radii = radii.expand(N)
    prep = _prepared(model, input_shape, device, output)
    if input_shape is None:
        input_shape = prep.input_shape
    slices = [Slice.around(flat[i], float(radii[i]), generator=generator, name=f"local_{i}") for i in range(N)]
    step = N if points_per_pass is None else int(points_per_pass)
    if step < 1:
        raise ValueError(f"points_per_pass must be >= 1, got {points_per_pass}")
    # One engine pass per group of points (all of them by default): a loop over groups, never over points.
    budget = int(max_memory) if max_memory is not None else memory.default_budget(prep.device)
    parts = [_one_pass(prep, slices[i : i + step], input_shape, max_regions, seed, budget) for i in range(0, N, step)]
    verts, counts, root, jac, off, codes, seg, seg_r, seg_c = _merge(parts, step)
    P = verts.shape[0]
    units_sampled = None
    if sampled:
        with torch.no_grad():
            units_sampled = _sampled_units(prep, slices, input_shape, prep.device)

    # Per-point statistics: segment reductions over regions grouped by root (definitions as in stats.py).
    n = torch.bincount(root, minlength=N).to(torch.float64)
    areas = geometry.polygon_areas(verts)
    mean_area = _segment_sum(areas, root, N) / n
    var = _segment_sum((areas - mean_area[root]) ** 2, root, N) / n
    seg_root = root[seg_r]
    blen = _segment_sum((seg[:, 1] - seg[:, 0]).norm(dim=1), seg_root, N)
    bregions = torch.zeros(P, dtype=torch.float64)
    bregions[seg_r] = 1.0
    units_exact = {}
    # Each square's first region: a unit's piece varies over a square iff some region differs from it there.
    first = torch.full((N,), P, dtype=torch.long).scatter_reduce_(0, root, torch.arange(P), "amin")
    ref = first.clamp(max=max(P - 1, 0))[root]
    for name, code in codes.items():  # a loop over layers only
        c = code.reshape(P, -1)
        r, f = torch.nonzero(c != c[ref], as_tuple=True)
        varied = torch.unique(root[r] * c.shape[1] + f)  # (square, unit) pairs, each once
        units_exact[name] = torch.bincount(varied // c.shape[1], minlength=N).to(torch.float64)
    domain_area = 4 * radii * radii  # the squares are [-r, r]^2 in their plane coordinates
    res = LocalComplexity(
        slices=slices,
        num_regions=n,
        mean_area=mean_area,
        std_area=torch.where(n > 1, var.sqrt(), torch.zeros_like(var)),
        min_area=_segment_reduce(areas, root, N, "amin", math.inf),
        max_area=_segment_reduce(areas, root, N, "amax", -math.inf),
        region_density=n / domain_area,
        mean_vertices=_segment_sum(counts.to(torch.float64), root, N) / n,
        mean_eccentricity=_segment_sum(region_eccentricity(verts), root, N) / n,
        mean_eccentricity_paper=_segment_sum(region_vertex_distance_ratio(verts, counts), root, N) / n,
        boundary_length=blen,
        boundary_regions=_segment_sum(bregions, root, N),
        mean_slope_norm=_segment_sum(jac.flatten(1).norm(dim=1), root, N) / n,
        crossing_units=sum(units_exact.values(), torch.zeros(N, dtype=torch.float64)),
        units_exact=units_exact,
        vertices=verts,
        counts=counts,
        root=root,
        jacobians=jac,
        offsets=off,
        codes=codes,
        boundary=seg,
        boundary_root=seg_root,
        boundary_region_index=seg_r,
        boundary_classes=seg_c,
        units_sampled=units_sampled,
        sampled_units=sum(units_sampled.values(), torch.zeros(N, dtype=torch.float64)) if sampled else None,
    )
    res.seconds = time.perf_counter() - t0
    return res
