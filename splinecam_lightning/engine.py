"""The exact partition engine: ``compute_partition(model, slice) -> Partition``.

Every value in the traced network is carried as a batch of affine maps of the plane coordinates: a tensor of
shape ``(P, 3, *features)`` whose rows are ``d/du``, ``d/dv`` and the value at ``(u, v) = (0, 0)``, one block
per current region (``P == 1`` while the map is the same on every region). Linear operations act on all three
rows; bias terms only on the third. At each piecewise-linear node the regions are refined by the node's
breakpoints (:mod:`splinecam_lightning.refine`), after which the node is affine on every region again.
Everything runs in float64 on the model's device, on a private copy of the model.
"""

from __future__ import annotations

import copy
import math
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from splinecam_lightning import geometry, memory
from splinecam_lightning.boundary import decision_boundary
from splinecam_lightning.errors import MemoryBudgetError
from splinecam_lightning.layers import Maxout
from splinecam_lightning.partition import Partition
from splinecam_lightning.refine import LineFamily, TooManyRegionsError, WindowFamily, refine
from splinecam_lightning.slices import Slice
from splinecam_lightning.tracing import (
    UnsupportedModelError,
    classify_nodes,
    describe,
    trace_model,
)

__all__ = [
    "compute_partition",
    "prepare_model",
    "PreparedModel",
    "check_model",
    "UnsupportedModelError",
    "TooManyRegionsError",
    "MemoryBudgetError",
]

DEFAULT_MAX_REGIONS = 1_000_000

# Key under which _Interpreter.for_slices carries each region's slice index among the codes.
ROOT_CODE = "<slice>"

_ARITH_NAMES = {
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    torch.sub: "sub",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    torch.div: "div",
    operator.neg: "neg",
    torch.neg: "neg",
}


class _MaxResult(NamedTuple):
    """What ``torch.max(x, dim)`` returns; indices are not tracked."""

    values: Any
    indices: Any


class _Aff:
    """Affine maps of ``(u, v)``: ``data`` is ``(P, 3, *features)``."""

    __slots__ = ("data",)

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    @property
    def P(self) -> int:
        return self.data.shape[0]

    @property
    def flat(self) -> torch.Tensor:
        return self.data.flatten(0, 1)

    @staticmethod
    def unflat(t: torch.Tensor) -> _Aff:
        return _Aff(t.unflatten(0, (-1, 3)))


# Largest working set (bytes) one chunk of regions may use, whatever the budget: larger chunks do not run
# faster, and a smaller working set keeps the peak close to what the partition itself needs.
WORK_BYTES = 2 << 30
# Temporaries of one node (its inputs' gathers, conv buffers) as a multiple of its inputs plus output.
_TEMP_FACTOR = 2
# Per-region bookkeeping besides maps and codes: padded vertices, counts, indices, refinement pairs.
_REGION_OVERHEAD = 1024


class _Lazy:
    """Per-region maps not yet gathered: region ``p`` has the map ``data[idx[p]]``."""

    __slots__ = ("data", "idx")

    def __init__(self, data: torch.Tensor, idx: torch.Tensor) -> None:
        self.data, self.idx = data, idx

    @property
    def P(self) -> int:
        return self.idx.shape[0]

    def materialize(self) -> _Aff:
        return _Aff(self.data[self.idx])


def _take(val: Any, idx: torch.Tensor) -> Any:
    """``val`` restricted to regions ``idx`` (of the current regions), without gathering any map."""
    if isinstance(val, _Aff):
        return val if val.P == 1 else _Lazy(val.data, idx)
    if isinstance(val, _Lazy):
        return _Lazy(val.data, val.idx[idx])
    if isinstance(val, _Masked):
        return val.take(idx)
    if isinstance(val, _MaxResult):
        return _MaxResult(_take(val.values, idx), val.indices)
    if isinstance(val, (tuple, list)):
        return type(val)(_take(v, idx) for v in val)
    return val


def _materialize(val: Any) -> Any:
    if isinstance(val, (_Lazy, _Masked)):
        return val.materialize()
    if isinstance(val, _MaxResult):
        return _MaxResult(_materialize(val.values), val.indices)
    if isinstance(val, (tuple, list)) and any(isinstance(v, (_Lazy, _Masked, tuple, list)) for v in val):
        return type(val)(_materialize(v) for v in val)
    return val


def _per_region(val: Any) -> bool:
    if isinstance(val, _Aff):
        return val.P > 1
    if isinstance(val, (_Lazy, _Masked)):
        return True
    if isinstance(val, (tuple, list)):
        return any(_per_region(v) for v in val)
    return False


def _unmaterialized(val: Any) -> bool:
    if isinstance(val, (_Lazy, _Masked)):
        return True
    if isinstance(val, (tuple, list)):
        return any(_unmaterialized(v) for v in val)
    return False


def _is_window_node(node: fx.Node) -> bool:
    if node.op == "call_module":
        m = node.graph.owning_module.get_submodule(node.target)
        return isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, Maxout))
    if node.op == "call_function":
        return node.target in (F.max_pool1d, F.max_pool2d, torch.amax, torch.max, torch.maximum, torch.minimum)
    return node.op == "call_method" and node.target in ("amax", "max")


