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
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from splinecam_lightning import geometry, memory, ops
from splinecam_lightning.boundary import decision_boundary
from splinecam_lightning.errors import MemoryBudgetError, SplineCamWarning
from splinecam_lightning.ops import REGISTRY, OpRegistry, _Aff, _Comparison, _MaxResult, describe
from splinecam_lightning.partition import Partition
from splinecam_lightning.refine import LineFamily, TooManyRegionsError, WindowFamily, gather_units, refine, unit_bounds
from splinecam_lightning.slices import Slice
from splinecam_lightning.tracing import (
    UnsupportedModelError,
    classify_nodes,
    inplace_aliases,
    rng_kept,
    select_output,
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
        out = memory.empty((self.P, *self.data.shape[1:]), self.data)
        return _Aff(torch.index_select(self.data, 0, self.idx, out=out))


class _Codes:
    """Activation codes of the current regions, gathered only when read.

    A split re-indexes every earlier layer's codes; here it composes one row index per group of codes made at
    the same time instead of gathering them all (on a deep conv net, once per layer that splits)."""

    __slots__ = ("groups",)

    def __init__(self, groups: list | None = None) -> None:
        self.groups: list[tuple[torch.Tensor | None, dict[str, torch.Tensor]]] = groups or []

    def add(self, name: str, code: torch.Tensor) -> None:
        """Codes ``(P, ...)`` of the current regions (row ``p`` is region ``p``)."""
        if self.groups and self.groups[-1][0] is None:
            self.groups[-1][1][name] = code
        else:
            self.groups.append((None, {name: code}))

    def take(self, idx: torch.Tensor) -> _Codes:
        """The codes of current regions ``idx``."""
        return _Codes([(idx if rows is None else rows[idx], group) for rows, group in self.groups])

    def row_bytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for _, g in self.groups for t in g.values() if t.shape[0])

    def materialize(self) -> dict[str, torch.Tensor]:
        """Name -> codes of the current regions, in the order the layers ran; gathers each group once."""
        return {k: t if rows is None else t[rows] for rows, g in self.groups for k, t in g.items()}


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
    if isinstance(val, _Comparison):
        return _Comparison(_take(val.x, idx), val.x_node, val.t, val.above)
    if isinstance(val, (tuple, list)):
        return type(val)(_take(v, idx) for v in val)
    return val


def _materialize(val: Any) -> Any:
    if isinstance(val, (_Lazy, _Masked)):
        return val.materialize()
    if isinstance(val, _MaxResult):
        return _MaxResult(_materialize(val.values), val.indices)
    if isinstance(val, _Comparison):
        return _Comparison(_materialize(val.x), val.x_node, val.t, val.above)
    if isinstance(val, (tuple, list)) and any(isinstance(v, (_Lazy, _Masked, tuple, list)) for v in val):
        return type(val)(_materialize(v) for v in val)
    return val


def _per_region(val: Any) -> bool:
    if isinstance(val, _Comparison):
        val = val.x
    if isinstance(val, _Aff):
        return val.P > 1
    if isinstance(val, (_Lazy, _Masked)):
        return True
    if isinstance(val, (tuple, list)):
        return any(_per_region(v) for v in val)
    return False


def _unmaterialized(val: Any) -> bool:
    if isinstance(val, _Comparison):
        val = val.x
    if isinstance(val, (_Lazy, _Masked)):
        return True
    if isinstance(val, (tuple, list)):
        return any(_unmaterialized(v) for v in val)
    return False


class _RefineTooBig(Exception):
    """A refinement would make more regions than the memory budget holds at once; retry on fewer regions."""


