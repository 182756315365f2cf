"""The op registry: every supported operation, registered once with its kind and its interpreter rule.

An op is a module type (matched along the instance's MRO, most specific first), a function (matched by identity)
or a tensor method (matched by name). :func:`splinecam_lightning.tracing.classify_nodes` reads an op's *kind*
from :data:`REGISTRY` to classify every node before any computation (so an unsupported one fails first), and
the engine's interpreter reads its *rule* from the same entry to evaluate the node. Adding an op is one
:meth:`OpRegistry.register` call; a module type registered from outside ``torch.nn`` (such as
:class:`~splinecam_lightning.layers.Maxout`) is also kept as a leaf when tracing.

Kinds: ``linear`` (linear in the input: no bias term), ``affine`` (with a bias-like term), ``arith`` (``+ - * /``
with constants, and integer arithmetic on shapes such as ``x.shape[1] // 2``), ``cpwl`` (continuous piecewise
linear: refines the regions) and ``output_transform`` (a monotone Softmax/LogSoftmax/Sigmoid, allowed only as
the final output, where it is skipped).

A rule is ``rule(it, node, target, args, kwargs)``: ``it`` is the engine's interpreter, ``node`` the fx node,
``target`` the module instance (``call_module``), function (``call_function``) or method name (``call_method``), and
``args``/``kwargs`` the node's arguments with every input-dependent tensor given as :class:`_Aff` maps (other
arguments are plain values). It returns the node's value. Rules of piecewise-linear ops refine the regions
through the interpreter's primitives ``it._scalar_cpwl`` (unit-wise breakpoints) and ``it._max_windows`` (max
over windows of units); they may also read ``it.gm`` (the traced module) and ``it.dev`` (the device).

The interpreter does not subclass :class:`torch.fx.Interpreter`: its driver loop is the scheduler of the memory
budget. Before each node it estimates the node's bytes and may cut the current regions into chunks, each of
which runs the *rest* of the graph from that node on, depth first, with its own slice of the environment, and
the chunks' results are merged. ``fx.Interpreter.run`` walks the graph from its first node: resuming a chunk at
node ``i`` would mean pre-filling ``initial_env`` with a stand-in for every earlier node (values already freed
are gone), and handing a merged result back from the middle of the graph would need an exception. Its
``call_module``/``call_function``/``call_method`` hooks get ``(target, args, kwargs)`` but not the node, which
the rules need for error messages and code names. What would be left to inherit is argument fetching and a
dispatch on ``node.op``. (:class:`torch.fx.Interpreter` is used where it fits: the one real forward pass that
records node widths.)

Pure core: no Lightning imports.
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.utils.weak import WeakIdKeyDictionary

from splinecam_lightning import memory
from splinecam_lightning.errors import UnsupportedModelError
from splinecam_lightning.layers import Maxout

__all__ = ["KINDS", "Op", "OpRegistry", "REGISTRY", "describe"]

KINDS = ("linear", "affine", "arith", "cpwl", "output_transform")

Rule = Callable[..., Any]


@dataclass(frozen=True)
class Op:
    """One supported operation: its kind and how the interpreter evaluates it on affine maps."""

    kind: str
    rule: Rule
    # Refines by the max over windows of units (max pooling, maxout, amax, maximum): each new region gathers
    # its output maps at once, which the engine's memory estimate counts.
    windows: bool = False
    # Module ops only: which instances are supported (e.g. BatchNorm only with running statistics).
    accepts: Callable[[nn.Module], bool] | None = None
    # The rule takes a unit-wise activation's factored maps (``_Masked``) as its first argument as they are
    # (max pooling reads only each region's rows and window members of them).
    factored: bool = False


class OpRegistry:
    """Supported ops by module type, function and method name."""

    def __init__(self) -> None:
        self.modules: dict[type, Op] = {}
        self.functions: dict[Any, Op] = {}
        self.methods: dict[str, Op] = {}

    def copy(self) -> OpRegistry:
        new = OpRegistry()
        new.modules, new.functions, new.methods = dict(self.modules), dict(self.functions), dict(self.methods)
        return new

    def register(
        self,
        *targets: Any,
        kind: str,
        rule: Rule | None = None,
        windows: bool = False,
        accepts: Callable[[nn.Module], bool] | None = None,
        factored: bool = False,
    ):
        """Register ``targets`` (module types, functions and method names) as one op.

        Used directly with ``rule=``, or as a decorator of the rule. A target may be registered only once.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown op kind {kind!r}; one of {KINDS}")

        entries = []
        for t in targets:
            if isinstance(t, str):
                table = self.methods
            elif isinstance(t, type) and issubclass(t, nn.Module):
                table = self.modules
            elif callable(t):
                table = self.functions
            else:
                raise TypeError(f"cannot register {t!r}: not a module type, function or method name")
            if t in table or any(t is e for _, e in entries):
                raise ValueError(f"{getattr(t, '__name__', t)!r} is already registered")
            if accepts is not None and table is not self.modules:
                raise TypeError("accepts= applies to module types only")
            entries.append((table, t))

        def add(fn: Rule) -> Rule:
            op = Op(kind, fn, windows, accepts, factored)
            for table, t in entries:
                table[t] = op
            return fn

        return add if rule is None else add(rule)

    def module_op(self, m: nn.Module) -> Op | None:
        """The op of module ``m``: that of the most specific registered type along its MRO, if it accepts ``m``."""
        for cls in type(m).__mro__:
            op = self.modules.get(cls)
            if op is not None:
                return op if op.accepts is None or op.accepts(m) else None
        return None

    def lookup(self, node: fx.Node, gm: fx.GraphModule) -> tuple[Op | None, Any]:
        """``(op, target)`` of a ``call_*`` node; ``op`` is ``None`` when the operation is not supported.

        ``target`` is what the op's rule receives: the module instance, the function or the method name.
        """
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            return self.module_op(m), m
        if node.op == "call_function":
            return self.functions.get(node.target), node.target
        if node.op == "call_method":
            return self.methods.get(node.target), node.target
        return None, node.target

    def is_leaf(self, m: nn.Module) -> bool:
        """Registered module types from outside ``torch.nn`` are traced as leaves, like torch's own layers."""
        return any(
            isinstance(m, t) and not t.__module__.startswith("torch.nn")
            for t in self.modules  # a handful of types: no cache needed
        )