class _RefineTooBig(Exception):
    """A refinement would make more regions than the memory budget holds at once; retry on fewer regions."""


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# Rows per chunk when expanding per-region maps, so temporaries stay around 2**21 elements (16 MB): below
# glibc's 32 MB mmap threshold they are reused from the heap instead of page-faulted in on every chunk.
def _rows_per_chunk(width: int) -> int:
    return max(1, (1 << 21) // max(1, 3 * width))


# Multiply-adds a Linear layer must save (regions sharing a parent x inputs x outputs) before it shares one
# product per parent: below this the bookkeeping costs more than it saves.
_SHARED_MIN_WORK = 1 << 24


class _Masked:
    """Output of a unit-wise CPWL node, kept factored: region ``p`` maps to
    ``mult[code[p]] * M[parent[p]] + const[code[p]]`` (the constant on the value row only).

    Materialising it costs ``(P, 3, F)`` memory; a following Linear layer consumes it chunk by chunk instead.
    """

    __slots__ = ("M", "parent", "code", "mult", "const", "feat", "ordered")

    def __init__(self, M, parent, code, mult, const, feat, ordered: bool = False) -> None:
        self.M, self.parent, self.code, self.mult, self.const, self.feat = M, parent, code, mult, const, feat
        self.ordered = ordered  # parent is arange(len(M)): a block's maps are a slice of M, not a gather

    @property
    def P(self) -> int:
        return self.parent.shape[0]

    def take(self, idx: torch.Tensor) -> _Masked:
        return _Masked(self.M, self.parent[idx], self.code[idx], self.mult, self.const, self.feat)

    def pieces(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        code = self.code[rows]
        return self._lookup(self.mult, code), (self._lookup(self.const, code) if bool(self.const.any()) else None)

    @staticmethod
    def _lookup(table: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """``table[code[p, f], f]``; without an integer gather when every unit shares the table (ReLU etc.)."""
        if bool((table == table[:, :1]).all()):
            vals = table[:, 0].tolist()
            out = code.to(table.dtype)
            if len(vals) == 2:
                return out * (vals[1] - vals[0]) + vals[0] if vals != [0.0, 1.0] else out
            res = torch.full_like(out, vals[0])
            for c in range(1, len(vals)):
                res = torch.where(code == c, vals[c], res)
            return res
        return torch.gather(table, 0, code.long())

    def block(self, rows: slice) -> torch.Tensor:
        mult, const = self.pieces(rows)
        if self.M.shape[0] == 1:
            M = self.M
        else:
            M = self.M[rows] if self.ordered else self.M[self.parent[rows]]
        out = M * mult[:, None, :]
        if const is not None:
            out[:, 2] += const
        return out

    def materialize(self) -> _Aff:
        step = _rows_per_chunk(self.M.shape[2])
        blocks = [self.block(slice(i, i + step)) for i in range(0, self.P, step)]
        data = torch.cat(blocks) if blocks else self.M[:0]
        return _Aff(data.reshape(self.P, 3, *self.feat))

    def linear(self, W: torch.Tensor, b: torch.Tensor | None) -> _Aff:
        """``F.linear`` applied region by region without materialising the input maps."""
        if self.M.shape[0] > 1:
            return self._linear_from_parents(W, b)
        O, Fi = W.shape
        # Shared input map: region p's output rows are mult_p @ (M_r[:, None] * W.T), one matmul for all r, in
        # blocks of ~2**17 pieces that stay in cache; the (3 O, F) layout multiplies several times faster than
        # (F, 3 O) when 3 O is small.
        BT = (self.M[0][:, :, None] * W.T[None]).permute(0, 2, 1).reshape(3 * O, Fi)
        out = self.M.new_empty(self.P, 3, O)
        step = max(1, (1 << 17) // max(Fi, 3 * O))
        for i in range(0, self.P, step):
            mult, const = self.pieces(slice(i, i + step))
            y = out[i : i + step]
            torch.mm(mult, BT.t(), out=y.view(-1, 3 * O))
            if const is not None:
                y[:, 2] += const @ W.T
        if b is not None:
            out[:, 2] += b
        return _Aff(out)

    def _dense_linear(self, W: torch.Tensor) -> torch.Tensor:
        O, Fi = W.shape
        out = self.M.new_empty(self.P, 3, O)
        # Blocks of ~2**16 elements: each block's input maps stay in cache between being built and multiplied.
        step = max(1, (1 << 16) // (3 * max(Fi, O)))
        WT = W.T
        for i in range(0, self.P, step):
            x = self.block(slice(i, i + step))
            torch.mm(x.view(-1, Fi), WT, out=out[i : i + step].view(-1, O))
        return out

    def _linear_from_parents(self, W: torch.Tensor, b: torch.Tensor | None) -> _Aff:
        """Per-region input maps: the regions made from one parent differ only in the few units whose
        breakpoint crosses that parent, so one dense product per parent (on its first region's pieces) plus a
        rank-one correction per differing (region, unit) gives every region's output."""
        P, R = self.P, self.M.shape[0]
        dev = self.parent.device
        first = torch.full((R,), P, dtype=torch.long, device=dev)
        first.scatter_reduce_(0, self.parent, torch.arange(P, device=dev), "amin")
        used = torch.nonzero(first < P)[:, 0]
        # Few regions share a parent, or too little work to pay for the bookkeeping: the dense product.
        if 4 * used.shape[0] > 3 * P or (P - used.shape[0]) * self.M.shape[2] * W.shape[0] < _SHARED_MIN_WORK:
            out = self._dense_linear(W)
            if b is not None:
                out[:, 2] += b
        else:
            ref = first[used]  # the reference region of every parent in use
            sub = _Masked(self.M, used, self.code[ref], self.mult, self.const, self.feat, used.shape[0] == R)
            base = sub._dense_linear(W)  # (R', 3, O)
            if b is not None:
                base[:, 2] += b  # once per parent; the corrections do not involve it
            slot = torch.empty(R, dtype=torch.long, device=dev)
            slot[used] = torch.arange(used.shape[0], device=dev)
            out = base[slot[self.parent]]
            rc = first[self.parent]
            pi, fi = torch.nonzero(self.code != self.code[rc], as_tuple=True)
            if pi.numel():
                cp, cr = self.code[pi, fi].long(), self.code[rc[pi], fi].long()
                v = self.M[self.parent[pi], :, fi] * (self.mult[cp, fi] - self.mult[cr, fi])[:, None]  # (n, 3)
                v[:, 2] += self.const[cp, fi] - self.const[cr, fi]
                WT = W.T
                O = W.shape[0]
                flat = out.view(P, 3 * O)
                step = max(1, (1 << 21) // (3 * O))
                for i in range(0, pi.shape[0], step):
                    s = slice(i, i + step)
                    flat.index_add_(0, pi[s], (v[s, :, None] * WT[fi[s]][:, None, :]).reshape(-1, 3 * O))
        return _Aff(out)


def _private_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """Deep copy in float64 eval mode on ``device``; the caller's module is never touched."""
    memo: dict[int, Any] = {}
    trainer = getattr(model, "_trainer", None)  # a LightningModule must not drag its Trainer along
    if trainer is not None:
        memo[id(trainer)] = None
    m = copy.deepcopy(model, memo)
    m = m.to(device=device, dtype=torch.float64)
    m.eval()
    m.requires_grad_(False)
    return m


def _reject_script(model: nn.Module) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a TorchScript module, which torch.fx cannot trace; pass the original "
            "nn.Module (or a torch.save'd one)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_finite(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise ValueError(
                f"the model's '{name}' is on the 'meta' device, which holds no values; load real weights first "
                "(e.g. model.to_empty(device='cpu') then load_state_dict)"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"the model's '{name}' contains NaN or Inf values")


def _resolve_device(model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def check_model(model: nn.Module, input_shape: Sequence[int] | None = None) -> None:
    """Check that ``model`` can be partitioned, without computing anything.

    Traces a private copy and classifies every operation; if ``input_shape`` is given, also runs a single
    sample through the copy to check shapes.

    Raises:
        UnsupportedModelError: a layer or operation is not affine/piecewise linear (named with its path),
            or the model cannot be traced.
        ValueError: NaN or Inf in the weights.
    """
    prepare_model(model, input_shape=input_shape)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _pool_windows(
    feat_shape: tuple[int, ...], kernel, stride, padding, dilation, ceil_mode: bool, nd: int, device
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Flat input indices of every max-pooling window (``-1`` for padding) and the output feature shape."""

    def tup(x, default):
        x = default if x is None else x
        return tuple(x) if isinstance(x, (tuple, list)) else (x,) * nd

    k = tup(kernel, None)
    s = tup(stride if stride not in (None, [], ()) else kernel, None)
    p = tup(padding, 0)
    d = tup(dilation, 1)
    spatial = feat_shape[-nd:]
    probe = torch.zeros(1, *feat_shape)
    pool = F.max_pool1d if nd == 1 else F.max_pool2d
    out_sp = pool(probe, k, s, p, d, ceil_mode).shape[-nd:]
    axes = []
    for ax in range(nd):
        start = torch.arange(out_sp[ax])[:, None] * s[ax] - p[ax]
        pos = start + torch.arange(k[ax])[None, :] * d[ax]  # (out, k)
        axes.append(pos)
    lead = int(math.prod(feat_shape[:-nd]))
    if nd == 1:
        pos = axes[0]
        valid = (pos >= 0) & (pos < spatial[0])
        flat = pos.clamp(0, spatial[0] - 1)
        idx = torch.arange(lead)[:, None, None] * spatial[0] + flat[None]
        idx = torch.where(valid[None], idx, torch.full_like(idx, -1))
        windows = idx.reshape(-1, k[0])
    else:
        ph, pw = axes
        vh = (ph >= 0) & (ph < spatial[0])
        vw = (pw >= 0) & (pw < spatial[1])
        fh, fw = ph.clamp(0, spatial[0] - 1), pw.clamp(0, spatial[1] - 1)
        # (lead, oh, ow, kh, kw)
        idx = (
            torch.arange(lead)[:, None, None, None, None] * spatial[0] * spatial[1]
            + fh[None, :, None, :, None] * spatial[1]
            + fw[None, None, :, None, :]
        )
        valid = vh[:, None, :, None] & vw[None, :, None, :]
        idx = torch.where(valid[None], idx, torch.full_like(idx, -1))
        windows = idx.reshape(-1, k[0] * k[1])
    return windows.to(device), (*feat_shape[:-nd], *out_sp)


class _Interpreter:
    """Evaluates the traced graph on affine maps, refining the regions at every piecewise-linear node.

    The state is the current regions (``verts``, ``counts``), the live values (``env``) and the activation
    codes so far. Regions are independent once made, so when the next node would not fit the memory budget
    the state is cut into chunks of regions and each chunk runs through the rest of the graph on its own
    (depth first); per-region values are gathered lazily, so a chunk only ever holds its own regions' maps.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        kinds: dict,
        sl: Slice,
        input_shape,
        device,
        max_regions,
        generator,
        budget: int | None = None,
        widths: dict | None = None,
    ) -> None:
        self.gm = gm
        self.kinds = kinds
        self.dev = device
        self.max_regions = max_regions
        self.gen = generator
        self.budget = budget if budget is not None else memory.default_budget(device)
        self.widths = widths or {}
        dom = sl.domain.to(device)
        # Work in coordinates centred on the domain: tolerances then scale with the domain, not with its
        # distance from the plane's origin.
        self.centre = (dom.amin(0) + dom.amax(0)) / 2
        dom = dom - self.centre
        self.verts = dom[None].clone()
        self.counts = torch.tensor([dom.shape[0]], device=device)
        self.extent = dom.abs().amax(0)
        self.codes: dict[str, torch.Tensor] = {}
        self.env: dict[fx.Node, Any] = {}
        shape = tuple(input_shape) if input_shape is not None else (sl.input_dim,)
        if math.prod(shape) != sl.input_dim:
            raise ValueError(
                f"input_shape {shape} has {math.prod(shape)} elements but the slice lives in {sl.input_dim} dimensions"
            )
        b0, b1 = sl.basis[0].to(device), sl.basis[1].to(device)
        origin = sl.origin.to(device) + self.centre[0] * b0 + self.centre[1] * b1
        rows = torch.stack([b0, b1, origin])
        self.input = _Aff(rows.reshape(1, 3, *shape))
        # Depth-first bookkeeping: states set aside while their chunks run, finished regions and their bytes.
        self._stack: list[tuple] = []
        self._done = 0
        self._pending = 0
        self._result_bytes = 0
        self._node = None

    @classmethod
    def for_slices(
        cls, gm, kinds, slices: Sequence[Slice], input_shape, device, max_regions, generator, budget=None, widths=None
    ) -> _Interpreter:
        """Several partitions in one pass (used by :mod:`splinecam_lightning.local`): one initial region per
        slice, each with its own input map (``P = N``) and its own centred, scaled coordinates.

        Slice ``i``'s coordinates are ``(uv - centre[i]) / scale[i]``, where ``scale[i]`` makes its extent the
        first slice's: tolerances are relative to the extent, so every slice keeps exactly its own (the scale is
        1 when extents agree). Each region's slice index travels with the codes, as ``codes[ROOT_CODE]``, so
        refinement and chunking keep it per region.
        """
        it = cls(gm, kinds, slices[0], input_shape, device, max_regions, generator, budget=budget, widths=widths)
        if len({s.input_dim for s in slices}) > 1:
            raise ValueError(
                f"the slices live in spaces of different dimensions {sorted({s.input_dim for s in slices})}"
            )
        doms = [s.domain.to(device) for s in slices]
        K = max(d.shape[0] for d in doms)
        dom = torch.stack([torch.cat([d, d[:1].expand(K - d.shape[0], 2)]) for d in doms])  # padded with vertex 0
        it.centre = (dom.amin(1) + dom.amax(1)) / 2
        dom = dom - it.centre[:, None]
        ext = dom.abs().amax(1)
        it.extent = ext[0]
        it.scale = ext / it.extent
        it.verts = dom / it.scale[:, None]
        it.counts = torch.tensor([d.shape[0] for d in doms], device=device)
        basis = torch.stack([s.basis for s in slices]).to(device)  # (N, 2, D)
        origin = torch.stack([s.origin for s in slices]).to(device) + (it.centre[:, :, None] * basis).sum(1)
        rows = torch.cat([basis * it.scale[:, :, None], origin[:, None]], 1)
        it.input = _Aff(rows.reshape(len(slices), 3, *it.input.data.shape[2:]))
        it.codes[ROOT_CODE] = torch.arange(len(slices), device=device)
        return it

    # ------------------------------------------------------------------ memory
    def _held(self) -> int:
        return (
            memory.held_bytes(self.verts, self.counts, self.env, self.codes, self.input, self._stack)
            + self._result_bytes
        )

    def _where(self) -> str:
        node = self._node
        return describe(node, self.gm) if node is not None else "the input"

    def _so_far(self) -> int:
        return self._done + self._pending + int(self.verts.shape[0])

    def _budget_error(self, what: str) -> MemoryBudgetError:
        return MemoryBudgetError(
            f"{what} at {self._where()} ({self._so_far()} regions so far, memory budget {_gib(self.budget)}, "
            f"{_gib(self._held())} held); raise max_memory, free memory or use a smaller slice"
        )

    def _node_bytes(self, node: fx.Node) -> tuple[int, bool]:
        """Estimated bytes to run ``node``: per region if its inputs are per-region, else once."""
        per_region = False
        width = self.widths.get(node, 0)
        if self._fusable(node) is not None:
            # Consumes the factored maps in bounded chunks: per region only its output maps and the (int8,
            # bool) comparison of its pieces with its parent's reference region.
            inp = node.args[0]
            return (24 * width + 2 * self.widths.get(inp, 0)) * _TEMP_FACTOR, _per_region(self.env.get(inp))
        for inp in node.all_input_nodes:
            v = self.env.get(inp)
            per_region |= _per_region(v)
            if _unmaterialized(v) or self.kinds.get(node) == "cpwl":
                width += self.widths.get(inp, 0)
        return 24 * width * _TEMP_FACTOR, per_region

    def _child_bytes(self, node: fx.Node) -> int:
        """Estimated bytes each region made by refining at ``node`` adds before the next node runs."""
        codes = sum(t[0].numel() * t.element_size() for t in self.codes.values() if t.shape[0])
        lazies = 8 * sum(1 for v in self.env.values() if _per_region(v))
        inp = sum(self.widths.get(i, 0) for i in node.all_input_nodes)
        if _is_window_node(node):  # max pooling gathers every child's output maps at once
            return codes + lazies + _REGION_OVERHEAD + inp + 32 * self.widths.get(node, 0)
        return codes + lazies + _REGION_OVERHEAD + inp  # unit-wise nodes keep one int8 code per unit

    # ------------------------------------------------------------------ refinement
    def _refine(self, family) -> torch.Tensor:
        node = self._node
        left = self.max_regions - self._done - self._pending
        avail = self.budget - self._held()
        per_child = self._child_bytes(node) if node is not None else _REGION_OVERHEAD
        cap = max(1, avail // per_child)
        try:
            v, c, parent = refine(self.verts, self.counts, family, max_regions=min(left, cap), generator=self.gen)
        except TooManyRegionsError:
            if cap < left:
                raise _RefineTooBig from None
            raise TooManyRegionsError(
                f"the partition has more than max_regions={self.max_regions} regions (at {self._where()}, "
                f"{self._done + self._pending} regions finished or pending besides this chunk's); raise "
                "max_regions or use a smaller domain"
            ) from None
        if v.shape[0] != self.verts.shape[0] or not torch.equal(parent, torch.arange(len(parent), device=self.dev)):
            # Regions split: per-region values follow their parents lazily (gathered when next used).
            self.env = {n: _take(val, parent) for n, val in self.env.items()}
            self.codes = {k: t[parent] for k, t in self.codes.items()}
        self.verts, self.counts = v, c
        return parent

    def _scalar_cpwl(self, name: str, x: _Aff, thresholds, mult, const) -> _Masked:
        """Unit-wise CPWL with breakpoints ``thresholds``; piece ``c`` maps ``z -> mult[c] * z + const[c]``."""
        feat = tuple(x.data.shape[2:])
        M = x.data.reshape(x.P, 3, -1)
        fam = LineFamily(M, list(thresholds), self.extent)
        parent = self._refine(fam)
        pts = geometry.vertex_means(self.verts, self.counts)
        code = fam.codes(pts, parent)  # chunks internally, writing into one (P, F) tensor
        self.codes[name] = code
        mult = torch.as_tensor(mult, dtype=M.dtype, device=M.device)  # (pieces, F) or (pieces, 1)
        const = torch.as_tensor(const, dtype=M.dtype, device=M.device)
        mult = mult.reshape(mult.shape[0], -1).expand(-1, M.shape[2]).contiguous()
        const = const.reshape(const.shape[0], -1).expand(-1, M.shape[2]).contiguous()
        return _Masked(M, parent, code, mult, const, feat)

    def _max_windows(self, name: str, x: _Aff, windows: torch.Tensor, out_feat: tuple[int, ...]) -> _Aff:
        M = x.data.reshape(x.P, 3, -1)
        fam = WindowFamily(M, windows, self.extent)
        parent = self._refine(fam)
        pts = geometry.vertex_means(self.verts, self.counts)
        step = _rows_per_chunk(M.shape[2])  # codes gather each point's (3, F) map: keep that bounded
        code = torch.cat([fam.codes(pts[i : i + step], parent[i : i + step]) for i in range(0, len(pts), step)])
        self.codes[name] = code  # (P, W)
        chosen = torch.gather(windows.expand(len(parent), -1, -1), 2, code.long()[..., None])[..., 0]  # (P, W)
        # Gather only the chosen units of each region's parent map, never the whole (P, 3, F).
        rows = parent if M.shape[0] > 1 else torch.zeros_like(parent)
        r3 = torch.arange(3, device=M.device)
        out = M[rows[:, None, None], r3[None, :, None], chosen[:, None, :]]
        return _Aff(out.reshape(len(parent), 3, *out_feat))

    # ------------------------------------------------------------------ node handlers
    def _unwrap(self, a):
        return fx.node.map_arg(a, self._get)

    def _get(self, n: fx.Node):
        val = self.env[n]
        if _unmaterialized(val):
            val = self.env[n] = _materialize(val)
        return val

    def _fusable(self, node: fx.Node) -> tuple[_Masked, nn.Linear] | None:
        """``(input, layer)`` when ``node`` is a Linear layer fed by a unit-wise activation's factored maps."""
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        x = self.env.get(node.args[0])
        if not isinstance(x, _Masked) or len(x.feat) != 1:
            return None
        m = self.gm.get_submodule(node.target)
        return (x, m) if isinstance(m, nn.Linear) else None

    def _fused_linear(self, node: fx.Node) -> _Aff | None:
        """A Linear layer fed by a unit-wise activation: consume the factored maps chunk by chunk."""
        xm = self._fusable(node)
        return None if xm is None else xm[0].linear(xm[1].weight, xm[1].bias)

    def run(self) -> _Aff:
        """Run the graph; afterwards ``verts``, ``counts`` and ``codes`` describe the final regions."""
        self._nodes = list(self.gm.graph.nodes)
        self._last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(self._nodes):
            for inp in n.all_input_nodes:
                self._last_use[inp] = i
        verts, counts, out, codes = self._run_from(0)
        self.verts, self.counts, self.codes = verts, counts, codes
        self.env = {}
        return out

    def _run_from(self, start: int) -> tuple:
        nodes = self._nodes
        for i in range(start, len(nodes)):
            node = nodes[i]
            kind = self.kinds[node]
            self._node = node
            if kind == "placeholder":
                val = self.input if node is nodes[0] or not node.args else node.args[0]
            elif kind == "get_attr":
                val = self.gm
                for part in node.target.split("."):
                    val = getattr(val, part)
            elif kind == "output":
                result = _materialize(self._unwrap(node.args[0]))
                if not isinstance(result, _Aff):
                    raise UnsupportedModelError(
                        f"the model must return a single tensor that depends on its input, got {type(result).__name__}"
                    )
                return self.verts, self.counts, result, self.codes
            else:
                R = int(self.verts.shape[0])
                need, per_region = self._node_bytes(node)
                avail = self.budget - self._held()
                if need > avail:
                    raise self._budget_error(f"one region needs ~{_gib(need)}, more than is left of the budget")
                if per_region and R > 1 and R * need > min(avail, WORK_BYTES):
                    return self._split(i, max(1, min(avail, WORK_BYTES) // need))
                try:
                    val = self._fused_linear(node)
                    if val is None:
                        args = self._unwrap(node.args)
                        kwargs = self._unwrap(node.kwargs)
                        val = getattr(self, f"_do_{kind}")(node, args, kwargs)
                except _RefineTooBig:
                    if R == 1:
                        raise self._budget_error("refining one region makes more regions than fit") from None
                    return self._split(i, max(1, R // 4))
                except (UnsupportedModelError, TooManyRegionsError, MemoryBudgetError, ValueError):
                    raise
                except Exception as e:
                    if memory.is_allocation_failure(e):
                        raise self._budget_error(f"the allocator failed ({type(e).__name__}: {e})") from None
                    raise UnsupportedModelError(  # shape errors etc.: say where
                        f"failed at {describe(node, self.gm)}: {type(e).__name__}: {e}"
                    ) from e
            self.env[node] = val
            for inp in node.all_input_nodes:
                if self._last_use.get(inp) == i:
                    self.env.pop(inp, None)
        raise UnsupportedModelError("the traced graph has no output")

    def _split(self, start: int, size: int) -> tuple:
        """Run nodes ``start..`` on chunks of ``size`` current regions, one after the other; merge the results."""
        verts, counts, env, codes = self.verts, self.counts, self.env, self.codes
        R = int(verts.shape[0])
        done0, bytes0 = self._done, self._result_bytes
        self._stack.append((verts, counts, env, codes))
        self._pending += R
        parts = []
        try:
            for s0 in range(0, R, size):
                idx = torch.arange(s0, min(R, s0 + size), device=self.dev)
                self._pending -= len(idx)
                self.verts, self.counts = verts[idx], counts[idx]
                self.env = {n: _take(v, idx) for n, v in env.items()}
                self.codes = {k: t[idx] for k, t in codes.items()}
                res = self._run_from(start)
                parts.append(res)
                self._done += int(res[0].shape[0])
                self._result_bytes += memory.held_bytes(res)
                self.env = {}
        finally:
            self._stack.pop()
        self._done, self._result_bytes = done0, bytes0
        K = max(p[0].shape[1] for p in parts)
        out_v = torch.cat([geometry.widen(v, K) for v, *_ in parts])
        out_c = torch.cat([p[1] for p in parts])
        data = torch.cat([p[2].data.expand(p[0].shape[0], *p[2].data.shape[1:]) for p in parts])
        # Layer by layer, dropping each part's copy as it is merged: the codes are the bulk of a large result.
        out_codes = {k: torch.cat([p[3].pop(k) for p in parts]) for k in list(parts[0][3])}
        self.verts, self.counts, self.codes, self.env = out_v, out_c, out_codes, {}
        return out_v, out_c, _Aff(data), out_codes

    def _do_output_transform(self, node, args, kwargs):
        return args[0]

    def _do_linear(self, node, args, kwargs):
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            x = args[0]
            if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)):
                return x
            return _Aff.unflat(m(x.flat))
        t = node.target
        if node.op == "call_method" and t in ("float", "double", "to", "type_as", "contiguous"):
            return args[0]  # keep float64
        if t in (F.dropout, F.dropout1d, F.dropout2d):
            return args[0]
        if t is operator.getitem and isinstance(args[0], (tuple, list)):
            return args[0][args[1]]
        if t is operator.getitem and isinstance(args[0], _Aff):
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if idx and not (isinstance(idx[0], slice) and idx[0] == slice(None)) and idx[0] is not Ellipsis:
                raise UnsupportedModelError(f"{describe(node, self.gm)} indexes the batch dimension")
        if t in (torch.cat, torch.concat, torch.stack):
            tensors = list(args[0])
            dim = _arg(args, kwargs, 1, "dim", 0)
            if dim == 0:
                raise UnsupportedModelError(f"{describe(node, self.gm)} concatenates along the batch dimension")
            if not all(isinstance(a, _Aff) for a in tensors):
                raise UnsupportedModelError(f"{describe(node, self.gm)} mixes input-dependent and constant tensors")
            P = max(a.P for a in tensors)
            flats = [a.data.expand(P, *a.data.shape[1:]).flatten(0, 1) for a in tensors]
            return _Aff.unflat((torch.stack if t is torch.stack else torch.cat)(flats, dim=dim))
        if t is F.pad:
            mode = _arg(args, kwargs, 2, "mode", "constant")
            value = _arg(args, kwargs, 3, "value", None)
            if mode == "constant" and value not in (None, 0, 0.0):
                return self._pad_constant(args[0], _arg(args, kwargs, 1, "pad"), float(value))
        affs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, _Aff)]
        if not affs:
            return getattr(args[0], t)(*args[1:], **kwargs) if node.op == "call_method" else t(*args, **kwargs)

        def sub(a):
            return a.flat if isinstance(a, _Aff) else a

        fargs = tuple(sub(a) for a in args)
        fkwargs = {k: sub(v) for k, v in kwargs.items()}
        out = getattr(fargs[0], t)(*fargs[1:], **fkwargs) if node.op == "call_method" else t(*fargs, **fkwargs)
        if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == fargs[0].shape[0]:
            return _Aff.unflat(out)
        if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
            return type(out)(_Aff.unflat(o) for o in out)
        if isinstance(out, torch.Tensor):
            raise UnsupportedModelError(f"{describe(node, self.gm)} reduces over the batch dimension")
        return out  # sizes, shapes, ints

    @staticmethod
    def _pad_constant(x: _Aff, pad, value: float) -> _Aff:
        """Constant padding is affine: derivative rows pad with 0, the value row with ``value``."""
        d = x.data
        rows = F.pad(d[:, :2].flatten(0, 1), pad).unflatten(0, (d.shape[0], 2))
        val = F.pad(d[:, 2], pad, value=value)
        return _Aff(torch.cat([rows, val[:, None]], 1))

    def _do_arith(self, node, args, kwargs):
        if not any(isinstance(a, _Aff) for a in list(args) + list(kwargs.values())):
            # Constants only (shape arithmetic such as ``x.shape[1] - 4``): evaluate as Python would.
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)
        if node.target not in _ARITH_NAMES and node.op == "call_function":
            raise UnsupportedModelError(f"{describe(node, self.gm)} on an input-dependent tensor is not affine")
        name = _ARITH_NAMES[node.target] if node.op == "call_function" else node.target.strip("_")
        if name == "neg":
            return _Aff(-args[0].data)
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        alpha = kwargs.get("alpha", 1)
        if name in ("add", "sub"):
            if alpha != 1:
                b = _Aff(b.data * alpha) if isinstance(b, _Aff) else b * alpha
            if name == "sub":
                b = _Aff(-b.data) if isinstance(b, _Aff) else -b
            if isinstance(a, _Aff) and isinstance(b, _Aff):
                return _Aff(a.data + b.data)
            x, c = (a, b) if isinstance(a, _Aff) else (b, a)
            out = x.data.clone()
            # A constant only shifts the value row; broadcasting aligns it with the per-sample features.
            out[:, 2] = out[:, 2] + torch.as_tensor(c, dtype=out.dtype, device=out.device)
            return _Aff(out)
        if name in ("mul", "div"):
            if isinstance(a, _Aff) and isinstance(b, _Aff):
                raise UnsupportedModelError(
                    f"{describe(node, self.gm)} multiplies two input-dependent tensors, which is not piecewise linear"
                )
            if name != "mul" and not isinstance(a, _Aff):
                raise UnsupportedModelError(f"{describe(node, self.gm)} divides by an input-dependent tensor")
            x, c = (a, b) if isinstance(a, _Aff) else (b, a)
            c = torch.as_tensor(c, dtype=x.data.dtype, device=x.data.device)
            return _Aff(x.data * c if name == "mul" else x.data / c)
        raise UnsupportedModelError(f"unsupported arithmetic {describe(node, self.gm)}")

    def _do_affine(self, node, args, kwargs):
        x = args[0]
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            if isinstance(m, nn.Linear):
                out = _Aff.unflat(F.linear(x.flat, m.weight))
                if m.bias is not None:
                    out.data[:, 2] += m.bias
                return out
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                out = _Aff.unflat(m._conv_forward(x.flat, m.weight, None))
                if m.bias is not None:
                    out.data[:, 2] += m.bias.view(-1, *([1] * (out.data.dim() - 3)))
                return out
            if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
                conv = F.conv_transpose1d if isinstance(m, nn.ConvTranspose1d) else F.conv_transpose2d
                out = _Aff.unflat(
                    conv(x.flat, m.weight, None, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
                )
                if m.bias is not None:
                    out.data[:, 2] += m.bias.view(-1, *([1] * (out.data.dim() - 3)))
                return out
            if isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d)):
                return self._pad_constant(x, m.padding, float(m.value))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is None or m.running_var is None:
                    raise UnsupportedModelError(
                        f"{describe(node, self.gm)} has track_running_stats=False: it normalises with batch "
                        "statistics, which is not a fixed function of one input"
                    )
                scale = torch.rsqrt(m.running_var + m.eps)
                if m.weight is not None:
                    scale = scale * m.weight
                shift = -m.running_mean * scale
                if m.bias is not None:
                    shift = shift + m.bias
                view = (-1, *([1] * (x.data.dim() - 3)))
                out = x.data * scale.view(view)
                out[:, 2] += shift.view(view)
                return _Aff(out)
        t = node.target
        if t is F.linear:
            w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
            out = _Aff.unflat(F.linear(x.flat, w))
            if b is not None:
                out.data[:, 2] += b
            return out
        if t in (F.conv1d, F.conv2d):
            w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
            rest = list(args[3:])
            kw = {k: v for k, v in kwargs.items() if k not in ("weight", "bias", "input")}
            out = _Aff.unflat(t(x.flat, w, None, *rest, **kw))
            if b is not None:
                out.data[:, 2] += b.view(-1, *([1] * (out.data.dim() - 3)))
            return out
        raise UnsupportedModelError(f"unsupported affine operation {describe(node, self.gm)}")

    def _do_cpwl(self, node, args, kwargs):
        name = node.target if node.op == "call_module" else node.name
        x = args[0]
        if not isinstance(x, _Aff):
            raise UnsupportedModelError(f"{describe(node, self.gm)} applied to a constant")
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            if isinstance(m, nn.ReLU):
                return self._scalar_cpwl(name, x, [0.0], [[0.0], [1.0]], [[0.0], [0.0]])
            if isinstance(m, nn.LeakyReLU):
                return self._scalar_cpwl(name, x, [0.0], [[m.negative_slope], [1.0]], [[0.0], [0.0]])
            if isinstance(m, nn.PReLU):
                return self._prelu(name, x, m.weight)
            if isinstance(m, nn.Hardtanh):  # includes ReLU6
                return self._hardtanh(name, x, m.min_val, m.max_val)
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
                if m.return_indices:
                    raise UnsupportedModelError(f"{describe(node, self.gm)} returns indices")
                nd = 1 if isinstance(m, nn.MaxPool1d) else 2
                return self._maxpool(name, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, nd)
            if isinstance(m, Maxout):
                feat = tuple(x.data.shape[2:])
                k = m.pool_size
                idx = torch.arange(math.prod(feat)).reshape(feat[0] // k, k, *feat[1:]).movedim(1, -1)
                out_feat = (feat[0] // k, *feat[1:])
                return self._max_windows(name, x, idx.reshape(-1, k).to(self.dev), out_feat)
        t = node.target
        meth = node.op == "call_method"
        if t in (F.relu, torch.relu) or (meth and t == "relu"):
            return self._scalar_cpwl(name, x, [0.0], [[0.0], [1.0]], [[0.0], [0.0]])
        if t is F.relu6:
            return self._hardtanh(name, x, 0.0, 6.0)
        if t is F.leaky_relu:
            slope = _arg(args, kwargs, 1, "negative_slope", 0.01)
            return self._scalar_cpwl(name, x, [0.0], [[slope], [1.0]], [[0.0], [0.0]])
        if t is F.hardtanh:
            return self._hardtanh(
                name, x, _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
            )
        if t in (torch.abs,) or (meth and t == "abs"):
            return self._scalar_cpwl(name, x, [0.0], [[-1.0], [1.0]], [[0.0], [0.0]])
        if t in (torch.clamp, torch.clip) or (meth and t in ("clamp", "clip")):
            lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
            if isinstance(lo, (torch.Tensor, _Aff)) or isinstance(hi, (torch.Tensor, _Aff)):
                raise UnsupportedModelError(f"{describe(node, self.gm)}: clamp bounds must be numbers")
            if lo is not None and hi is not None:
                return self._hardtanh(name, x, float(lo), float(hi))
            if lo is not None:
                return self._scalar_cpwl(name, x, [float(lo)], [[0.0], [1.0]], [[float(lo)], [0.0]])
            if hi is not None:
                return self._scalar_cpwl(name, x, [float(hi)], [[1.0], [0.0]], [[0.0], [float(hi)]])
            return x
        if t in (F.max_pool1d, F.max_pool2d):
            if _arg(args, kwargs, 6, "return_indices", False):
                raise UnsupportedModelError(f"{describe(node, self.gm)} returns indices")
            nd = 1 if t is F.max_pool1d else 2
            k = _arg(args, kwargs, 1, "kernel_size")
            return self._maxpool(
                name,
                x,
                k,
                _arg(args, kwargs, 2, "stride", None),
                _arg(args, kwargs, 3, "padding", 0),
                _arg(args, kwargs, 4, "dilation", 1),
                _arg(args, kwargs, 5, "ceil_mode", False),
                nd,
            )
        if t in (torch.maximum, torch.minimum) or (t is torch.max and isinstance(_arg(args, kwargs, 1, "other"), _Aff)):
            return self._elementwise_max(name, node, args[0], args[1], minimum=t is torch.minimum)
        if t in (torch.amax, torch.max) or (meth and t in ("amax", "max")):
            dim = _arg(args, kwargs, 1, "dim", None)
            keepdim = _arg(args, kwargs, 2, "keepdim", False)
            return_tuple = (t is torch.max or t == "max") and dim is not None
            out = self._reduce_max(name, node, x, dim, keepdim)
            return _MaxResult(out, None) if return_tuple else out
        raise UnsupportedModelError(f"unsupported operation {describe(node, self.gm)}")

    def _prelu(self, name, x, weight):
        w = weight.reshape(-1)
        feat = tuple(x.data.shape[2:])
        if w.numel() == 1:
            neg = w.expand(math.prod(feat) if feat else 1)
        else:
            shape = [1] * len(feat)
            shape[0] = -1
            neg = w.reshape(shape).expand(feat).reshape(-1)
        ones = torch.ones_like(neg)
        return self._scalar_cpwl(name, x, [0.0], torch.stack([neg, ones]), torch.zeros(2, 1))

    def _hardtanh(self, name, x, lo, hi):
        return self._scalar_cpwl(
            name, x, [float(lo), float(hi)], [[0.0], [1.0], [0.0]], [[float(lo)], [0.0], [float(hi)]]
        )

    def _maxpool(self, name, x, kernel, stride, padding, dilation, ceil_mode, nd):
        feat = tuple(x.data.shape[2:])
        windows, out_feat = _pool_windows(feat, kernel, stride, padding, dilation, ceil_mode, nd, self.dev)
        return self._max_windows(name, x, windows, out_feat)

    def _reduce_max(self, name, node, x, dim, keepdim):
        feat = tuple(x.data.shape[2:])
        F_ = math.prod(feat)
        if dim is None:
            return self._max_windows(name, x, torch.arange(F_, device=self.dev)[None], ())
        if isinstance(dim, (tuple, list)):
            raise UnsupportedModelError(f"{describe(node, self.gm)}: max over several dims is not supported")
        d = dim if dim < 0 else dim - 1  # per-sample dim (dim 0 is the batch)
        if dim == 0:
            raise UnsupportedModelError(f"{describe(node, self.gm)} takes the max over the batch dimension")
        d = d % len(feat)
        idx = torch.arange(F_).reshape(feat).movedim(d, -1)
        out_feat = list(idx.shape[:-1])
        windows = idx.reshape(-1, feat[d])
        if keepdim:
            out_feat.insert(d, 1)
        return self._max_windows(name, x, windows.to(self.dev), tuple(out_feat))

    def _elementwise_max(self, name, node, a, b, minimum: bool):
        if not (isinstance(a, _Aff) and isinstance(b, _Aff)):
            const_a = not isinstance(a, _Aff)
            x = b if const_a else a
            c = torch.as_tensor(a if const_a else b, dtype=x.data.dtype, device=x.data.device)
            cz = torch.zeros_like(x.data)
            cz[:, 2] = c
            a, b = x, _Aff(cz)
        P = max(a.P, b.P)
        feat = torch.broadcast_shapes(a.data.shape[2:], b.data.shape[2:])
        da = a.data.expand(P, 3, *feat).reshape(P, 3, -1)
        db = b.data.expand(P, 3, *feat).reshape(P, 3, -1)
        sgn = -1.0 if minimum else 1.0
        both = _Aff(sgn * torch.cat([da, db], 2))
        n = da.shape[2]
        windows = torch.stack([torch.arange(n), torch.arange(n) + n], 1).to(self.dev)
        out = self._max_windows(name, both, windows, tuple(feat))
        return _Aff(sgn * out.data)


class _WidthRecorder(fx.Interpreter):
    """Runs one sample and records every node's output size per sample (its number of features)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.widths: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        ts: list[torch.Tensor] = []
        memory._tensors(out, ts)
        self.widths[n] = sum(t.numel() for t in ts if t.is_floating_point())
        return out


def _probe_shape(gm: fx.GraphModule, shape: tuple[int, ...], device: torch.device) -> dict[fx.Node, int]:
    """One real forward pass on a single sample, so shape mismatches fail with a clear message; returns the
    per-sample width of every node (for memory estimates)."""
    rec = _WidthRecorder(gm)
    try:
        rec.run(torch.zeros(1, *shape, dtype=torch.float64, device=device))
    except Exception as e:
        if memory.is_allocation_failure(e):
            raise MemoryBudgetError(
                f"one forward pass on a single sample of shape {tuple(shape)} failed to allocate: {e}"
            ) from None
        raise ValueError(
            f"the model cannot take inputs of per-sample shape {tuple(shape)} (the slice has "
            f"{math.prod(shape)} dimensions); pass input_shape= or a slice of the right dimension. "
            f"{type(e).__name__}: {e}"
        ) from None
    return rec.widths


@dataclass(frozen=True)
class PreparedModel:
    """A private float64 eval-mode copy of a model, traced with ``torch.fx`` and checked.

    Made by :func:`prepare_model` on the calling thread; :func:`compute_partition` accepts it in place of the
    model. Computing from it never traces, so it may run on another thread (``torch.fx`` tracing patches
    ``nn.Module.__call__`` process-wide and must not overlap with other module calls).
    """

    graph_module: fx.GraphModule
    kinds: dict
    device: torch.device
    input_shape: tuple[int, ...] | None = None
    # Node widths from the forward pass on each input shape probed so far, so repeated calls skip it.
    probed: dict = field(default_factory=dict, repr=False, compare=False)


def prepare_model(model: nn.Module, *, input_shape: Sequence[int] | None = None, device: Any = None) -> PreparedModel:
    """Snapshot ``model`` for partitioning: copy (float64, eval, on ``device``), trace and classify it.

    The caller's module is not modified. Raises the same errors as :func:`compute_partition` for the model.
    """
    _reject_script(model)
    _check_finite(model)
    dev = _resolve_device(model, device)
    gm = trace_model(_private_copy(model, dev))
    kinds = classify_nodes(gm)
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    if shape is not None:
        with torch.no_grad():
            _probe_shape(gm, shape, dev)
    return PreparedModel(gm, kinds, dev, shape)


def compute_partition(
    model: nn.Module | PreparedModel,
    slice: Slice,
    *,
    input_shape: Sequence[int] | None = None,
    max_regions: int = DEFAULT_MAX_REGIONS,
    device: Any = None,
    class_pair: tuple[int, int] | None = None,
    seed: int = 0,
    max_memory: int | None = None,
) -> Partition:
    """Exact partition of ``slice`` into the linear regions of ``model``.

    Works on a private float64 eval-mode copy of ``model`` (BatchNorm uses running statistics, Dropout is off);
    the caller's module, its dtype, device, mode and gradients are never touched. A trailing Softmax,
    LogSoftmax or Sigmoid is skipped: it moves neither the argmax nor the 0.5 level, so the boundary and
    regions are those of the logits, and ``jacobians``/``offsets`` describe the logits.

    Args:
        model: A network built from affine layers and continuous piecewise-linear activations, or a
            :class:`PreparedModel` snapshot of one (then ``device`` is ignored).
        slice: The 2D slice of the (flattened) input space.
        input_shape: Per-sample input shape, e.g. ``(3, 16, 16)``; flat points are reshaped to it.
        max_regions: Raise :class:`TooManyRegionsError` rather than compute more regions than this.
        device: Where to compute; defaults to the device of the model's parameters.
        class_pair: For several outputs, restrict the decision boundary to the boundary between these two
            classes.
        seed: Seed of the processing order (the partition itself does not depend on it).
        max_memory: Bytes the computation may hold at once on the compute device. Regions are processed in
            chunks, depth first through the network, so that the working set stays within it; the default is
            a share of the free memory (:func:`splinecam_lightning.memory.default_budget`).

    Returns:
        A :class:`~splinecam_lightning.Partition` on the CPU.

    Raises:
        UnsupportedModelError: unsupported layer (named with its module path) or untraceable model.
        ValueError: NaN/Inf in the weights or slice, or ``input_shape`` not matching the slice.
        TooManyRegionsError: more than ``max_regions`` regions (raised before their maps are allocated).
        MemoryBudgetError: even one region's maps at some layer do not fit ``max_memory``, or the allocator
            failed; the message names the layer, the regions so far and the budget.
    """
    t0 = time.perf_counter()
    if not isinstance(slice, Slice):
        raise TypeError(f"slice must be a Slice, got {type(slice).__name__}")
    if max_regions < 1:
        raise ValueError(f"max_regions must be >= 1, got {max_regions}")
    prep = model if isinstance(model, PreparedModel) else prepare_model(model, input_shape=input_shape, device=device)
    if input_shape is None:
        input_shape = prep.input_shape
    gm, kinds, dev = prep.graph_module, prep.kinds, prep.device
    if max_memory is not None and max_memory < 1:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory}")
    budget = int(max_memory) if max_memory is not None else memory.default_budget(dev)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        shape = tuple(input_shape) if input_shape is not None else (slice.input_dim,)
        widths = None
        if math.prod(shape) == slice.input_dim:
            # One forward pass per input shape and snapshot, not per call (it is a fixed cost of every call).
            widths = prep.probed.get(shape)
            if widths is None:
                widths = prep.probed[shape] = _probe_shape(gm, shape, dev)
        it = _Interpreter(gm, kinds, slice, input_shape, dev, max_regions, gen, budget=budget, widths=widths)
        out = it.run()
        try:
            P = it.verts.shape[0]
            data = out.data.reshape(out.P, 3, -1)
            if data.shape[0] == 1 and P > 1:
                data = data.expand(P, -1, -1)
            jac = data[:, :2].transpose(1, 2).contiguous()  # (P, O, 2)
            # Back from domain-centred coordinates: y = J (uv - c) + b = J uv + (b - J c).
            off = data[:, 2] - jac @ it.centre
            seg, seg_r, seg_c = decision_boundary(
                it.verts, it.counts, jac, data[:, 2], it.extent, class_pair=class_pair
            )
            verts = it.verts + it.centre
            seg = seg + it.centre
        except Exception as e:
            if memory.is_allocation_failure(e):
                raise MemoryBudgetError(
                    f"the allocator failed assembling the result of {it.verts.shape[0]} regions (memory budget "
                    f"{_gib(budget)}): {e}"
                ) from None
            raise
    cpu = torch.device("cpu")
    return Partition(
        slice=slice,
        vertices=verts.to(cpu),
        counts=it.counts.to(cpu),
        jacobians=jac.to(cpu),
        offsets=off.to(cpu),
        codes={k: v.to(cpu) for k, v in it.codes.items()},
        boundary=seg.to(cpu),
        boundary_regions=seg_r.to(cpu),
        boundary_classes=seg_c.to(cpu),
        seconds=time.perf_counter() - t0,
    )