def _bytes_text(n: float) -> str:
    """Bytes for a message, in GiB, or in MiB/KiB when smaller (a tiny budget must not read as 0.00 GiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


# Rows per block when expanding per-region maps: ~2**16 units (a 1.5 MB map block) stay in cache between
# being gathered, evaluated and picked from (a quarter faster than 16 MB blocks for max pooling).
def _rows_per_block(width: int) -> int:
    return max(1, (1 << 16) // max(1, width))


# Multiply-adds a Linear layer must save (regions sharing a parent x inputs x outputs) before it shares one
# product per parent: below this the bookkeeping costs more than it saves.
_SHARED_MIN_WORK = 1 << 24


def _table_plan(table: torch.Tensor) -> torch.Tensor | tuple[list[float], torch.dtype]:
    """How to look up ``table[code[p, f], f]``: by the piece values alone when every unit shares them (ReLU
    etc.), else by an integer gather from the table."""
    if bool((table == table[:, :1]).all()):
        return table[:, 0].tolist(), table.dtype
    return table


def _lookup(plan: torch.Tensor | tuple[list[float], torch.dtype], code: torch.Tensor) -> torch.Tensor:
    if isinstance(plan, torch.Tensor):
        return torch.gather(plan, 0, code.long())
    vals, dtype = plan
    out = code.to(dtype)
    if len(vals) == 2:
        return out * (vals[1] - vals[0]) + vals[0] if vals != [0.0, 1.0] else out
    res = torch.full_like(out, vals[0])
    for c in range(1, len(vals)):
        res = torch.where(code == c, vals[c], res)
    return res


class _Masked:
    """Output of a unit-wise CPWL node, kept factored: region ``p`` maps to
    ``mult[code[p]] * M[parent[p]] + const[code[p]]`` (the constant on the value row only).

    Materialising it costs ``(P, 3, F)`` memory; a following Linear layer consumes it chunk by chunk instead.
    """

    __slots__ = ("M", "parent", "code", "mult", "const", "feat", "ordered", "_plans", "_monotone")

    def __init__(self, M, parent, code, mult, const, feat, ordered: bool = False) -> None:
        self.M, self.parent, self.code, self.mult, self.const, self.feat = M, parent, code, mult, const, feat
        self.ordered = ordered  # parent is arange(len(M)): a block's maps are a slice of M, not a gather
        self._plans = None
        self._monotone: bool | None = None

    @property
    def P(self) -> int:
        return self.parent.shape[0]

    def monotone_source(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(parent, M)`` when every piece is nondecreasing (see :class:`refine.FactoredMaps`)."""
        if self._monotone is None:
            self._monotone = bool((self.mult >= 0).all())
        return (self.parent, self.M) if self._monotone else None

    def take(self, idx: torch.Tensor) -> _Masked:
        return _Masked(self.M, self.parent[idx], self.code[idx], self.mult, self.const, self.feat)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape ``(P, 3, F)`` of the maps once materialised."""
        return (self.P, 3, self.M.shape[2])

    def _tables(self) -> tuple:
        if self._plans is None:  # read the tables once, not once per block (each check syncs a device)
            self._plans = (_table_plan(self.mult), _table_plan(self.const) if bool(self.const.any()) else None)
        return self._plans

    def pieces(self, rows: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        code = self.code[rows]
        mult, const = self._tables()
        return _lookup(mult, code), (_lookup(const, code) if const is not None else None)

    def units(self, r: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Maps ``(m, 3, k)`` of units ``idx[i]`` (``(m, k)``) of region ``r[i]``."""
        F = self.M.shape[2]
        g = gather_units(self.M, self.parent[r], idx)
        # Flat gathers of codes and pieces: several times faster than indexing by (r, idx) pairs.
        piece = torch.take(self.code, r[:, None] * F + idx).long().mul_(F).add_(idx)  # (m, k) into (pieces, F)
        g = g * torch.take(self.mult, piece)[:, None, :]
        if self._tables()[1] is not None:
            g[:, 2] += torch.take(self.const, piece)
        return g

    def bounds(self, rows: slice | torch.Tensor, points: torch.Tensor, extent: torch.Tensor) -> tuple:
        """:func:`refine.unit_bounds` of regions ``rows``'s maps at ``points``, for the max-pooling pre-test."""
        if self.M.shape[0] > 1:
            return unit_bounds(self.rows(rows), points, extent)
        # One map for every region: its values are one small matmul and its bounds are per unit; each piece
        # scales them (|m| * hypot(a, b) = hypot(m a, m b); |m c + k| <= |m| |c| + |k|).
        mult, const = self.pieces(rows)
        _, grad, sc = unit_bounds(self.M, points[:1], extent)  # (1, F)
        s = torch.addmm(self.M[0, 2:3], points, self.M[0, :2]).mul_(mult)
        am = mult.abs()
        grad, sc = am * grad, am * sc
        if const is not None:
            s += const
            sc += const.abs()
        return s, grad, sc

    def rows(self, rows: slice | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Maps ``(n, 3, F)`` of regions ``rows``, without materialising the others."""
        mult, const = self.pieces(rows)
        if self.M.shape[0] == 1 or self.ordered:
            out = torch.mul(self.M if self.M.shape[0] == 1 else self.M[rows], mult[:, None, :], out=out)
        else:  # gather straight into the output and scale it there: one pass less than M[idx] * mult
            out = torch.index_select(self.M, 0, self.parent[rows], **({} if out is None else {"out": out}))
            out.mul_(mult[:, None, :])
        if const is not None:
            out[:, 2] += const
        return out

    def materialize(self) -> _Aff:
        # Blocks of ~2**18 elements: each one stays in cache between its gather and its scaling.
        step = max(1, (1 << 18) // (3 * self.M.shape[2]))
        data = memory.empty((self.P, 3, self.M.shape[2]), self.M)
        for i in range(0, self.P, step):
            self.rows(slice(i, i + step), out=data[i : i + step])
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
        out = memory.empty((self.P, 3, O), self.M)
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
        out = memory.empty((self.P, 3, O), self.M)
        # Blocks of ~2**16 elements: each block's input maps stay in cache between being built and multiplied.
        step = max(1, (1 << 16) // (3 * max(Fi, O)))
        WT = W.T
        for i in range(0, self.P, step):
            x = self.rows(slice(i, i + step))
            torch.mm(x.view(-1, Fi), WT, out=out[i : i + step].view(-1, O))
        return out

    def _linear_from_parents(self, W: torch.Tensor, b: torch.Tensor | None) -> _Aff:
        O, Fi = W.shape

        def dense(sub: _Masked) -> torch.Tensor:
            out = sub._dense_linear(W)
            if b is not None:
                out[:, 2] += b
            return out

        def correct(out: torch.Tensor, pi: torch.Tensor, fi: torch.Tensor, v: torch.Tensor) -> None:
            flat = out.view(out.shape[0], 3 * O)
            step = max(1, (1 << 21) // (3 * O))
            for i in range(0, pi.shape[0], step):
                s = slice(i, i + step)
                flat.index_add_(0, pi[s], (v[s, :, None] * W.T[fi[s]][:, None, :]).reshape(-1, 3 * O))

        out = self.by_parents(dense, correct, sibling_work=3 * Fi * O, unit_work=3 * O)
        return _Aff(dense(self) if out is None else out)

    def by_parents(
        self, dense, correct, sibling_work: int, unit_work: int, min_shared: float = 0.25
    ) -> torch.Tensor | None:
        """A linear layer on per-region input maps, sharing work between regions made from one parent.

        Such regions differ only in the few units whose breakpoint crosses the parent, so ``dense`` (maps of a
        :class:`_Masked` -> layer output, bias included) runs on one reference region per parent and
        ``correct(out, pi, fi, v)`` adds the layer's response to input row ``v`` (``(n, 3)``) at unit ``fi``
        to region ``pi``. ``sibling_work`` and ``unit_work`` are the multiply-adds of one dense region and of
        one unit's correction. Returns ``None`` (do it densely) when sharing would not save work, or when fewer
        than ``min_shared`` of the regions share a parent with another (the bookkeeping is not free).
        """
        P, R = self.P, self.M.shape[0]
        if R == 1:
            return None
        dev = self.parent.device
        first = torch.full((R,), P, dtype=torch.long, device=dev)
        first.scatter_reduce_(0, self.parent, torch.arange(P, device=dev), "amin")
        used = torch.nonzero(first < P)[:, 0]
        saved = (P - used.shape[0]) * sibling_work
        if P - used.shape[0] < min_shared * P or saved < _SHARED_MIN_WORK:
            return None
        rc = first[self.parent]
        pi, fi = torch.nonzero(self.code != self.code[rc], as_tuple=True)
        if pi.shape[0] * unit_work >= saved:
            return None
        ref = first[used]  # the reference region of every parent in use
        base = dense(_Masked(self.M, used, self.code[ref], self.mult, self.const, self.feat, used.shape[0] == R))
        slot = torch.empty(R, dtype=torch.long, device=dev)
        slot[used] = torch.arange(used.shape[0], device=dev)
        out = torch.index_select(base, 0, slot[self.parent], out=memory.empty((P, *base.shape[1:]), base))
        if pi.numel():
            cp, cr = self.code[pi, fi].long(), self.code[rc[pi], fi].long()
            v = self.M[self.parent[pi], :, fi] * (self.mult[cp, fi] - self.mult[cr, fi])[:, None]  # (n, 3)
            v[:, 2] += self.const[cp, fi] - self.const[cr, fi]
            correct(out, pi, fi, v)
        return out


def _private_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """Deep copy in float64 eval mode on ``device``; the caller's module is never touched."""
    memo: dict[int, Any] = {}
    trainer = getattr(model, "_trainer", None)  # a LightningModule must not drag its Trainer along
    if trainer is not None:
        memo[id(trainer)] = None
    for mod in model.modules():
        for v in vars(mod).values():  # a weight computed by a hook (old-style weight_norm) has a grad_fn
            if isinstance(v, torch.Tensor) and not v.is_leaf:
                memo[id(v)] = v.detach().clone()
    try:
        m = copy.deepcopy(model, dict(memo))
    except Exception as e:  # noqa: BLE001  (an attribute that cannot be copied: a lock, a file, a run handle)
        m = _copy_sharing_attributes(model, memo, e)
    m = _without_compile_wrappers(m)
    dropped = _drop_user_hooks(m)
    if dropped:
        warnings.warn(
            f"the model's forward hooks on {', '.join(repr(n) for n in dropped[:5])}"
            f"{' ...' if len(dropped) > 5 else ''} are not run on the copy SplineCam partitions (a hook that "
            "changes a module's output is not part of the partition; fold it into the module's forward instead)",
            SplineCamWarning,
            stacklevel=3,
        )
    m = m.to(device=device, dtype=torch.float64)
    m.eval()
    m.requires_grad_(False)
    refresh_hooked_weights(m)
    return m


def _drop_user_hooks(m: nn.Module) -> list[str]:
    """Remove the forward and backward hooks the copy shares with the caller's modules (logging hooks that
    record activations, call ``.item()``: tracing would feed them proxies, and their closures are the caller's
    state). The hooks that compute weights stay (:func:`_weight_hook_types`). Returns the paths of the modules
    that had forward hooks (which could have changed an output)."""
    keep = _weight_hook_types()
    dropped = []
    for path, mod in m.named_modules():
        user_pre = [k for k, h in mod._forward_pre_hooks.items() if not isinstance(h, keep)]
        if mod._forward_hooks or user_pre:
            dropped.append(path or "(the model)")
        for name in (
            "_forward_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_forward_pre_hooks_with_kwargs",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            hooks = getattr(mod, name, None)
            if hooks:
                hooks.clear()
        for key in user_pre:
            del mod._forward_pre_hooks[key]
    return dropped


def _weight_hook_types() -> tuple[type, ...]:
    """Forward pre-hooks that compute a module's weights: ``weight_norm``, ``spectral_norm``, pruning masks."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return (WeightNorm, SpectralNorm, BasePruningMethod)


def _without_compile_wrappers(m: nn.Module) -> nn.Module:
    """``m`` with every ``torch.compile`` wrapper (itself or a submodule) replaced by the module it wraps, which fx
    can trace (weights keep their names but for the ``_orig_mod.`` part; see ``worker.WeightLayout``)."""
    if type(m).__name__ == "OptimizedModule" and isinstance(getattr(m, "_orig_mod", None), nn.Module):
        return _without_compile_wrappers(m._orig_mod)
    for name, child in list(m.named_children()):
        inner = _without_compile_wrappers(child)
        if inner is not child:
            setattr(m, name, inner)
    return m


def _copy_sharing_attributes(model: nn.Module, memo: dict[int, Any], error: Exception) -> nn.Module:
    """Deep copy of the modules, parameters and buffers that shares the modules' other public attributes (a
    logger's run, a lock, an open file: what ``forward`` does not compute with) with the caller's model."""
    memo = dict(memo)
    for mod in model.modules():
        for key, v in vars(mod).items():
            if not key.startswith("_") and not isinstance(v, (torch.Tensor, nn.Module)):
                memo[id(v)] = v
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001
        raise UnsupportedModelError(
            f"cannot copy {type(model).__name__} to work on a private copy: {type(error).__name__}: {error}"
        ) from error


def refresh_hooked_weights(m: nn.Module) -> None:
    """Weights that ``torch.nn.utils.weight_norm``/``spectral_norm``/pruning compute in a forward pre-hook are
    plain attributes: stale after an optimizer step until the next forward, and not converted by ``.to``.
    Recompute them as the model's next forward would (eval mode: no power iteration)."""
    keep = _weight_hook_types()
    with torch.no_grad():
        for mod in m.modules():
            for hook in list(mod._forward_pre_hooks.values()):
                if isinstance(hook, keep):
                    hook(mod, None)


def _reject_script(model: nn.Module) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a TorchScript module, which torch.fx cannot trace; pass the original "
            "nn.Module (or a torch.save'd one)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a wrapper that splits batches across devices; pass the network it wraps, "
            "`model.module`"
        )


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


def check_model(model: nn.Module, input_shape: Sequence[int] | None = None, output: int | str | None = None) -> None:
    """Check that ``model`` can be partitioned, without computing anything.

    Traces a private copy and classifies every operation; if ``input_shape`` is given, also runs a single
    sample through the copy to check shapes.

    Raises:
        UnsupportedModelError: a layer or operation is not affine/piecewise linear (named with its path),
            or the model cannot be traced.
        ValueError: NaN or Inf in the weights, or ``output`` names no output.
    """
    prepare_model(model, input_shape=input_shape, output=output)


class _Interpreter:
    """Evaluates the traced graph on affine maps, refining the regions at every piecewise-linear node.

    The state is the current regions (``verts``, ``counts``), the live values (``env``) and the activation
    codes so far. Regions are independent once made, so when the next node would not fit the memory budget
    the state is cut into chunks of regions and each chunk runs through the rest of the graph on its own
    (depth first); per-region values are gathered lazily, so a chunk only ever holds its own regions' maps.

    Each computing node is evaluated by its op's rule from the registry (:mod:`splinecam_lightning.ops`, which
    also says why this is not a :class:`torch.fx.Interpreter`); the rules refine through :meth:`_scalar_cpwl`
    and :meth:`_max_windows`.
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
        registry: OpRegistry = REGISTRY,
        keep_codes: bool = True,
    ) -> None:
        self.gm = gm
        # Without codes the result is each region's polygon and maps only: a conv net's codes are most of it
        # (one int8 per unit and region).
        self.keep_codes = keep_codes
        self.code_names: dict[fx.Node, str] = {}  # set by run(): keys of modules called more than once
        self.kinds = kinds
        self.registry = registry
        # (op, target) of every computing node, looked up in run(); the op's rule evaluates the node.
        self._ops: dict[fx.Node, tuple] = {}
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
        self._codes = _Codes()  # while running; run() leaves them gathered in ``codes``
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
        cls,
        gm,
        kinds,
        slices: Sequence[Slice],
        input_shape,
        device,
        max_regions,
        generator,
        budget=None,
        widths=None,
        registry: OpRegistry = REGISTRY,
    ) -> _Interpreter:
        """Several partitions in one pass (used by :mod:`splinecam_lightning.local`): one initial region per
        slice, each with its own input map (``P = N``) and its own centred, scaled coordinates.

        Slice ``i``'s coordinates are ``(uv - centre[i]) / scale[i]``, where ``scale[i]`` makes its extent the
        first slice's: tolerances are relative to the extent, so every slice keeps exactly its own (the scale is
        1 when extents agree). Each region's slice index travels with the codes, as ``codes[ROOT_CODE]``, so
        refinement and chunking keep it per region.
        """
        it = cls(
            gm,
            kinds,
            slices[0],
            input_shape,
            device,
            max_regions,
            generator,
            budget=budget,
            widths=widths,
            registry=registry,
        )
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
        it._codes.add(ROOT_CODE, torch.arange(len(slices), device=device))
        return it

    # ------------------------------------------------------------------ memory
    def _held(self) -> int:
        return (
            memory.held_bytes(self.verts, self.counts, self.env, self._codes, self.input, self._stack)
            + self._result_bytes
        )

    def _where(self) -> str:
        node = self._node
        return describe(node, self.gm) if node is not None else "the input"

    def _so_far(self) -> int:
        return self._done + self._pending + int(self.verts.shape[0])

    def _budget_error(self, what: str) -> MemoryBudgetError:
        return MemoryBudgetError(
            f"{what} at {self._where()} ({self._so_far()} regions so far, memory budget {_bytes_text(self.budget)}, "
            f"{_bytes_text(self._held())} held); raise max_memory, free memory or use a smaller slice"
        )

    def _node_bytes(self, node: fx.Node) -> tuple[int, bool]:
        """Estimated bytes to run ``node``: per region if its inputs are per-region, else once."""
        per_region = False
        width = self.widths.get(node, 0)
        fused = self._fusable(node)
        if fused is not None and isinstance(fused[1], nn.Linear):
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
        codes = self._codes.row_bytes()
        lazies = 8 * sum(1 for v in self.env.values() if _per_region(v))
        inp = sum(self.widths.get(i, 0) for i in node.all_input_nodes)
        op, _ = self._ops.get(node, (None, None))
        if op is not None and op.windows:  # max pooling gathers every child's output maps at once
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
            self._codes = self._codes.take(parent)
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
        if self.keep_codes:
            self._codes.add(name, code)
        mult = torch.as_tensor(mult, dtype=M.dtype, device=M.device)  # (pieces, F) or (pieces, 1)
        const = torch.as_tensor(const, dtype=M.dtype, device=M.device)
        mult = mult.reshape(mult.shape[0], -1).expand(-1, M.shape[2]).contiguous()
        const = const.reshape(const.shape[0], -1).expand(-1, M.shape[2]).contiguous()
        return _Masked(M, parent, code, mult, const, feat)

    def _max_windows(self, name: str, x: _Aff | _Masked, windows: torch.Tensor, out_feat: tuple[int, ...]) -> _Aff:
        """Max over windows of units of ``x``'s maps; a unit-wise activation's output (``_Masked``) is read
        factored, its maps never materialised whole."""
        if bool((windows < 0).all(1).any()):
            raise UnsupportedModelError(
                f"{self._where()} has a window with no member inside its input (all padding, where torch gives -inf)"
            )
        M = x if isinstance(x, _Masked) else x.data.reshape(x.P, 3, -1)
        fam = WindowFamily(M, windows, self.extent)
        parent = self._refine(fam)
        pts = geometry.vertex_means(self.verts, self.counts)
        P, W = len(parent), windows.shape[0]
        out = memory.empty((P, 3, W), x.M if isinstance(x, _Masked) else M)
        codes = []
        # Block by block, each region's (3, F) map is gathered once: its values at the region's interior point
        # give the argmax codes, and the chosen units' rows are the output.
        step = _rows_per_block(M.shape[2])
        for i in range(0, P, step):
            rows = slice(i, i + step)
            Mr = fam.rows(parent[rows])
            p = pts[rows]
            code = fam.codes_of_values(geometry.affine_values(Mr[:, 0], Mr[:, 1], Mr[:, 2], p[:, 0:1], p[:, 1:2]))
            codes.append(code)
            chosen = torch.gather(windows.expand(len(code), -1, -1), 2, code.long()[..., None])  # (n, W, 1)
            torch.gather(Mr, 2, chosen.permute(0, 2, 1).expand(-1, 3, -1), out=out[rows])
        code = torch.cat(codes) if codes else torch.zeros(0, W, dtype=torch.int8, device=M.device)
        if self.keep_codes:
            self._codes.add(name, code)  # (P, W)
        return _Aff(out.reshape(P, 3, *out_feat))

    # ------------------------------------------------------------------ node handlers
    def _unwrap(self, a):
        return fx.node.map_arg(a, self._get)

    def _get(self, n: fx.Node):
        val = self.env[n]
        if _unmaterialized(val):
            val = self.env[n] = _materialize(val)
        return val

    def _masked_input(self, node: fx.Node) -> _Masked | None:
        """``node``'s first argument when it is a unit-wise activation's factored maps."""
        x = self.env.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        return x if isinstance(x, _Masked) else None

    def _fusable(self, node: fx.Node) -> tuple[_Masked, nn.Module] | None:
        """``(input, layer)`` when ``node`` is a Linear layer, or a convolution that can share work between
        sibling regions, fed by a unit-wise activation's factored maps."""
        x = self._masked_input(node) if node.op == "call_module" else None
        if x is None:
            return None
        m = self.gm.get_submodule(node.target)
        if isinstance(m, nn.Linear) and len(x.feat) == 1:
            return x, m
        if ops.conv_by_units(m) and x.M.shape[0] > 1 and len(x.feat) == m.weight.dim() - 1:
            return x, m
        return None

    def _fused(self, node: fx.Node) -> _Aff | None:
        """A Linear layer or convolution fed by a unit-wise activation, on its factored maps; ``None`` where
        the layer's own rule should run instead."""
        xm = self._fusable(node)
        if xm is None:
            return None
        x, m = xm
        if isinstance(m, nn.Linear):
            return x.linear(m.weight, m.bias)
        kernel = m.weight[0, 0].numel()

        def dense(sub: _Masked) -> torch.Tensor:
            op, target = self._ops[node]
            return op.rule(self, node, target, (sub.materialize(),), {}).data

        out = x.by_parents(
            dense,
            lambda out, pi, fi, v: ops.conv_add_units(out, pi, fi, v, m, x.feat),
            sibling_work=3 * (self.widths.get(node) or x.M.shape[2]) * m.weight.shape[1] * kernel,
            # A scattered multiply-add costs several times one in the convolution's matrix product.
            unit_work=8 * 3 * (m.weight.shape[0] // m.groups) * kernel,
            min_shared=0.0,  # a region's convolution costs far more than its bookkeeping
        )
        return None if out is None else _Aff(out)

    def run(self) -> _Aff:
        """Run the graph; afterwards ``verts``, ``counts`` and ``codes`` describe the final regions."""
        self._nodes = list(self.gm.graph.nodes)
        self._last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(self._nodes):
            for inp in n.all_input_nodes:
                self._last_use[inp] = i
        self._ops = {}
        for n in self._nodes:
            if self.kinds.get(n) == "constant":
                self._ops[n] = ops.CONSTANT, self.gm.get_submodule(n.target) if n.op == "call_module" else n.target
            elif self.kinds.get(n) not in ("placeholder", "get_attr", "output"):
                op, target = self.registry.lookup(n, self.gm)
                if op is None:  # classified with another registry
                    raise UnsupportedModelError(f"unsupported operation {describe(n, self.gm)}")
                self._ops[n] = op, target
        # Codes are keyed by module path; a module called more than once gets one key per call, in call order.
        calls: dict[str, list[fx.Node]] = {}
        for n in self._nodes:
            if n.op == "call_module":
                calls.setdefault(n.target, []).append(n)
        self.code_names = {n: f"{t}:{i}" for t, ns in calls.items() if len(ns) > 1 for i, n in enumerate(ns)}
        self._aliases = inplace_aliases(self.gm)  # in-place nodes and the tensors they change
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
                        f"the model must return a single tensor that depends on its input, got "
                        f"{type(result).__name__}"
                        + ("; pass output= to choose one" if isinstance(result, tuple) else "")
                    )
                return self.verts, self.counts, result, self._codes.materialize()
            else:
                R = int(self.verts.shape[0])
                need, per_region = self._node_bytes(node)
                avail = self.budget - self._held()
                if need > avail:
                    raise self._budget_error(f"one region needs ~{_bytes_text(need)}, more than is left of the budget")
                if per_region and R > 1 and R * need > min(avail, WORK_BYTES):
                    return self._split(i, max(1, min(avail, WORK_BYTES) // need))
                try:
                    val = self._fused(node)
                    if val is None:
                        op, target = self._ops[node]
                        x = self._masked_input(node) if op.factored else None
                        if x is not None:  # read factored, never materialised whole
                            args = (x, *self._unwrap(tuple(node.args[1:])))
                        else:
                            args = self._unwrap(node.args)
                        kwargs = self._unwrap(node.kwargs)
                        if x is None and ops.constant_call(node, args, kwargs):
                            val = ops._python(node, target, args, kwargs)
                        else:
                            val = op.rule(self, node, target, args, kwargs)
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
            for alias in self._aliases.get(node, ()):  # later uses of the changed tensor read the result
                if alias in self.env:
                    self.env[alias] = val
            for inp in node.all_input_nodes:
                if self._last_use.get(inp) == i:
                    self.env.pop(inp, None)
        raise UnsupportedModelError("the traced graph has no output")

    def _split(self, start: int, size: int) -> tuple:
        """Run nodes ``start..`` on chunks of ``size`` current regions, one after the other; merge the results."""
        verts, counts, env, codes = self.verts, self.counts, self.env, self._codes
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
                self._codes = codes.take(idx)
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
        self.verts, self.counts, self._codes, self.env = out_v, out_c, _Codes([(None, out_codes)]), {}
        return out_v, out_c, _Aff(data), out_codes


class _WidthRecorder(fx.Interpreter):
    """Runs one sample and records every node's output size per sample (its number of features)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.widths: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        cast = n.op == "call_method" and n.target in ops.CASTS
        if cast and isinstance(out, torch.Tensor) and out.is_floating_point():
            out = out.to(torch.float64)  # as the engine does: `x.float()` in a forward keeps the copy in float64
        ts: list[torch.Tensor] = []
        memory._tensors(out, ts)
        self.widths[n] = sum(t.numel() for t in ts if t.is_floating_point())
        return out


def _probe_shape(gm: fx.GraphModule, shape: tuple[int, ...], device: torch.device) -> dict[fx.Node, int]:
    """One real forward pass on a single sample, so shape mismatches fail with a clear message; returns the
    per-sample width of every node (for memory estimates)."""
    rec = _WidthRecorder(gm)
    try:
        with rng_kept():  # a forward that draws (F.dropout left in training mode) must not move the user's RNG
            rec.run(torch.zeros(1, *shape, dtype=torch.float64, device=device))
    except Exception as e:
        if memory.is_allocation_failure(e):
            raise MemoryBudgetError(
                f"one forward pass on a single sample of shape {tuple(shape)} failed to allocate: {e}"
            ) from None
        if "Double" in str(e) and ("Float" in str(e) or "Half" in str(e) or "BFloat16" in str(e)):
            raise UnsupportedModelError(
                "a float64 forward pass of the model's private copy mixes float64 with another floating dtype, "
                "probably a tensor created inside forward with a fixed dtype: create it with dtype=x.dtype (or "
                f"register it as a buffer). {type(e).__name__}: {e}"
            ) from None
        first = str(e).split("\n\n")[0]  # without fx's "While executing ..." and traceback hints
        raise ValueError(
            f"the model cannot take inputs of per-sample shape {tuple(shape)} ({math.prod(shape)} values per "
            f"sample); pass input_shape= as the model expects it, and slices of that many dimensions. "
            f"{type(e).__name__}: {first}"
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
    output: int | str | None = None  # the value chosen among those the forward returns (select_output)
    # Node widths from the forward pass on each input shape probed so far, so repeated calls skip it.
    probed: dict = field(default_factory=dict, repr=False, compare=False)


def _fold_batchnorm(gm: fx.GraphModule) -> bool:
    """Fold every BatchNorm (eval mode, running statistics) that is the only user of a convolution into that
    convolution's weights, as inference compilers do: the per-region maps then pass through one affine layer
    instead of two. The folded weights equal the composition up to float64 rounding. Returns whether the graph
    changed."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        bn, conv = gm.get_submodule(node.target), gm.get_submodule(prev.target)
        if not (
            type(conv) in _FOLDABLE_CONV
            and type(bn) is _FOLDABLE_CONV[type(conv)]
            and bn.running_mean is not None
            and bn.running_var is not None
            and calls[prev.target] == 1  # a convolution called twice keeps its own weights
            and prev.kwargs == {}
        ):
            continue
        gm.add_submodule(prev.target, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return changed


_FOLDABLE_CONV = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def prepare_model(
    model: nn.Module,
    *,
    input_shape: Sequence[int] | None = None,
    device: Any = None,
    output: int | str | None = None,
) -> PreparedModel:
    """Snapshot ``model`` for partitioning: copy (float64, eval, on ``device``), trace and classify it.

    The caller's module is not modified. Raises the same errors as :func:`compute_partition` for the model.
    ``output`` chooses one of the values a forward returns (see :func:`compute_partition`).
    """
    _reject_script(model)
    _check_finite(model)
    dev = _resolve_device(model, device)
    gm = trace_model(_private_copy(model, dev))
    select_output(gm, output)  # before classifying: what only other outputs use need not be supported
    try:
        kinds = classify_nodes(gm)  # an unsupported node fails here, before anything changes
    except UnsupportedModelError:
        # Again with each node's line of code, so the error names where an unsupported function is called.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SplineCamWarning)
            gm = trace_model(_private_copy(model, dev), stack_traces=True)
        select_output(gm, output)
        classify_nodes(gm)
        raise
    if _fold_batchnorm(gm):
        kinds = classify_nodes(gm)
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    if shape is not None:
        with torch.no_grad():
            _probe_shape(gm, shape, dev)
    return PreparedModel(gm, kinds, dev, shape, output)


def _prepared(model: nn.Module | PreparedModel, input_shape, device, output) -> PreparedModel:
    """``model`` itself when prepared already, else :func:`prepare_model` of it."""
    if not isinstance(model, PreparedModel):
        return prepare_model(model, input_shape=input_shape, device=device, output=output)
    if output is not None and output != model.output:
        raise ValueError(
            f"output={output!r} differs from the output={model.output!r} the PreparedModel was made with; pass "
            "output= to prepare_model instead"
        )
    return model


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
    codes: bool = True,
    output: int | str | None = None,
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
        codes: Keep every region's activation code of every nonlinear node (``Partition.codes``). Codes take
            one byte per unit and region, most of a large conv net's result (~0.7 MB per region for VGG11 at
            64x64); ``False`` leaves them out, and the partition is otherwise the same.
        output: For a forward that returns a tuple, list or dict (``return logits, features``): the index or
            key of the value to partition. Only what that value depends on is computed (and must be supported).
            Given with a :class:`PreparedModel`, it must be the one it was prepared with (``prepare_model(...,
            output=...)``).

    Returns:
        A :class:`~splinecam_lightning.Partition` on the CPU.

    Raises:
        UnsupportedModelError: unsupported layer (named with its module path) or untraceable model.
        ValueError: NaN/Inf in the weights or slice, ``input_shape`` not matching the slice, or ``output``
            naming no output.
        TooManyRegionsError: more than ``max_regions`` regions (raised before their maps are allocated).
        MemoryBudgetError: even one region's maps at some layer do not fit ``max_memory``, or the allocator
            failed; the message names the layer, the regions so far and the budget.
    """
    t0 = time.perf_counter()
    if not isinstance(slice, Slice):
        raise TypeError(f"slice must be a Slice, got {type(slice).__name__}")
    if max_regions < 1:
        raise ValueError(f"max_regions must be >= 1, got {max_regions}")
    prep = _prepared(model, input_shape, device, output)
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
        it = _Interpreter(
            gm, kinds, slice, input_shape, dev, max_regions, gen, budget=budget, widths=widths, keep_codes=codes
        )
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
                    f"{_bytes_text(budget)}): {e}"
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