REGISTRY = OpRegistry()


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    """Human-readable name of a node: module type and path, function or method name."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        why = ""
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            why = " with track_running_stats=False (it normalises with batch statistics, not a fixed affine map)"
        return f"{type(m).__name__} at '{node.target}'{why}"
    where = _code_line(node)
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)} (node '{node.name}'{where})"
    return f"method .{node.target}() (node '{node.name}'{where})"


def _code_line(node: fx.Node) -> str:
    """``, file.py:12: <code>`` of the line that made ``node`` (where tracing recorded it), else ``""``."""
    trace = node.meta.get("stack_trace") or ""
    torch_dir = os.path.dirname(torch.__file__)
    found = re.findall(r'File "([^"]+)", line (\d+), in \S+(?:\n {4}(\S.*))?', trace)
    frames = [f for f in found if not f[0].startswith(torch_dir)]
    if not frames:
        return ""
    path, line, code = frames[-1]
    return f", {os.path.basename(path)}:{line}" + (f": {code.strip()}" if code else "")


# ---------------------------------------------------------------------------------------------- values
class _MaxResult(NamedTuple):
    """What ``torch.max(x, dim)`` or a max pooling with ``return_indices`` returns; indices are not tracked."""

    values: Any
    indices: Any


def _max_result(it, node: fx.Node, values: Any) -> _MaxResult:
    """``(values, indices)`` of ``node``, after checking that nothing reads the indices: integer positions of the
    maxima, not a continuous function of the input (unpooling by them, ``argmax``...)."""
    for user in node.users:
        ok = user.op == "call_function" and (
            (user.target is operator.getitem and (user.args[1] in (0, -2) or not user.users))  # `v, _ = ...`
            or (user.target is getattr and user.args[1] == "values")
        )
        if not ok:
            raise UnsupportedModelError(
                f"{describe(node, it.gm)}: node '{user}' reads the positions of the maxima (indices), which are not "
                "a continuous piecewise-linear function of the input; only the values can be used"
            )
    return _MaxResult(values, None)


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


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


# ---------------------------------------------------------------------------------------------- output transforms
@REGISTRY.register(
    nn.Softmax,
    nn.LogSoftmax,
    nn.Sigmoid,
    F.softmax,
    torch.softmax,
    F.log_softmax,
    torch.log_softmax,
    torch.sigmoid,
    F.sigmoid,
    "softmax",
    "log_softmax",
    "sigmoid",
    kind="output_transform",
)
def _skip(it, node, target, args, kwargs):
    """Monotone output transforms move neither the argmax nor the 0.5 level: a trailing one is skipped."""
    return args[0]


# ---------------------------------------------------------------------------------------------- linear
@REGISTRY.register(
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, kind="linear"
)
def _dropout(it, node, fn, args, kwargs):
    """The identity when not training. ``F.dropout``'s ``training`` defaults to True, so a forward that does not
    pass ``training=self.training`` drops units at random in eval mode too: no fixed map, refused."""
    default = fn not in (F.alpha_dropout, F.feature_alpha_dropout)
    if _arg(args, kwargs, 2, "training", default) and _arg(args, kwargs, 1, "p", 0.5) != 0:
        raise UnsupportedModelError(
            f"{describe(node, it.gm)} drops units at random even in eval mode (training=True"
            f"{', its default' if default and len(args) <= 2 and 'training' not in kwargs else ''}); pass "
            "training=self.training"
        )
    return args[0]


# Floating-point casts (``x.float()`` on an input, ``h.to(torch.float16)``): the maps stay float64, as does the
# private copy of the model.
CASTS = ("float", "double", "half", "bfloat16", "to", "type_as")


@REGISTRY.register(
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    *CASTS,
    "contiguous",
    "clone",
    "detach",
    torch.clone,
    kind="linear",
)
def _identity(it, node, target, args, kwargs):
    """Identity in eval mode (dropout), or a dtype/layout change the float64 maps do not need."""
    if target in CASTS and isinstance(args[0], _Aff):
        to = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, (torch.dtype, torch.Tensor))]
        dtype = None if not to else to[0] if isinstance(to[0], torch.dtype) else to[0].dtype
        if dtype is not None and not dtype.is_floating_point:
            raise UnsupportedModelError(f"{describe(node, it.gm)} casts an input-dependent tensor to {dtype}")
    if target == "contiguous" and isinstance(args[0], _Aff):  # a later .view() may need it
        return _Aff(args[0].data.contiguous())
    return args[0]


@REGISTRY.register(
    nn.Flatten,
    nn.Unflatten,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
    nn.Upsample,  # every interpolation mode is linear in the input
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
    nn.Unfold,  # sliding blocks as columns, and back (overlaps summed)
    nn.Fold,
    kind="linear",
)
def _linear_module(it, node, m, args, kwargs):
    """A linear module applied to all three rows of every map at once."""
    return _Aff.unflat(m(args[0].flat))


class _BatchSize(int):
    """The batch size read from an input-dependent tensor (``x.shape[0]``, ``x.size(0)``).

    The engine's batch holds three rows per region, and regions multiply as the graph runs, so a batch size
    read early (``B = x.shape[0]``) and used later (``h.view(B, -1)``) stands for the batch of the tensor it is
    used on, not for its value when read. Arithmetic on it gives a plain ``int``."""


def _mark_batch(out: Any, node: fx.Node, t: Any, args: tuple, kwargs: dict) -> Any:
    """``out`` of ``x.shape`` / ``x.size(...)`` with its batch entry marked as :class:`_BatchSize`."""
    if isinstance(out, torch.Size) and out:
        return torch.Size((_BatchSize(out[0]), *out[1:]))
    if isinstance(out, int) and t == "size":
        dim = _arg(args, kwargs, 1, "dim")
        if dim is not None and dim % args[0].flat.dim() == 0:
            return _BatchSize(out)
    return out


def _batch_in(a: Any) -> int | None:
    """The first :class:`_BatchSize` in ``a`` (also inside tuples, lists and dicts), else ``None``."""
    if isinstance(a, _BatchSize):
        return int(a)
    if isinstance(a, dict):
        a = list(a.values())
    if isinstance(a, (tuple, list)):  # torch.Size, and fx's immutable lists, are subclasses
        return next((n for n in map(_batch_in, a) if n is not None), None)
    return None


def _per_sample_constant(it, node: fx.Node, out: torch.Tensor, batch: int) -> _Aff:
    """A constant given the batch size as its first dimension (a class token ``t.expand(x.shape[0], -1, -1)``,
    ``t.repeat(x.shape[0], 1)``): the same value for every sample, so one constant map."""
    if out.dim() == 0 or out.shape[0] != batch or not torch.equal(out, out[:1].expand_as(out)):
        raise UnsupportedModelError(
            f"{describe(node, it.gm)} makes a tensor from the batch size that is not one constant per sample "
            "along its first dimension"
        )
    return _constant_map(out[0].to(torch.float64))


def _resolve_batch(a: Any, n: int) -> Any:
    """``a`` with every :class:`_BatchSize` in it (also inside tuples and lists) replaced by ``n``."""
    if isinstance(a, _BatchSize):
        return n
    if type(a) in (tuple, list, torch.Size):
        return type(a)(_resolve_batch(b, n) for b in a)
    return a


@REGISTRY.register(
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.mean,
    torch.sum,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    torch.flip,
    torch.roll,
    torch.narrow,
    torch.movedim,
    torch.swapaxes,
    torch.chunk,
    torch.split,
    torch.unbind,
    F.interpolate,
    F.pixel_shuffle,
    F.pixel_unshuffle,
    F.unfold,
    F.fold,
    getattr,
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
    "mean",
    "sum",
    "size",
    "dim",
    "flip",
    "roll",
    "narrow",
    "movedim",
    "swapaxes",
    "expand",
    "expand_as",
    "repeat",
    "view_as",
    "reshape_as",
    "chunk",
    "split",
    "unbind",
    "unfold",
    kind="linear",
)
def _linear(it, node, t, args, kwargs):
    """A linear function or method applied to all three rows; on constants (shapes, sizes) as Python would."""
    affs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, _Aff)]
    if not affs:
        out = getattr(args[0], t)(*args[1:], **kwargs) if node.op == "call_method" else t(*args, **kwargs)
        batch = _batch_in((args, kwargs))
        if isinstance(out, torch.Tensor) and batch is not None:
            return _per_sample_constant(it, node, out, batch)
        return out
    batch = affs[0].flat.shape[0]

    def sub(a):
        return a.flat if isinstance(a, _Aff) else _resolve_batch(a, batch)

    fargs = tuple(sub(a) for a in args)
    fkwargs = {k: sub(v) for k, v in kwargs.items()}
    out = getattr(fargs[0], t)(*fargs[1:], **fkwargs) if node.op == "call_method" else t(*fargs, **fkwargs)
    if node.op == "call_method" and not isinstance(args[0], _Aff) and isinstance(out, torch.Tensor):
        return _per_sample_constant(it, node, out, batch)  # a constant shaped like the input: c.expand_as(h)
    if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == fargs[0].shape[0]:
        return _Aff.unflat(out)
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        if any(o.dim() == 0 or o.shape[0] != fargs[0].shape[0] for o in out):
            raise UnsupportedModelError(f"{describe(node, it.gm)} splits the batch dimension")
        return type(out)(_Aff.unflat(o) for o in out)
    if isinstance(out, torch.Tensor):
        raise UnsupportedModelError(f"{describe(node, it.gm)} reduces over the batch dimension")
    return _mark_batch(out, node, t, args, kwargs)  # sizes, shapes, ints


@REGISTRY.register(operator.getitem, kind="linear")
def _getitem(it, node, t, args, kwargs):
    if isinstance(args[0], (tuple, list)):
        return args[0][args[1]]
    if isinstance(args[0], _Aff):
        idx = args[1] if isinstance(args[1], tuple) else (args[1],)
        if idx and not (isinstance(idx[0], slice) and idx[0] == slice(None)) and idx[0] is not Ellipsis:
            raise UnsupportedModelError(f"{describe(node, it.gm)} indexes the batch dimension")
    return _linear(it, node, t, args, kwargs)


@REGISTRY.register(torch.cat, torch.concat, torch.stack, kind="linear")
def _cat(it, node, t, args, kwargs):
    tensors = list(args[0])
    dim = _arg(args, kwargs, 1, "dim", 0)
    if dim == 0:
        raise UnsupportedModelError(f"{describe(node, it.gm)} concatenates along the batch dimension")
    if not all(isinstance(a, _Aff) for a in tensors):
        raise UnsupportedModelError(f"{describe(node, it.gm)} mixes input-dependent and constant tensors")
    P = max(a.P for a in tensors)
    flats = [a.data.expand(P, *a.data.shape[1:]).flatten(0, 1) for a in tensors]
    return _Aff.unflat((torch.stack if t is torch.stack else torch.cat)(flats, dim=dim))


def _pad_constant(x: _Aff, pad, value: float) -> _Aff:
    """Constant padding is affine: derivative rows pad with 0, the value row with ``value``."""
    d = x.data
    rows = F.pad(d[:, :2].flatten(0, 1), pad).unflatten(0, (d.shape[0], 2))
    val = F.pad(d[:, 2], pad, value=value)
    return _Aff(torch.cat([rows, val[:, None]], 1))


@REGISTRY.register(F.pad, kind="linear")
def _pad(it, node, t, args, kwargs):
    """Linear except for constant padding with a nonzero value, which is affine."""
    mode = _arg(args, kwargs, 2, "mode", "constant")
    value = _arg(args, kwargs, 3, "value", None)
    if mode == "constant" and value not in (None, 0, 0.0):
        return _pad_constant(args[0], _arg(args, kwargs, 1, "pad"), float(value))
    return _linear(it, node, t, args, kwargs)


# ---------------------------------------------------------------------------------------------- arithmetic
def _constants_only(args, kwargs) -> bool:
    return not any(isinstance(a, (_Aff, _Comparison)) for a in list(args) + list(kwargs.values()))


def _depends(a: Any) -> bool:
    if isinstance(a, (_Aff, _Comparison)):
        return True
    if isinstance(a, dict):
        a = list(a.values())
    return isinstance(a, (tuple, list)) and any(map(_depends, a))


# Random draws are never evaluated on the model's behalf: they would move the user's RNG and change per call.
_RANDOM = frozenset(
    "rand randn randint randperm rand_like randn_like randint_like bernoulli multinomial normal poisson "
    "dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout rrelu".split()
)


def draws_at_random(node: fx.Node) -> bool:
    """Whether ``node`` calls a random function or method (a module's own rule decides for modules)."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return name.lstrip("_") in _RANDOM


def constant_call(node: fx.Node, args: tuple, kwargs: dict) -> bool:
    """Whether a call's arguments hold nothing input-dependent and no batch size, and it draws nothing at random:
    it then computes a constant (e.g. ``F.relu(self.scale)`` inside ``forward``), evaluated by :func:`_python`.
    (``F.dropout(self.weight, p)`` goes to its rule: random in eval mode unless ``training=self.training``.)"""
    return not draws_at_random(node) and not _depends((args, kwargs)) and _batch_in((args, kwargs)) is None


def _python(node, t, args, kwargs):
    """Evaluate on constants as Python would (shape arithmetic such as ``x.shape[1] - 4``); a module's target is
    the module itself."""
    if node.op == "call_method":
        return getattr(args[0], t)(*args[1:], **kwargs)
    return t(*args, **kwargs)


# Not registered: the op of a node that :func:`~splinecam_lightning.tracing.classify_nodes` found independent of
# the input (kind ``constant``), whatever it calls.
CONSTANT = Op("constant", lambda it, node, t, args, kwargs: _python(node, t, args, kwargs))


@REGISTRY.register(
    operator.floordiv,  # shape arithmetic, e.g. ``x.shape[1] // 2``; refused on input-dependent tensors
    operator.mod,
    kind="arith",
)
def _shape_arith(it, node, t, args, kwargs):
    if _constants_only(args, kwargs):
        return _python(node, t, args, kwargs)
    raise UnsupportedModelError(f"{describe(node, it.gm)} on an input-dependent tensor is not affine")


def _broadcast_constant(x: _Aff, c: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``x``'s maps and the constant ``c`` broadcast together as torch broadcasts a per-sample tensor
    ``(N, *features)`` with ``c`` (which may make the features larger, never the batch)."""
    c = torch.as_tensor(c, dtype=x.data.dtype, device=x.data.device)
    feat = tuple(x.data.shape[2:])
    full = torch.broadcast_shapes((1, *feat), c.shape)
    if len(full) > len(feat) + 1 or full[0] != 1:
        raise UnsupportedModelError(f"a constant of shape {tuple(c.shape)} would change the batch dimension")
    out = x.data.expand(x.P, 3, *full[1:]).clone()
    return out, c


def _per_unit_constant(node, it, c: Any, feat: tuple[int, ...]) -> torch.Tensor:
    """Constant ``c`` as a float64 tensor of the per-sample shape ``feat`` (it may not enlarge it)."""
    c = torch.as_tensor(c, dtype=torch.float64, device=it.dev)
    if torch.broadcast_shapes((1, *feat), c.shape) != (1, *feat):
        raise UnsupportedModelError(
            f"{describe(node, it.gm)}: a constant of shape {tuple(c.shape)} would change "
            f"the shape {feat} of the tensor it applies to"
        )
    return torch.broadcast_to(c, (1, *feat)).reshape(feat)


def _constant_value(a: _Aff) -> torch.Tensor | None:
    """The per-sample value ``(1, *features)`` of a map that is the same constant for every sample, else ``None``."""
    if a.P == 1 and not bool(a.data[:, :2].any()):
        return a.data[:, 2]
    return None


def _product_operand(it, node, operands: list) -> int:
    """Index of the one input-dependent operand of a product (a constant made in ``forward`` counts as a
    constant); a product of two is not piecewise linear."""
    dep = [i for i, a in enumerate(operands) if isinstance(a, _Aff) and _constant_value(a) is None]
    if len(dep) > 1:
        raise UnsupportedModelError(
            f"{describe(node, it.gm)} multiplies two input-dependent tensors, which is not piecewise linear"
        )
    return dep[0] if dep else next(i for i, a in enumerate(operands) if isinstance(a, _Aff))


def _as_constant(a: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(a, _Aff):
        return _constant_value(a)
    return torch.as_tensor(a, dtype=like.dtype, device=like.device)


def _arith(name: str) -> Rule:
    """Rule of ``+``, ``-``, ``*``, ``/`` or unary ``-`` (``name``): affine when at most one side depends on the
    input (and is not a divisor)."""

    def rule(it, node, t, args, kwargs):
        if _constants_only(args, kwargs):
            return _python(node, t, args, kwargs)
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
            out, c = _broadcast_constant(x, c)
            out[:, 2] += c  # a constant only shifts the value row
            return _Aff(out)
        if name == "mul":
            if isinstance(a, _Comparison) or isinstance(b, _Comparison):  # a mask: where(x > t, f(x), 0)
                i = 0 if isinstance(a, _Comparison) else 1
                factors = [*node.args[:2], *(v for k, v in node.kwargs.items() if k == "other")]
                return _step_select(it, node, (a, b)[i], factors[1 - i], 0.0)
            x, c = (a, b) if _product_operand(it, node, [a, b]) == 0 else (b, a)
            return _Aff(x.data * _as_constant(c, x.data))
        if isinstance(a, _Aff) and isinstance(b, _Aff) and _constant_value(b) is not None:
            b = _constant_value(b)  # a divisor made in forward
        if isinstance(b, _Aff):
            raise UnsupportedModelError(f"{describe(node, it.gm)} divides by an input-dependent tensor")
        return _Aff(a.data / _as_constant(b, a.data))

    rule.__name__ = rule.__qualname__ = f"_arith_{name}"
    return rule


_ADD, _SUB, _MUL, _DIV, _NEG = (_arith(n) for n in ("add", "sub", "mul", "div", "neg"))
REGISTRY.register(operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__", kind="arith", rule=_ADD)
REGISTRY.register(
    operator.sub,
    operator.isub,
    torch.sub,
    torch.subtract,
    "sub",
    "sub_",
    "subtract",
    "__sub__",
    "__isub__",
    kind="arith",
    rule=_SUB,
)
REGISTRY.register(
    operator.mul,
    operator.imul,
    torch.mul,
    torch.multiply,
    "mul",
    "mul_",
    "multiply",
    "__mul__",
    "__imul__",
    kind="arith",
    rule=_MUL,
)
REGISTRY.register(
    operator.truediv,
    operator.itruediv,
    torch.div,
    torch.divide,
    torch.true_divide,
    "div",
    "div_",
    "divide",
    "true_divide",
    "__truediv__",
    "__itruediv__",
    kind="arith",
    rule=_DIV,
)
REGISTRY.register(
    operator.neg, torch.neg, torch.negative, "neg", "neg_", "negative", "__neg__", kind="arith", rule=_NEG
)


def _constant_map(value: torch.Tensor) -> _Aff:
    """The affine map of a constant per-sample tensor: zero derivative rows, ``value`` on the value row."""
    data = torch.zeros(1, 3, *value.shape, dtype=value.dtype, device=value.device)
    data[:, 2] = value
    return _Aff(data)


@REGISTRY.register(
    torch.zeros,
    torch.ones,
    torch.full,
    torch.linspace,
    torch.arange,
    torch.tensor,
    torch.as_tensor,
    torch.eye,
    "new_zeros",
    "new_ones",
    "new_full",
    "new_tensor",
    kind="arith",
)
def _factory(it, node, t, args, kwargs):
    """A constant made inside ``forward`` (e.g. ``torch.zeros(4, dtype=x.dtype)``); one whose first size is the
    batch size (``x.new_zeros(x.shape[0], 4)``, ``torch.full((x.shape[0], 4), v)``) is the same constant for every
    sample."""
    method = node.op == "call_method"
    if method and isinstance(args[0], _Aff):
        args = (args[0].flat, *args[1:])  # x.new_zeros(...): only x's dtype and device matter
    rest = args[1:] if method else args
    if t in (torch.zeros, torch.ones, "new_zeros", "new_ones"):
        size = kwargs.get("size", rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest)
        fill = float(t in (torch.ones, "new_ones"))
    elif t in (torch.full, "new_full"):
        size, fill = _arg(rest, kwargs, 0, "size"), _arg(rest, kwargs, 1, "fill_value")
    else:
        size = ()
    if size and isinstance(size[0], _BatchSize):
        return _constant_map(torch.full([int(d) for d in size[1:]], float(fill), dtype=torch.float64, device=it.dev))
    return _python(node, t, args, kwargs)


@REGISTRY.register(torch.zeros_like, torch.ones_like, torch.full_like, kind="arith")
def _factory_like(it, node, t, args, kwargs):
    """``zeros_like(h)`` etc. of an input-dependent ``h``: a constant of ``h``'s per-sample shape."""
    x = args[0]
    fill = {torch.zeros_like: 0.0, torch.ones_like: 1.0}.get(t)
    if fill is None:
        fill = float(_arg(args, kwargs, 1, "fill_value"))
    return _constant_map(torch.full(x.data.shape[2:], fill, dtype=x.data.dtype, device=x.data.device))


@REGISTRY.register(torch.rsub, kind="arith")
def _rsub(it, node, t, args, kwargs):
    """``torch.rsub(x, y, alpha)`` is ``y - alpha * x``."""
    x, y, alpha = args[0], _arg(args, kwargs, 1, "other"), _arg(args, kwargs, 2, "alpha", 1)
    return _arith("sub")(it, node, torch.sub, (y, x), {"alpha": alpha})


# ---------------------------------------------------------------------------------------------- affine
def _add_bias(out: _Aff, b: torch.Tensor | None) -> _Aff:
    """Bias of a conv-like output ``(P, 3, C, *spatial)``: per channel, on the value row."""
    if b is not None:
        out.data[:, 2] += b.view(-1, *([1] * (out.data.dim() - 3)))
    return out


def _flush_rounding_noise(it, out: _Aff, x: _Aff, magnitude: Callable[[torch.Tensor], torch.Tensor], b, n: int) -> _Aff:
    """Set to exactly zero the units of ``out`` that are rounding noise: each of whose three coefficients (``u`` and
    ``v`` slopes, value at 0) is within the worst-case rounding of a sum of ``n`` terms and a bias,
    ``(n + 2) 2**-53``, of its terms' magnitude ``magnitude(|x|) + |b|`` (``magnitude`` is the op with ``|weight|``
    and no bias). A unit with one coefficient above that is kept whole: a real slope or offset is never dropped.

    A slice that lies in a unit's hyperplane (a plane through three points on which ``w.x + b`` is 0, such as
    ``(1,0,0), (0,1,0), (0,0,1)`` and ``x+y+z-1``) gives that unit maps of size ~1e-16 instead of 0, which would cut
    the slice along a line of rounding noise. Only done while every region shares one map (before the first
    refinement: ``x`` is ``(1, 3, ...)``), where it costs one more product on three rows."""
    if x.data.shape[0] != 1:
        return out
    mag = _Aff.unflat(magnitude(x.flat.abs())).data
    if b is not None:
        mag[:, 2] += b.abs().view(-1, *([1] * (mag.dim() - 3)))
    noise = (out.data.abs() <= ((n + 2) * 2.0**-53) * mag).all(1, keepdim=True)  # (1, 1, *features)
    out.data.masked_fill_(noise, 0.0)
    return out


@REGISTRY.register(nn.Linear, kind="affine")
def _linear_layer(it, node, m, args, kwargs):
    out = _Aff.unflat(F.linear(args[0].flat, m.weight))
    if m.bias is not None:
        out.data[:, 2] += m.bias
    return _flush_rounding_noise(it, out, args[0], lambda a: F.linear(a, m.weight.abs()), m.bias, m.in_features)


# Bytes of a convolution's hidden work buffer per call. On the CPU, float64 convolutions unfold their whole
# batch at once (in_channels x kernel x output positions per sample: ~5x the input plus output of a 3x3 conv),
# which the memory budget does not see; in sub-batches that buffer stays below this, whatever the regions. A
# buffer that stays in cache is also faster: ResNet-18 (width 16) partitions ~1.5x faster with 4 MB than 64 MB
# (benchmarks/bench_conv.py). GPUs get more: a launch costs more there.
_CONV_WORK_BYTES = {"cpu": 4 << 20}
_CONV_WORK_BYTES_OTHER = 1 << 30


class _DirectConv(NamedTuple):
    """A convolution that writes a sub-batch's output straight into the output: ``into(x, out)``, on sub-batches
    of ``step`` samples (``None``: as many as :data:`_CONV_WORK_BYTES` allows)."""

    into: Callable[[torch.Tensor, torch.Tensor], Any]
    step: int | None = None


# On the CPU, a convolution whose dense matrix (input size x output size) takes at most _DENSE_MAX_BYTES and
# costs at most _DENSE_MAX_WORK times its multiply-adds runs as one matrix product with that matrix: torch's
# float64 convolution makes one small product per sample, far below the machine's speed on small feature maps
# (per sample, 8 -> 16 channels on 4x4: 14 us against 5 us; 32 -> 64 on 2x2: 30 against 5; 16 -> 16 on 8x8,
# 7x the work: 48 against 84, so not there).
_DENSE_MAX_BYTES = 4 << 20
_DENSE_MAX_WORK = 8
# Dense matrices of the convolutions run so far, per weight tensor (dropped with it) and call.
_dense_matrices = WeakIdKeyDictionary()


def _dense_matrix(
    conv: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, weight: torch.Tensor, first: torch.Tensor, key
) -> torch.Tensor | None:
    """The matrix ``D`` (``(in, out)``) with ``conv(x).flatten(1) == x.flatten(1) @ D`` up to rounding, where
    it is worth using (see :data:`_DENSE_MAX_BYTES`); ``key`` names the call's other arguments."""
    n_in, n_out = x[0].numel(), first[0].numel()
    if not (
        x.device.type == "cpu"
        and x.dtype == torch.float64
        and not torch.is_grad_enabled()
        and n_in * n_out * x.element_size() <= _DENSE_MAX_BYTES
        and n_in <= _DENSE_MAX_WORK * weight[0].numel()
    ):
        return None
    calls = _dense_matrices.setdefault(weight, {})
    key = (key, weight._version, tuple(x.shape[1:]))
    if key not in calls:
        eye = torch.eye(n_in, dtype=x.dtype, device=x.device).reshape(n_in, *x.shape[1:])
        calls[key] = conv(eye).reshape(n_in, n_out)  # each entry is one weight or 0: exact
    return calls[key]


def _conv_in_batches(
    conv: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    direct: _DirectConv | None = None,
    key: Any = None,
):
    """``conv(x)`` over the batch ``x`` in sub-batches whose unfolded columns fit :data:`_CONV_WORK_BYTES`, or
    by ``direct``, where given; as one matrix product where :func:`_dense_matrix` gives one (``key`` names the
    convolution's other arguments; ``None``: never)."""
    n = x.shape[0]
    first = conv(x[:1])
    if n == 1:
        return first
    D = None if key is None else _dense_matrix(conv, x, weight, first, key)
    if D is not None:
        out = memory.empty((n, *first.shape[1:]), first)
        torch.mm(x.reshape(n, -1), D, out=out.view(n, -1))
        return out
    # Unfolded values per sample, bounded above: channels (the larger of the weight's first two dimensions) x
    # kernel x positions (the larger of input and output, so transposed convolutions are covered too).
    cols = max(weight.shape[0], weight.shape[1]) * weight[0, 0].numel()
    pos = max(x[0, 0].numel(), first[0, 0].numel())
    per_sample = x.element_size() * (cols * pos + x[0].numel() + first[0].numel())
    cap = _CONV_WORK_BYTES.get(x.device.type, _CONV_WORK_BYTES_OTHER)
    step = max(1, cap // per_sample) if direct is None or direct.step is None else direct.step
    out = memory.empty((n, *first.shape[1:]), first)
    out[:1] = first
    for i in range(1, n, step):
        if direct is not None:
            direct.into(x[i : i + step], out[i : i + step])
        else:
            out[i : i + step] = conv(x[i : i + step])
    return out


# Below this many output positions per sample, a 2-D convolution on the CPU runs as one matrix product over
# several samples (_GEMM_COLUMNS samples x positions): torch's float64 convolution makes one product per sample,
# and a product only 16 or 64 columns wide runs far below the machine's speed (VGG11's 512-channel 3x3
# convolutions on 4x4 maps: ~10 ms per sample one by one, ~3 ms in products of 256-512 columns). Not when the
# product's inner dimension (in-channels x kernel) is small: copying the unfolded input then costs more than the
# product (1 -> 8 channels on 8x8: 2.5x slower; 16 -> 32 channels, 144 deep: even).
_GEMM_MAX_POSITIONS = 64
_GEMM_MIN_INNER = 128
_GEMM_COLUMNS = 512
_GEMM_WORK_BYTES = 32 << 20  # bound on a product's unfolded input


def _conv2d_direct(
    x: torch.Tensor, w: torch.Tensor, stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1
) -> _DirectConv | None:
    """How the 2-D convolution ``F.conv2d(x, w, None, stride, padding, dilation, groups)`` on the CPU writes its
    output straight into the output:

    - on small feature maps with enough in-channels, unfolded over several samples into one matrix product (same
      values up to rounding);
    - else by the kernel torch's own float64 CPU convolution runs (same values, bit for bit), without the copy of
      each sub-batch's output (~20 % of a small convolution's time).

    ``None`` where neither applies."""
    if not (
        x.device.type == "cpu"
        and x.dtype == w.dtype == torch.float64
        and not torch.is_grad_enabled()  # out= takes no autograd
        and groups == 1
        and not isinstance(padding, str)
        and x.dim() == w.dim() == 4
    ):
        return None
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = w.shape[2:], _pair(stride), _pair(padding), _pair(dilation)
    C, Co = w.shape[1], w.shape[0]
    Ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    L, K = Ho * Wo, C * kh * kw
    if 0 < L <= _GEMM_MAX_POSITIONS and K >= _GEMM_MIN_INNER:
        Wm = w.reshape(Co, K)

        def gemm(xs: torch.Tensor, out: torch.Tensor) -> None:
            n = xs.shape[0]
            xp = F.pad(xs, (pw, pw, ph, ph)) if ph or pw else xs
            sN, sC, sH, sW = xp.stride()
            # Unfolded input (C, kh, kw, n, Ho, Wo) as a strided view, made contiguous by one copy.
            cols = xp.as_strided((C, kh, kw, n, Ho, Wo), (sC, sH * dh, sW * dw, sN, sH * sh, sW * sw))
            res = torch.mm(Wm, cols.reshape(K, n * L))  # (Co, n L)
            out.view(n, Co, L).copy_(res.view(Co, n, L).permute(1, 0, 2))

        step = max(1, min(_GEMM_COLUMNS // L, _GEMM_WORK_BYTES // (x.element_size() * K * L)))
        return _DirectConv(gemm, step)
    if (dh, dw) != (1, 1):
        return None
    k, stride, pad = (kh, kw), (sh, sw), (ph, pw)
    return _DirectConv(lambda xs, out: torch._C._nn.thnn_conv2d(xs, w, k, None, stride, pad, out=out))


def conv_without_bias(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The convolution module ``m`` (1-3 spatial dims) on the batch ``x``, without its bias, as the engine runs
    it: in sub-batches, straight into the output where :func:`_conv2d_direct` applies."""
    direct = None
    if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros":
        direct = _conv2d_direct(x, m.weight, m.stride, m.padding, m.dilation, m.groups)
    key = (type(m), m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
    return _conv_in_batches(lambda s: m._conv_forward(s, m.weight, None), x, m.weight, direct, key)


@REGISTRY.register(nn.Conv1d, nn.Conv2d, nn.Conv3d, kind="affine")
def _conv(it, node, m, args, kwargs):
    out = _add_bias(_Aff.unflat(conv_without_bias(m, args[0].flat)), m.bias)
    W = m.weight
    return _flush_rounding_noise(it, out, args[0], lambda a: m._conv_forward(a, W.abs(), None), m.bias, W[0].numel())


def conv_by_units(m: nn.Module) -> bool:
    """Whether :func:`conv_add_units` handles the convolution module ``m``."""
    return (
        isinstance(m, nn.modules.conv._ConvNd)
        and not m.transposed
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


# Elements per batch of unit responses in :func:`conv_add_units` (each with an int64 index).
_UNIT_BATCH = 1 << 20


def conv_add_units(
    out: torch.Tensor, pi: torch.Tensor, fi: torch.Tensor, v: torch.Tensor, m: nn.Module, in_feat: tuple[int, ...]
) -> None:
    """Add to sample ``pi[n]`` of ``out`` (``(P, 3, C_out, *S_out)``) the response of convolution ``m`` (without
    bias) to the input that is ``v[n]`` (``(n, 3)``, the rows of an affine map) at flat unit ``fi[n]`` of an
    input of shape ``in_feat`` and zero elsewhere.

    A unit reaches one output position per kernel offset, in each output channel of its group: ``C_out / groups
    x kernel`` multiply-adds per unit instead of a whole convolution per sample."""
    W = m.weight
    C_out, S_out = out.shape[2], out.shape[3:]
    cin_g, kernel = W.shape[1], W.shape[2:]
    cout_g = C_out // m.groups
    n_pos = math.prod(S_out)
    pos, rem = [], fi
    for s in reversed(in_feat[1:]):
        pos.append(rem % s)
        rem = rem // s
    pos.reverse()
    group = torch.div(rem, cin_g, rounding_mode="floor")
    c_local = rem - group * cin_g
    Wg = W.view(m.groups, cout_g, cin_g, -1)  # (groups, C_out/groups, C_in/groups, kernel)
    o = torch.arange(cout_g, device=out.device)
    rows = torch.arange(3, device=out.device)
    flat = out.view(-1)
    step = max(1, _UNIT_BATCH // (3 * cout_g))
    for k_i, offs in enumerate(itertools.product(*(range(k) for k in kernel))):
        ok = torch.ones_like(fi, dtype=torch.bool)
        at = torch.zeros_like(fi)
        for d, (p_d, off) in enumerate(zip(pos, offs, strict=True)):
            t = p_d + m.padding[d] - off * m.dilation[d]  # = out_pos * stride
            q = torch.div(t, m.stride[d], rounding_mode="floor")
            ok &= (t >= 0) & (t - q * m.stride[d] == 0) & (q < S_out[d])
            at = at * S_out[d] + q
        sel = torch.nonzero(ok)[:, 0]
        for i in range(0, sel.shape[0], step):
            s = sel[i : i + step]
            w = Wg[group[s], :, c_local[s], k_i]  # (n, C_out/groups)
            vals = v[s, :, None] * w[:, None, :]  # (n, 3, C_out/groups)
            chan = (pi[s] * 3)[:, None, None] + rows[None, :, None]  # (n, 3, 1): row of out
            idx = (chan * C_out + (group[s] * cout_g)[:, None, None] + o) * n_pos + at[s][:, None, None]
            flat.index_add_(0, idx.reshape(-1), vals.reshape(-1))


@REGISTRY.register(nn.ConvTranspose1d, nn.ConvTranspose2d, kind="affine")
def _conv_transpose(it, node, m, args, kwargs):
    conv = F.conv_transpose1d if isinstance(m, nn.ConvTranspose1d) else F.conv_transpose2d

    def fn(x):
        return conv(x, m.weight, None, m.stride, m.padding, m.output_padding, m.groups, m.dilation)

    return _add_bias(_Aff.unflat(_conv_in_batches(fn, args[0].flat, m.weight)), m.bias)


@REGISTRY.register(nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, kind="affine")
def _constant_pad(it, node, m, args, kwargs):
    return _pad_constant(args[0], m.padding, float(m.value))


def _has_running_stats(m: nn.Module) -> bool:
    return m.running_mean is not None and m.running_var is not None


@REGISTRY.register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, kind="affine", accepts=_has_running_stats)
def _batchnorm(it, node, m, args, kwargs):
    x = args[0]
    if not _has_running_stats(m):
        raise UnsupportedModelError(
            f"{describe(node, it.gm)} has track_running_stats=False: it normalises with batch "
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


@REGISTRY.register(F.linear, kind="affine")
def _f_linear(it, node, t, args, kwargs):
    w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    out = _Aff.unflat(F.linear(args[0].flat, w))
    if b is not None:
        out.data[:, 2] += b
    return _flush_rounding_noise(it, out, args[0], lambda a: F.linear(a, w.abs()), b, w.shape[-1])


@REGISTRY.register(F.conv1d, F.conv2d, kind="affine")
def _f_conv(it, node, t, args, kwargs):
    w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    rest = list(args[3:])
    kw = {k: v for k, v in kwargs.items() if k not in ("weight", "bias", "input")}
    x = args[0].flat
    direct = None
    if t is F.conv2d:
        params = [_arg(args, kwargs, i, k, d) for i, k, d in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1))]
        direct = _conv2d_direct(x, w, *params, _arg(args, kwargs, 6, "groups", 1))
    key = (t, repr(rest), repr(sorted(kw.items())))
    out = _add_bias(_Aff.unflat(_conv_in_batches(lambda x: t(x, w, None, *rest, **kw), x, w, direct, key)), b)
    return _flush_rounding_noise(it, out, args[0], lambda a: t(a, w.abs(), None, *rest, **kw), b, w[0].numel())


@REGISTRY.register(torch.matmul, operator.matmul, torch.mm, "matmul", "mm", "__matmul__", kind="linear")
def _matmul(it, node, t, args, kwargs):
    """``x @ W`` or ``W @ x`` with one side constant: linear in ``x`` as long as each sample is multiplied on its
    own (the batch dimension stays first and is not contracted)."""
    operands = [args[0], args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))]
    i = _product_operand(it, node, operands)
    x = operands[i].flat
    w = _as_constant(operands[1 - i], x)
    if x.dim() >= 3:  # a batch of matrices: w broadcasts over it if it has fewer dimensions or a leading 1
        per_sample = w.dim() < x.dim() or w.shape[0] == 1
    else:  # rows of a matrix are samples: only x @ w with a vector or matrix w keeps them apart
        per_sample = i == 0 and w.dim() <= 2
    if not per_sample:
        raise UnsupportedModelError(
            f"{describe(node, it.gm)} multiplies across the batch dimension of an input-dependent tensor of shape "
            f"{tuple(operands[i].data.shape[2:])} per sample by a constant of shape {tuple(w.shape)}"
        )
    return _Aff.unflat(torch.matmul(x, w) if i == 0 else torch.matmul(w, x))


@REGISTRY.register(torch.einsum, kind="linear")
def _einsum(it, node, t, args, kwargs):
    """``torch.einsum`` with one input-dependent operand whose first index is the batch: it must lead the output
    and appear in no other operand."""
    multi = len(args) == 2 and isinstance(args[1], (tuple, list))
    operands = list(args[1]) if multi else list(args[1:])
    eq = args[0].replace(" ", "")
    i = _product_operand(it, node, operands)
    ins, arrow, out = eq.partition("->")
    subs = ins.split(",")
    others = "".join(s for j, s in enumerate(subs) if j != i)
    lead = "..." if subs[i].startswith("...") else subs[i][:1]
    ok = bool(arrow) and len(subs) == len(operands) and out.startswith(lead) and lead not in others
    if lead != "...":
        ok = ok and lead.isalpha() and subs[i].count(lead) == 1 and out.count(lead) == 1
    if not ok:
        raise UnsupportedModelError(
            f"{describe(node, it.gm)} ('{args[0]}'): the input-dependent operand's first (batch) index must lead "
            "an explicit output ('->') and appear in no other operand"
        )
    x = operands[i].flat
    ops = [x if j == i else _as_constant(a, x) for j, a in enumerate(operands)]
    return _Aff.unflat(torch.einsum(eq, *ops))


# ---------------------------------------------------------------------------------------------- piecewise linear
def _cpwl_input(it, node, args) -> tuple[str, Any]:
    """The code name of a piecewise-linear node (module path, ``path:i`` for the ``i``-th call of a module
    called more than once, or node name) and its input maps (an ``_Aff``, or factored maps for ops registered
    with ``factored=True``)."""
    x = args[0]
    if not isinstance(x, _Aff) and not hasattr(x, "units"):
        raise UnsupportedModelError(f"{describe(node, it.gm)} applied to a constant")
    return _code_name(it, node), x


def _code_name(it, node) -> str:
    return it.code_names.get(node, node.target) if node.op == "call_module" else node.name


def _relu_like(it, name, x, slope):
    return it._scalar_cpwl(name, x, [0.0], [[slope], [1.0]], [[0.0], [0.0]])


def _hardtanh(it, name, x, lo, hi):
    return it._scalar_cpwl(name, x, [float(lo), float(hi)], [[0.0], [1.0], [0.0]], [[float(lo)], [0.0], [float(hi)]])


@REGISTRY.register(nn.ReLU, F.relu, torch.relu, torch.relu_, "relu", "relu_", kind="cpwl")  # F.relu_ is torch.relu_
def _relu(it, node, target, args, kwargs):
    name, x = _cpwl_input(it, node, args)
    return _relu_like(it, name, x, 0.0)


@REGISTRY.register(nn.LeakyReLU, kind="cpwl")
def _leaky_relu_module(it, node, m, args, kwargs):
    name, x = _cpwl_input(it, node, args)
    return _relu_like(it, name, x, m.negative_slope)


@REGISTRY.register(F.leaky_relu, F.leaky_relu_, kind="cpwl")
def _leaky_relu(it, node, t, args, kwargs):
    name, x = _cpwl_input(it, node, args)
    return _relu_like(it, name, x, _arg(args, kwargs, 1, "negative_slope", 0.01))


@REGISTRY.register(nn.RReLU, kind="cpwl")
def _rrelu_module(it, node, m, args, kwargs):
    """In eval mode RReLU is a leaky ReLU with the mean of its slope range."""
    name, x = _cpwl_input(it, node, args)
    return _relu_like(it, name, x, (m.lower + m.upper) / 2)


@REGISTRY.register(F.rrelu, F.rrelu_, kind="cpwl")
def _rrelu(it, node, t, args, kwargs):
    if _arg(args, kwargs, 3, "training", False):
        raise UnsupportedModelError(f"{describe(node, it.gm)} draws random slopes (training=True)")
    name, x = _cpwl_input(it, node, args)
    lower, upper = _arg(args, kwargs, 1, "lower", 1.0 / 8), _arg(args, kwargs, 2, "upper", 1.0 / 3)
    return _relu_like(it, name, x, (lower + upper) / 2)


@REGISTRY.register(nn.Softshrink, F.softshrink, kind="cpwl")
def _softshrink(it, node, t, args, kwargs):
    """``x - lambd`` above ``lambd``, ``x + lambd`` below ``-lambd``, 0 between."""
    name, x = _cpwl_input(it, node, args)
    lam = float(t.lambd if isinstance(t, nn.Module) else _arg(args, kwargs, 1, "lambd", 0.5))
    return it._scalar_cpwl(name, x, [-lam, lam], [[1.0], [0.0], [1.0]], [[lam], [0.0], [-lam]])


@REGISTRY.register(nn.PReLU, kind="cpwl")
def _prelu_module(it, node, m, args, kwargs):
    return _prelu(it, node, F.prelu, (args[0], m.weight), {})


@REGISTRY.register(F.prelu, "prelu", kind="cpwl")
def _prelu(it, node, t, args, kwargs):
    """PReLU with one slope, or one per channel (dimension 1)."""
    name, x = _cpwl_input(it, node, args)
    w = torch.as_tensor(_arg(args, kwargs, 1, "weight"), dtype=x.data.dtype, device=x.data.device).reshape(-1)
    feat = tuple(x.data.shape[2:])
    if w.numel() == 1:
        neg = w.expand(math.prod(feat) if feat else 1)
    else:
        shape = [1] * len(feat)
        shape[0] = -1
        neg = w.reshape(shape).expand(feat).reshape(-1)
    ones = torch.ones_like(neg)
    return it._scalar_cpwl(name, x, [0.0], torch.stack([neg, ones]), torch.zeros(2, 1))


@REGISTRY.register(nn.Hardtanh, nn.ReLU6, kind="cpwl")
def _hardtanh_module(it, node, m, args, kwargs):
    name, x = _cpwl_input(it, node, args)
    return _hardtanh(it, name, x, m.min_val, m.max_val)


@REGISTRY.register(F.relu6, kind="cpwl")
def _relu6(it, node, t, args, kwargs):
    name, x = _cpwl_input(it, node, args)
    return _hardtanh(it, name, x, 0.0, 6.0)


@REGISTRY.register(F.hardtanh, F.hardtanh_, kind="cpwl")
def _f_hardtanh(it, node, t, args, kwargs):
    name, x = _cpwl_input(it, node, args)
    return _hardtanh(it, name, x, _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0))


@REGISTRY.register(torch.abs, torch.abs_, torch.absolute, "abs", "abs_", "absolute", kind="cpwl")
def _abs(it, node, target, args, kwargs):
    name, x = _cpwl_input(it, node, args)
    return it._scalar_cpwl(name, x, [0.0], [[-1.0], [1.0]], [[0.0], [0.0]])


@REGISTRY.register(torch.clamp, torch.clip, torch.clamp_, torch.clip_, "clamp", "clip", "clamp_", "clip_", kind="cpwl")
def _clamp(it, node, target, args, kwargs):
    name, x = _cpwl_input(it, node, args)
    lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
    if isinstance(lo, _Aff) or isinstance(hi, _Aff):
        raise UnsupportedModelError(f"{describe(node, it.gm)}: clamp bounds must not depend on the input")
    lo, hi = (b.item() if isinstance(b, torch.Tensor) and b.numel() == 1 else b for b in (lo, hi))
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        return _clamp_by_units(it, node, name, x, lo, hi)
    if lo is not None and hi is not None:
        if float(lo) > float(hi):  # torch then sets every element to max: a constant, no breakpoints
            return _constant_map(torch.full(x.data.shape[2:], float(hi), dtype=x.data.dtype, device=x.data.device))
        return _hardtanh(it, name, x, float(lo), float(hi))
    if lo is not None:
        return it._scalar_cpwl(name, x, [float(lo)], [[0.0], [1.0]], [[float(lo)], [0.0]])
    if hi is not None:
        return it._scalar_cpwl(name, x, [float(hi)], [[1.0], [0.0]], [[0.0], [float(hi)]])
    return x


def _clamp_by_units(it, node, name, x: _Aff, lo, hi):
    """Clamp with a bound per unit (a tensor, e.g. learned thresholds), as torch computes it: ``min(max(x, lo),
    hi)``. Each unit's input is shifted (and, with two bounds, scaled) so that its breakpoints are 0 (and 1); the
    pieces' multipliers and constants undo that per unit. A unit whose bounds meet or cross is the constant
    ``hi``, with no breakpoint."""
    shapes = [torch.as_tensor(b).shape for b in (lo, hi) if b is not None]
    data, _ = _broadcast_constant(x, torch.zeros(torch.broadcast_shapes(*shapes)))  # a copy of x's maps
    feat = tuple(data.shape[2:])

    lo, hi = (None if b is None else _per_unit_constant(node, it, b, feat) for b in (lo, hi))
    if lo is None or hi is None:  # one bound b: z = x - b, pieces b and z + b (min) or z + b and b (max)
        b = lo if hi is None else hi
        data[:, 2] -= b
        inside = [[0.0], [1.0]] if hi is None else [[1.0], [0.0]]
        return it._scalar_cpwl(name, _Aff(data), [0.0], inside, b.reshape(1, -1).expand(2, -1))
    lo, hi = lo.reshape(-1), hi.reshape(-1)
    width = hi - lo
    open_ = width > 0
    M = data.reshape(data.shape[0], 3, -1)  # a view of the copy: z = (x - lo) / (hi - lo)
    M[:, 2] -= lo
    M /= torch.where(open_, width, torch.ones_like(width))
    M[:, :, ~open_] = 0.0  # a closed unit sits at z = 0.5, between its breakpoints: never crossed
    M[:, 2, ~open_] = 0.5
    zero, below = torch.zeros_like(width), torch.where(open_, lo, hi)
    mult = torch.stack([zero, torch.where(open_, width, zero), zero])
    const = torch.stack([below, below, hi])
    return it._scalar_cpwl(name, _Aff(M.reshape(data.shape)), [0.0, 1.0], mult, const)


@REGISTRY.register(torch.clamp_min, torch.clamp_min_, "clamp_min", "clamp_min_", kind="cpwl")
def _clamp_min(it, node, t, args, kwargs):
    return _clamp(it, node, t, (args[0],), {"min": _arg(args, kwargs, 1, "min")})


@REGISTRY.register(torch.clamp_max, torch.clamp_max_, "clamp_max", "clamp_max_", kind="cpwl")
def _clamp_max(it, node, t, args, kwargs):
    return _clamp(it, node, t, (args[0],), {"max": _arg(args, kwargs, 1, "max")})


def _continuous_threshold(m: nn.Module) -> bool:
    return m.threshold == m.value


@REGISTRY.register(nn.Threshold, kind="cpwl", accepts=_continuous_threshold)
def _threshold_module(it, node, m, args, kwargs):
    """``Threshold(t, t)`` is ``max(x, t)``; with another value it jumps at ``t`` and is refused."""
    return _clamp(it, node, torch.clamp, (args[0],), {"min": m.threshold})


@REGISTRY.register(F.threshold, F.threshold_, kind="cpwl")
def _threshold(it, node, t, args, kwargs):
    th, value = _arg(args, kwargs, 1, "threshold"), _arg(args, kwargs, 2, "value")
    if th != value:
        raise UnsupportedModelError(
            f"{describe(node, it.gm)} with value {value} != threshold {th} is discontinuous, not piecewise linear"
        )
    return _clamp(it, node, torch.clamp, (args[0],), {"min": th})


@REGISTRY.register(nn.Hardsigmoid, F.hardsigmoid, kind="cpwl")
def _hardsigmoid(it, node, t, args, kwargs):
    """``relu6(x + 3) / 6``: 0, then ``x / 6 + 1 / 2``, then 1; codes 0/1/2 as for Hardtanh."""
    name, x = _cpwl_input(it, node, args)
    return it._scalar_cpwl(name, x, [-3.0, 3.0], [[0.0], [1.0 / 6.0], [0.0]], [[0.0], [0.5], [1.0]])


# ---------------------------------------------------------------------------------------------- comparisons
class _Comparison:
    """``x > t`` (``>=``, ``<``, ``<=``) of an input-dependent ``x`` and a constant ``t``: a step function, so it
    is only kept as this marker until the ``torch.where`` or product that consumes it (:func:`_where`) turns
    the two together into one continuous unit-wise function of ``x``."""

    __slots__ = ("x", "x_node", "t", "above")

    def __init__(self, x: Any, x_node: fx.Node, t: Any, above: bool) -> None:
        self.x, self.x_node, self.t, self.above = x, x_node, t, above  # above: true where x exceeds t


_COMPARISONS = {  # target -> whether it holds above its right-hand side
    **dict.fromkeys((operator.gt, torch.gt, torch.greater, "gt", "greater", "__gt__"), True),
    **dict.fromkeys((operator.ge, torch.ge, torch.greater_equal, "ge", "greater_equal", "__ge__"), True),
    **dict.fromkeys((operator.lt, torch.lt, torch.less, "lt", "less", "__lt__"), False),
    **dict.fromkeys((operator.le, torch.le, torch.less_equal, "le", "less_equal", "__le__"), False),
}
_STEP_USE = (
    "supported only as the condition of torch.where(x > t, f(x), g(x)), as a mask multiplying f(x) or as the mask "
    "of x.masked_fill, with f and g unit-wise affine in x (x itself, constants, +, -, * and / by constants) and "
    "equal at t"
)


def _step_users_ok(it, node: fx.Node) -> bool:
    """Whether every use of a comparison (through dtype casts) is a ``torch.where`` condition or a factor."""
    for user in node.users:
        op, _ = it.registry.lookup(user, it.gm)
        if op is not None and op.rule is _identity and user.op != "call_module":
            if not _step_users_ok(it, user):
                return False
        elif op is not None and op.rule is _where:
            if user.args[0] is not node or node in user.args[1:] or node in user.kwargs.values():
                return False
        elif op is not None and op.rule is _masked_fill:
            if _arg(user.args, user.kwargs, 1, "mask") is not node or node in (user.args[:1] + user.args[2:]):
                return False
        elif op is None or op.rule is not _MUL:
            return False
    return True


@REGISTRY.register(*_COMPARISONS, kind="arith")
def _compare(it, node, t, args, kwargs):
    a, b = args[0], _arg(args, kwargs, 1, "other")
    dep = [isinstance(v, _Aff) and _constant_value(v) is None for v in (a, b)]
    if not any(dep) and not _step_users_ok(it, node):  # a constant made in forward, used as one
        return _python(node, t, [_constant_value(v) if isinstance(v, _Aff) else v for v in (a, b)], {})
    if all(dep):
        raise UnsupportedModelError(
            f"{describe(node, it.gm)} compares two input-dependent tensors; comparisons are " + _STEP_USE
        )
    if not _step_users_ok(it, node):
        raise UnsupportedModelError(
            f"{describe(node, it.gm)} compares an input-dependent tensor x with a "
            "constant t: that is a step function, not continuous; comparisons are " + _STEP_USE
        )
    # x: the input-dependent side, or a map that is constant on this slice (an activation saturated there)
    i = 0 if dep[0] or (not dep[1] and isinstance(a, _Aff)) else 1
    x, c = (a, b) if i == 0 else (b, a)
    c = _constant_value(c) if isinstance(c, _Aff) else c
    x_node = node.args[i] if i < len(node.args) else node.kwargs.get("other")
    return _Comparison(
        x, _uncast(it, x_node), _per_unit_constant(node, it, c, tuple(x.data.shape[2:])), _COMPARISONS[t] == (i == 0)
    )


def _uncast(it, n: Any) -> Any:
    """``n`` without the dtype casts and copies applied to it."""
    while isinstance(n, fx.Node) and n.op != "call_module" and n.args:
        op, _ = it.registry.lookup(n, it.gm)
        if op is None or op.rule is not _identity:
            break
        n = n.args[0]
    return n


def _unit_affine(it, a: Any, x_node: fx.Node) -> tuple[Any, Any] | None:
    """``(alpha, beta)`` with ``a == alpha * x + beta`` unit-wise (constants, broadcastable), read from the graph;
    ``None`` where ``a`` is not built from ``x`` and constants by ``+``, ``-``, ``*``, ``/`` by constants."""
    a = _uncast(it, a)
    if a is x_node:
        return 1.0, 0.0
    if not isinstance(a, fx.Node):
        return (0.0, a) if isinstance(a, (int, float, torch.Tensor)) and not isinstance(a, bool) else None
    if a.op == "get_attr":
        val = it.gm
        for part in a.target.split("."):
            val = getattr(val, part)
        return (0.0, val.detach()) if isinstance(val, torch.Tensor) else None
    op, t = it.registry.lookup(a, it.gm)
    if op is None or a.op == "call_module":
        return None
    if op.rule is _factory_like and _uncast(it, a.args[0]) is x_node:
        fill = {torch.zeros_like: 0.0, torch.ones_like: 1.0}.get(t, a.args[1] if len(a.args) > 1 else None)
        return (0.0, fill) if isinstance(fill, (int, float)) else None
    if op.rule not in (_ADD, _SUB, _MUL, _DIV, _NEG):
        return None
    operands = [*a.args[:2], *(v for k, v in a.kwargs.items() if k != "alpha")]
    parts = [_unit_affine(it, v, x_node) for v in operands]
    if any(p is None for p in parts) or not parts:
        return None
    if op.rule is _NEG:
        return -parts[0][0], -parts[0][1]
    if len(parts) != 2:
        return None
    (la, lb), (ra, rb) = parts
    alpha = a.kwargs.get("alpha", 1)
    if op.rule is _ADD:
        return la + alpha * ra, lb + alpha * rb
    if op.rule is _SUB:
        return la - alpha * ra, lb - alpha * rb
    if op.rule is _MUL:
        if _is_zero(ra):
            return la * rb, lb * rb
        return (ra * lb, rb * lb) if _is_zero(la) else None
    return (la / rb, lb / rb) if _is_zero(ra) else None


def _is_zero(alpha: Any) -> bool:
    return isinstance(alpha, float) and alpha == 0.0


def _where_pieces(it, node, cmp: _Comparison, yes: Any, no: Any):
    """``where(cmp, yes, no)`` as a unit-wise function of ``cmp.x`` with its breakpoint at ``t``: the piece
    multipliers and constants ``(2, F)`` of ``z = x - t`` (piece 1 is ``z > 0``)."""
    feat = tuple(cmp.x.data.shape[2:])
    branches = []
    for v in (yes, no):
        ab = _unit_affine(it, v, cmp.x_node)
        if ab is None:
            raise UnsupportedModelError(
                f"{describe(node, it.gm)}: a branch is not a unit-wise affine function of the compared tensor "
                f"'{cmp.x_node}'; a comparison is " + _STEP_USE
            )
        branches.append([_per_unit_constant(node, it, c, feat).reshape(-1) for c in ab])
    (a1, b1), (a0, b0) = branches if cmp.above else branches[::-1]
    t = cmp.t.reshape(-1)
    c1, c0 = a1 * t + b1, a0 * t + b0  # each piece's value at z = 0
    scale = c1.abs() + c0.abs() + (a1 * t).abs() + (a0 * t).abs() + b1.abs() + b0.abs()
    _refuse_jump(it, node, cmp.x_node, c0, c1, scale, "its threshold")
    return torch.stack([a0, a1]), torch.stack([c0, c1])


def _refuse_jump(it, node, x_node, below: torch.Tensor, above: torch.Tensor, scale: torch.Tensor, at: str) -> None:
    """Refuse ``node`` where its pieces' values on either side of a breakpoint of ``x_node`` differ by more than
    1e-9 of ``scale``: the function jumps there."""
    jump = (above - below).abs()
    if bool((jump > 1e-9 * scale).any()):
        raise UnsupportedModelError(
            f"{describe(node, it.gm)} jumps by up to {float(jump.max()):.3g} where '{x_node}' crosses {at}: the "
            "network is discontinuous there, not continuous piecewise linear"
        )


def _select_operands(node: fx.Node, rule: Rule) -> tuple[Any, Any, Any]:
    """``(condition, value where true, value where false)`` of a ``torch.where`` or ``masked_fill`` node, as graph
    arguments (``h.masked_fill(m, v)`` is ``torch.where(m, v, h)``)."""
    if rule is _masked_fill:
        return _arg(node.args, node.kwargs, 1, "mask"), _arg(node.args, node.kwargs, 2, "value"), node.args[0]
    names = ("condition", "input", "other")
    return tuple(node.args[i] if i < len(node.args) else node.kwargs.get(k) for i, k in enumerate(names))


def _scalar_operand(it, a: Any) -> float | None:
    """``a`` as one number where it is a constant holding one value (``1.0``, ``torch.tensor(2.)``), else ``None``."""
    if isinstance(a, fx.Node):
        ab = _unit_affine(it, a, None)
        if ab is None or not _is_zero(ab[0]):
            return None
        a = ab[1]
    if isinstance(a, torch.Tensor) and a.numel() == 1:
        return float(a)
    return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else None


def _step_of(it, cond: Any, x_node: fx.Node) -> tuple[float, bool] | None:
    """``(t, above)`` of a comparison node ``x > t`` (or ``>=``, ``<``, ``<=``, either side) of ``x_node`` with one
    number ``t``, read from the graph; ``None`` otherwise."""
    cond = _uncast(it, cond)
    if not isinstance(cond, fx.Node) or cond.op == "call_module" or cond.target not in _COMPARISONS:
        return None
    a, b = cond.args[0], _arg(cond.args, cond.kwargs, 1, "other")
    for x, c, above in ((a, b, _COMPARISONS[cond.target]), (b, a, not _COMPARISONS[cond.target])):
        t = _scalar_operand(it, c)
        if _uncast(it, x) is x_node and t is not None:
            return t, above
    return None


def _unit_pieces(it, a: Any, x_node: fx.Node, depth: int = 0) -> tuple[list[float], list[tuple]] | None:
    """``a`` as a unit-wise piecewise-affine function of ``x``: increasing breakpoints ``t_1..t_k`` and ``k + 1``
    pieces ``(alpha, beta)`` (``alpha * x + beta``), read from the graph through nested ``torch.where`` /
    ``masked_fill`` on comparisons of ``x`` with numbers (a hand-written hardtanh); ``None`` otherwise."""
    ab = _unit_affine(it, a, x_node)
    if ab is not None:
        return [], [ab]
    a = _uncast(it, a)
    if depth > 16 or not isinstance(a, fx.Node) or a.op == "call_module":
        return None
    op, _ = it.registry.lookup(a, it.gm)
    if op is None or op.rule not in (_where, _masked_fill):
        return None
    cond, yes, no = _select_operands(a, op.rule)
    step = _step_of(it, cond, x_node)
    branches = [_unit_pieces(it, v, x_node, depth + 1) for v in (yes, no)]
    if step is None or None in branches:
        return None
    t, above = step
    upper, lower = branches if above else branches[::-1]
    thresholds = sorted({t, *upper[0], *lower[0]})
    pieces = []
    for k in range(len(thresholds) + 1):  # interval k lies above thresholds[k - 1]
        edge = thresholds[k - 1] if k else -math.inf
        br = upper if edge >= t else lower
        pieces.append(br[1][sum(1 for s in br[0] if s <= edge)])
    return thresholds, pieces


def _nested_select(it, node, x: _Aff, x_node: fx.Node):
    """The unit-wise piecewise-linear node of ``x`` that a nest of ``where``/``masked_fill`` ending at ``node``
    computes (:func:`_unit_pieces`), after checking that it is continuous at every breakpoint."""
    found = _unit_pieces(it, node, x_node)
    if found is None:
        return None
    thresholds, pieces = found
    feat = tuple(x.data.shape[2:])
    alpha = torch.stack([_per_unit_constant(node, it, p[0], feat).reshape(-1) for p in pieces])
    beta = torch.stack([_per_unit_constant(node, it, p[1], feat).reshape(-1) for p in pieces])
    for k, t in enumerate(thresholds):
        lo, hi = alpha[k] * t + beta[k], alpha[k + 1] * t + beta[k + 1]
        scale = lo.abs() + hi.abs() + abs(t) * (alpha[k].abs() + alpha[k + 1].abs())
        _refuse_jump(it, node, x_node, lo, hi, scale, f"{t:g}")
    return it._scalar_cpwl(_code_name(it, node), x, thresholds, alpha, beta)


def _step_select(it, node, cmp: _Comparison, yes: Any, no: Any):
    if _unit_affine(it, yes, cmp.x_node) is None or _unit_affine(it, no, cmp.x_node) is None:
        nested = _nested_select(it, node, cmp.x, cmp.x_node)
        if nested is not None:
            return nested
    mult, const = _where_pieces(it, node, cmp, yes, no)
    z = cmp.x.data.clone()
    z[:, 2] -= cmp.t
    return it._scalar_cpwl(_code_name(it, node), _Aff(z), [0.0], mult, const)


@REGISTRY.register(torch.where, kind="cpwl")
def _where(it, node, t, args, kwargs):
    """``torch.where(x > t, f(x), g(x))`` with ``f``, ``g`` unit-wise affine in ``x`` and equal at ``t``: one
    unit-wise piecewise-linear function of ``x`` (a leaky ReLU written by hand)."""
    cond = args[0]
    if not isinstance(cond, _Comparison):
        raise UnsupportedModelError(
            f"{describe(node, it.gm)}: the condition must compare an input-dependent tensor with a constant"
        )
    _, yes, no = _select_operands(node, _where)
    return _step_select(it, node, cond, yes, no)


@REGISTRY.register(torch.masked_fill, "masked_fill", "masked_fill_", kind="cpwl")
def _masked_fill(it, node, t, args, kwargs):
    """``h.masked_fill(h < t, v)``: ``torch.where(h < t, v, h)``."""
    mask = _arg(args, kwargs, 1, "mask")
    if not isinstance(mask, _Comparison):
        raise UnsupportedModelError(
            f"{describe(node, it.gm)}: the mask must compare an input-dependent tensor with a constant"
        )
    _, yes, no = _select_operands(node, _masked_fill)
    return _step_select(it, node, mask, yes, no)


def _windows_from_axes(feat_shape: tuple[int, ...], axes: list[torch.Tensor], device) -> tuple:
    """Flat input indices of every pooling window (``-1`` where it has no member) and the output feature shape,
    from each spatial axis's ``(out, k)`` input positions (out of range: no member)."""
    nd = len(axes)
    spatial = feat_shape[-nd:]
    lead = int(math.prod(feat_shape[:-nd]))
    idx = torch.arange(lead).view(lead, *[1] * (2 * nd)) * int(math.prod(spatial))
    valid = torch.ones((1,) * (2 * nd), dtype=torch.bool)
    step = int(math.prod(spatial))
    for ax, pos in enumerate(axes):
        step //= spatial[ax]
        shape = [1] * (2 * nd)
        shape[ax], shape[nd + ax] = pos.shape
        idx = idx + (pos.clamp(0, spatial[ax] - 1) * step).view(shape)
        valid = valid & ((pos >= 0) & (pos < spatial[ax])).view(shape)
    idx = torch.where(valid, idx, torch.full_like(idx, -1))  # (lead, *out, *kernel)
    k = int(math.prod(pos.shape[1] for pos in axes))
    return idx.reshape(-1, k).to(device), (*feat_shape[:-nd], *(pos.shape[0] for pos in axes))


# Spatial dims of every max-pooling op, module types and functions alike.
_POOL_DIMS = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.max_pool1d_with_indices: 1,
    F.max_pool2d_with_indices: 2,
    F.max_pool3d_with_indices: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _features(x: Any) -> tuple[int, ...]:
    """Per-sample feature shape of maps, dense (``_Aff``) or factored."""
    return tuple(x.data.shape[2:]) if isinstance(x, _Aff) else x.feat


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
    out_sp = _MAX_POOL[nd](torch.zeros(1, *feat_shape), k, s, p, d, ceil_mode).shape[-nd:]
    axes = [torch.arange(out_sp[a])[:, None] * s[a] - p[a] + torch.arange(k[a])[None, :] * d[a] for a in range(nd)]
    return _windows_from_axes(feat_shape, axes, device)


def _adaptive_windows(feat_shape: tuple[int, ...], output_size, nd: int, device) -> tuple:
    """Windows of adaptive max pooling: output cell ``i`` of an axis of ``L`` inputs covers
    ``[floor(i L / o), ceil((i + 1) L / o))``, as torch computes them."""
    sizes = tuple(output_size) if isinstance(output_size, (tuple, list)) else (output_size,) * nd
    axes = []
    for L, o in zip(feat_shape[-nd:], sizes, strict=True):
        o = L if o is None else int(o)
        i = torch.arange(o)
        start, end = (i * L) // o, ((i + 1) * L + o - 1) // o
        pos = start[:, None] + torch.arange(int((end - start).max()))[None, :]
        axes.append(torch.where(pos < end[:, None], pos, torch.full_like(pos, -1)))
    return _windows_from_axes(feat_shape, axes, device)


_WITH_INDICES = (F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices)


def _maxpool(it, name, x, kernel, stride, padding, dilation, ceil_mode, nd):
    windows, out_feat = _pool_windows(_features(x), kernel, stride, padding, dilation, ceil_mode, nd, it.dev)
    return it._max_windows(name, x, windows, out_feat)


@REGISTRY.register(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, kind="cpwl", windows=True, factored=True)
def _maxpool_module(it, node, m, args, kwargs):
    name, x = _cpwl_input(it, node, args)
    out = _maxpool(it, name, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, _POOL_DIMS[type(m)])
    return _max_result(it, node, out) if m.return_indices else out


@REGISTRY.register(
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, kind="cpwl", windows=True, factored=True
)
def _adaptive_maxpool_module(it, node, m, args, kwargs):
    f = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[_POOL_DIMS[type(m)]]
    return _f_adaptive_maxpool(it, node, f, (args[0], m.output_size, m.return_indices), {})


@REGISTRY.register(
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, kind="cpwl", windows=True, factored=True
)
def _f_adaptive_maxpool(it, node, t, args, kwargs):
    name, x = _cpwl_input(it, node, args)
    windows, out_feat = _adaptive_windows(_features(x), _arg(args, kwargs, 1, "output_size"), _POOL_DIMS[t], it.dev)
    out = it._max_windows(name, x, windows, out_feat)
    return _max_result(it, node, out) if _arg(args, kwargs, 2, "return_indices", False) else out


@REGISTRY.register(
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.max_pool1d_with_indices,  # what fx records for F.max_pool2d(..., return_indices=True)
    F.max_pool2d_with_indices,
    F.max_pool3d_with_indices,
    kind="cpwl",
    windows=True,
    factored=True,
)
def _f_maxpool(it, node, t, args, kwargs):
    name, x = _cpwl_input(it, node, args)
    k = _arg(args, kwargs, 1, "kernel_size")
    out = _maxpool(
        it,
        name,
        x,
        k,
        _arg(args, kwargs, 2, "stride", None),
        _arg(args, kwargs, 3, "padding", 0),
        _arg(args, kwargs, 4, "dilation", 1),
        _arg(args, kwargs, 5, "ceil_mode", False),
        _POOL_DIMS[t],
    )
    indices = t in _WITH_INDICES or _arg(args, kwargs, 6, "return_indices", False)
    return _max_result(it, node, out) if indices else out


@REGISTRY.register(Maxout, kind="cpwl", windows=True)
def _maxout(it, node, m, args, kwargs):
    name, x = _cpwl_input(it, node, args)
    feat = tuple(x.data.shape[2:])
    k = m.pool_size
    idx = torch.arange(math.prod(feat)).reshape(feat[0] // k, k, *feat[1:]).movedim(1, -1)
    out_feat = (feat[0] // k, *feat[1:])
    return it._max_windows(name, x, idx.reshape(-1, k).to(it.dev), out_feat)


def _reduce_max(it, name, node, x, dim, keepdim):
    """Max over per-sample dims ``dim`` (an int, several, or ``None`` for all) of ``x``'s maps."""
    feat = tuple(x.data.shape[2:])
    F_ = math.prod(feat)
    if dim is None:
        return it._max_windows(name, x, torch.arange(F_, device=it.dev)[None], ())
    full = [d % (len(feat) + 1) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))]
    if 0 in full:
        raise UnsupportedModelError(f"{describe(node, it.gm)} takes the max over the batch dimension")
    ds = sorted({d - 1 for d in full})  # per-sample dims
    idx = torch.arange(F_).reshape(feat).movedim(ds, list(range(len(feat) - len(ds), len(feat))))
    out_feat = list(idx.shape[: len(feat) - len(ds)])
    windows = idx.reshape(-1, math.prod(feat[d] for d in ds))
    if keepdim:
        for d in ds:
            out_feat.insert(d, 1)
    return it._max_windows(name, x, windows.to(it.dev), tuple(out_feat))


def _elementwise_max(it, name, a, b, minimum: bool):
    if not (isinstance(a, _Aff) and isinstance(b, _Aff)):
        const_a = not isinstance(a, _Aff)
        x, c = _broadcast_constant(b if const_a else a, a if const_a else b)
        cz = _constant_map(torch.broadcast_to(c, (1, *x.shape[2:]))[0])
        a, b = (cz, _Aff(x)) if const_a else (_Aff(x), cz)
    P = max(a.P, b.P)
    feat = torch.broadcast_shapes(a.data.shape[2:], b.data.shape[2:])
    da = a.data.expand(P, 3, *feat).reshape(P, 3, -1)
    db = b.data.expand(P, 3, *feat).reshape(P, 3, -1)
    sgn = -1.0 if minimum else 1.0
    both = _Aff(sgn * torch.cat([da, db], 2))
    n = da.shape[2]
    windows = torch.stack([torch.arange(n), torch.arange(n) + n], 1).to(it.dev)
    out = it._max_windows(name, both, windows, tuple(feat))
    return _Aff(sgn * out.data)


_MINIMA = (torch.minimum, torch.fmin, "minimum", "fmin", torch.min, torch.amin, "min", "amin")


@REGISTRY.register(
    torch.maximum,
    torch.minimum,
    torch.fmax,
    torch.fmin,
    "maximum",
    "minimum",
    "fmax",
    "fmin",
    kind="cpwl",
    windows=True,
)
def _maximum(it, node, t, args, kwargs):
    """Element-wise max/min of two tensors, either of which may be a constant (``fmax``/``fmin`` differ only on
    NaN)."""
    a, b = args[0], _arg(args, kwargs, 1, "other")
    return _elementwise_max(it, _code_name(it, node), a, b, minimum=t in _MINIMA)


@REGISTRY.register(
    torch.amax, torch.max, torch.amin, torch.min, "amax", "max", "amin", "min", kind="cpwl", windows=True
)
def _amax(it, node, t, args, kwargs):
    """``amax``/``max``/``amin``/``min`` over dims (or all); with a second tensor, ``torch.maximum``/``minimum``.

    A min is minus the max of minus its input; its codes are the argmin positions."""
    other = _arg(args, kwargs, 1, "other")
    if isinstance(other, (_Aff, torch.Tensor)):
        return _maximum(it, node, t, (args[0], other), {})
    name, x = _cpwl_input(it, node, args)
    minimum = t in _MINIMA
    dim = _arg(args, kwargs, 1, "dim", None)
    keepdim = _arg(args, kwargs, 2, "keepdim", False)
    return_tuple = t in (torch.max, torch.min, "max", "min") and dim is not None
    out = _reduce_max(it, name, node, _Aff(-x.data) if minimum else x, dim, keepdim)
    if minimum:
        out = _Aff(-out.data)
    return _max_result(it, node, out) if return_tuple else out
