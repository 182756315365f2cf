"""Turning a ``torch.nn.Module`` into a graph of affine and continuous piecewise-linear steps with ``torch.fx``.

This module only classifies; :mod:`splinecam_lightning.engine` evaluates. Both read the supported ops from
:data:`splinecam_lightning.ops.REGISTRY`. Every node of the traced graph gets a kind before any computation
starts, so an unsupported layer fails first, with its type and module path.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import operator
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from splinecam_lightning.errors import OutputChoiceError, UnsupportedModelError
from splinecam_lightning.ops import REGISTRY, OpRegistry, describe, draws_at_random

__all__ = [
    "UnsupportedModelError",
    "trace_model",
    "select_output",
    "check_output_choice",
    "classify_nodes",
    "mutates_input",
    "inplace_aliases",
]


_BUILT_IN_FORWARD = "<built in forward: "


class _Tracer(fx.Tracer):
    """Keeps torch.nn layers (and registered layers of our own, such as Maxout) as leaves so they are classified
    by type."""

    def __init__(self, registry: OpRegistry = REGISTRY, stack_traces: bool = False) -> None:
        super().__init__()
        self.registry = registry
        # Each node's line of code, to name an unsupported function where it is; costly (the first use imports
        # much of torch), so only when a trace already failed (see `trace_model`).
        self.record_stack_traces = stack_traces

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname.startswith(_BUILT_IN_FORWARD):
            return False  # traced through: its layers are the model's own, or it holds no state
        return self.registry.is_leaf(m) or super().is_leaf_module(m, qualname)

    def path_of_module(self, mod: nn.Module) -> str:
        try:
            return super().path_of_module(mod)
        except NameError:
            # A module made inside forward: a slice of a Sequential (`self.net[:-1](x)`) or a stateless layer
            # (`nn.ReLU()(h)`) is traced through; one with weights of its own is new on every call.
            if isinstance(mod, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or not any(
                True for _ in itertools.chain(mod.parameters(recurse=False), mod.buffers(recurse=False))
            ):
                return f"{_BUILT_IN_FORWARD}{type(mod).__name__}>"
            raise NameError(
                f"forward calls a {type(mod).__name__} that is not a submodule of the model (made inside forward?); "
                "layers with weights must be created in __init__"
            ) from None

    def trace(self, root, concrete_args=None) -> fx.Graph:
        with _sizes_as_proxies(self):
            return super().trace(root, concrete_args)


# Factories whose sizes come one by one (``torch.zeros(x.shape[0], 4)``): torch's argument parser refuses a Proxy
# there, though it accepts one inside a tuple (``torch.zeros((x.shape[0], 4))``). The same holds for a buffer's
# methods (``self.pos.expand(x.shape[0], -1)``): buffers are real tensors while tracing, parameters are not.
_SIZE_FACTORIES = ("zeros", "ones")
_BATCH_EXPANDERS = ("expand", "repeat")
_PATCHED = ((torch, _SIZE_FACTORIES), (torch.Tensor, _BATCH_EXPANDERS))
_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _sizes_as_proxies(tracer: fx.Tracer) -> Iterator[None]:
    """While tracing, record ``torch.zeros``/``torch.ones`` called with a traced size as one node of the original
    function with the sizes as a tuple, and a real tensor's ``expand``/``repeat`` with one as a method node on
    that tensor. Other calls go straight to torch (the patch is process-wide while it lasts, so it must not change
    them)."""

    def traced(fn):
        @functools.wraps(fn)
        def factory(*args, **kwargs):
            if any(isinstance(a, fx.Proxy) for a in (*args, *kwargs.values())):
                size = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)
                return tracer.create_proxy("call_function", fn, (size,), kwargs)
            return fn(*args, **kwargs)

        return factory

    def traced_method(name, fn):
        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            flat = [b for a in (*args, *kwargs.values()) for b in (a if isinstance(a, (tuple, list)) else (a,))]
            if any(isinstance(a, fx.Proxy) for a in flat):  # the sizes one by one or as a tuple
                return tracer.create_proxy("call_method", name, (self, *args), kwargs)  # self: a constant
            return fn(self, *args, **kwargs)

        return method

    with _PATCH_LOCK:
        originals = {(owner, name): getattr(owner, name) for owner, names in _PATCHED for name in names}
        try:
            for (owner, name), fn in originals.items():
                setattr(owner, name, traced(fn) if owner is torch else traced_method(name, fn))
            yield
        finally:
            for (owner, name), fn in originals.items():
                setattr(owner, name, fn)


def rng_kept() -> contextlib.AbstractContextManager:
    """Restores the global CPU (and current CUDA) random state afterwards: for running the user's forward code."""
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=cuda)


def trace_model(model: nn.Module, registry: OpRegistry = REGISTRY, stack_traces: bool = False) -> fx.GraphModule:
    """Trace ``model`` (already an eval-mode copy) with ``torch.fx``; ``stack_traces`` records each node's line
    of code (for error messages).

    Raises:
        UnsupportedModelError: tracing failed, e.g. because of data-dependent control flow.
    """
    # Tracing runs the forward's Python: a draw on constants (`torch.randn(4)`) runs too, and fx keeps its value
    # as a constant. It must not move the user's random streams.
    try:
        with rng_kept():
            graph = _Tracer(registry, stack_traces).trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        hint = (
            "Unpacking an input-dependent tensor or a tuple of them (e.g. `a, b = h.chunk(2, 1)`) cannot be "
            "traced: index it instead (`c = h.chunk(2, 1)`, then `c[0]`, `c[1]`)"
            if "iterated" in str(e)
            else "The forward must be a fixed graph of tensor operations: data-dependent control flow (`if "
            "x.sum() > 0`) and assignment into a tensor (`h[:, 0] = ...`) cannot be traced"
        )
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} with torch.fx: {type(e).__name__}: {e}. {hint}."
        ) from None
    return fx.GraphModule(model, graph)


def _what_it_returns(value) -> str:
    if hasattr(value, "_fields"):  # a namedtuple
        return f"a {type(value).__name__} with fields {', '.join(value._fields)}"
    if isinstance(value, dict):
        return f"a dict with keys {', '.join(repr(k) for k in value)}"
    if isinstance(value, (tuple, list)):
        n = len(value)
        return f"a {'tuple' if isinstance(value, tuple) else 'list'} of {n} value{'' if n == 1 else 's'}"
    return "a single value"


# Calls whose result is a tuple of tensors (``torch.split(h, 2, 1)``, ``h.max(1)``): an index picks one.
_TUPLE_CALLS = {"split", "chunk", "unbind", "tensor_split", "hsplit", "vsplit", "dsplit", "max", "min"}


def _is_tuple_call(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or name not in _TUPLE_CALLS:
        return False
    return name not in ("max", "min") or len(node.args) > 1 or "dim" in node.kwargs  # max(h) is one tensor


def check_output_choice(output: Any) -> None:
    """Raise :class:`OutputChoiceError` unless ``output`` is ``None``, an index or a key (not a bool)."""
    if output is not None and (isinstance(output, bool) or not isinstance(output, (int, str))):
        raise OutputChoiceError(f"output= must be None, an index or a key, got {output!r}")


def select_output(gm: fx.GraphModule, output: int | str | None) -> None:
    """Make ``gm`` return entry ``output`` (an index, a key or a namedtuple field) of the tuple, list or dict its
    forward returns (or of a tuple a call returns, ``return torch.split(h, 2, 1)``), and drop the nodes only the
    other entries used: they are neither computed nor required to be supported.

    Raises:
        OutputChoiceError: ``output`` is ``None`` and the forward returns several values, or ``output`` is given
            and names none of them (or the forward returns a single value).
    """
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    if isinstance(value, fx.Node) and value.op == "call_function" and hasattr(value.target, "_fields"):
        # fx records a namedtuple's construction as a call: rebuild it from the call's arguments
        value = value.target(*value.args, **value.kwargs)
    several = isinstance(value, (tuple, list, dict))
    if output is None:
        if several:
            first = repr(next(iter(value))) if isinstance(value, dict) and value else "0"
            raise OutputChoiceError(
                f"the model returns {_what_it_returns(value)}; pass output= to choose the one to partition "
                f"(e.g. output={first})"
            )
        return
    check_output_choice(output)
    if isinstance(value, fx.Node) and _is_tuple_call(value):
        if isinstance(output, str):
            raise OutputChoiceError(f"the model returns the tuple {describe(value, gm)} makes: choose by index")
        with gm.graph.inserting_after(value):
            chosen = gm.graph.call_function(operator.getitem, (value, output))
    elif not several:
        raise OutputChoiceError(
            f"output={output!r} chooses among the values a forward returns, but this model returns a single value"
        )
    else:
        if isinstance(value, dict) and output not in value and str(output) in value:
            output = str(output)  # the command line's --output 0 for the key "0"
        if isinstance(value, dict):
            found = output in value
        elif isinstance(output, str):
            found = output in getattr(value, "_fields", ())
        else:
            found = -len(value) <= output < len(value)
        if not found:
            raise OutputChoiceError(
                f"output={output!r} is not one of the model's outputs: it returns {_what_it_returns(value)}"
            )
        chosen = getattr(value, output) if isinstance(output, str) and not isinstance(value, dict) else value[output]
    if isinstance(chosen, (tuple, list, dict)):
        raise OutputChoiceError(
            f"output={output!r} chooses {_what_it_returns(chosen)}, not one tensor: a nested choice is not supported"
        )
    out.args = (chosen,)
    _drop_unused(gm)


def _drop_unused(gm: fx.GraphModule) -> None:
    """Erase the nodes the output does not depend on, and the submodules and root attributes only they used.

    An in-place change (``h.relu_()``, ``v.mul_(2)`` on a view ``v`` of ``h``) is kept, whether or not its result
    is used, when a kept node after it reads the changed memory: the tensor, an alias, or a tensor sharing memory
    with it through views (:func:`classify_nodes` then checks it as for the whole model). fx's own dead-code
    elimination would drop it."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changes = [n for n, same in inplace_aliases(gm).items() if n is not same[0]]
    live: set[fx.Node] = set()
    todo = [n for n in gm.graph.nodes if n.op in ("output", "placeholder")]
    while True:
        while todo:
            n = todo.pop()
            if n not in live:
                live.add(n)
                todo.extend(n.all_input_nodes)
        todo = [m for m in changes if m not in live and _read_later(m, live, order, gm)]
        if not todo:
            break
    for n in reversed(list(gm.graph.nodes)):
        if n not in live:
            gm.graph.erase_node(n)
    gm.delete_all_unused_submodules()
    used = {n.target.split(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [*gm._parameters, *gm._buffers]:
        if name not in used:
            delattr(gm, name)
    gm.recompile()


def _read_later(change: fx.Node, live: set[fx.Node], order: dict[fx.Node, int], gm: fx.GraphModule) -> bool:
    """Whether a live node after the in-place ``change`` reads memory it changes: its tensor, or any tensor
    linked to that one by linear ops that may share memory (views, reshapes, slices), up or down."""
    family, todo = set(), [change.args[0], change]
    while todo:
        t = todo.pop()
        if t in family:
            continue
        family.add(t)
        if _node_kind(t, gm) == "linear" and _shares_memory(t) and t.args and isinstance(t.args[0], fx.Node):
            todo.append(t.args[0])
        todo.extend(u for u in t.users if mutates_input(u, gm) or (_node_kind(u, gm) == "linear" and _shares_memory(u)))
    return any(u in live and order[u] > order[change] for t in family for u in t.users)


_INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


@functools.cache
def _inplace_position(fn) -> int | None:
    """Position of ``fn``'s ``inplace`` parameter (``F.relu(x, inplace)``), if it has one."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature take no inplace flag
        return None
    return names.index("inplace") if "inplace" in names else None


def mutates_input(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` changes its first argument in place (``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``,
    ``x.relu_()``, ``x += 1``): every later use of that argument then reads the node's result."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":  # x.relu_(), x.__imul__(2)
        t = node.target
        return (t.endswith("_") and not t.endswith("__")) or (t.startswith("__i") and t.endswith("__"))
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):  # torch.relu_, F.hardtanh_
            return True
        if "inplace" in node.kwargs:
            return bool(node.kwargs["inplace"])
        pos = _inplace_position(node.target)
        return pos is not None and len(node.args) > pos and bool(node.args[pos])
    return False


def inplace_aliases(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """The tensors changed in place: for the tensor itself and every in-place node on it, the one shared list
    ``[tensor, in-place nodes in graph order]``. An in-place op returns the tensor it changed, so
    ``h.relu_().mul_(2)`` changes ``h`` twice, and every name of ``h`` reads the last change."""
    aliases: dict[fx.Node, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if mutates_input(n, gm):
            root = aliases[n.args[0]][0] if n.args[0] in aliases else n.args[0]
            aliases[n] = aliases.setdefault(root, [root])
            aliases[n].append(n)
    return aliases


def _shares_memory(node: fx.Node) -> bool:
    """Whether ``node``'s result may share memory with its first input: the linear ops (views, reshapes,
    slices and identities among them), except a clone."""
    return node.target not in ("clone", torch.clone)


def _check_inplace(
    node: fx.Node, same: list[fx.Node], kinds: dict[fx.Node, str], order: dict[fx.Node, int], gm: fx.GraphModule
) -> None:
    """An in-place change is followed for the changed tensor and its in-place aliases ``same`` (one tensor), not
    through other tensors that may share its memory: those must not be read after the change.

    Such tensors are the ones a linear op (a possible view) made the changed tensor from, and the ones linear ops
    made from it before the change."""
    shared: list[fx.Node] = []
    up = same[0]
    while kinds.get(up) == "linear" and _shares_memory(up) and isinstance(up.args[0], fx.Node):
        up = up.args[0]
        shared.append(up)
    todo = [u for n in same for u in n.users if order[u] < order[node]]
    while todo:
        u = todo.pop()
        if u not in same and kinds.get(u) == "linear" and _shares_memory(u):
            shared.append(u)
            todo.extend(w for w in u.users if order[w] < order[node])
    if any(order[w] > order[node] for t in shared for w in t.users):
        raise UnsupportedModelError(
            f"{describe(node, gm)} changes a tensor in place that shares memory with another one used after it (a "
            "view, slice or reshape); use the out-of-place form (e.g. `h = torch.relu(h)`)"
        )


def _is_trailing(node: fx.Node, registry: OpRegistry) -> bool:
    """True when every path from ``node`` reaches the output through output transforms only."""
    for user in node.users:
        if user.op == "output":
            continue
        if _node_kind(user, None, registry) != "output_transform":
            return False
        if not _is_trailing(user, registry):
            return False
    return True


def _node_kind(node: fx.Node, gm: fx.GraphModule | None, registry: OpRegistry = REGISTRY) -> str:
    """The node's kind from the registry (``unsupported`` when none); without ``gm``, every module is ``module``."""
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    if node.op == "call_module" and gm is None:
        return "module"
    if node.op not in ("call_module", "call_function", "call_method"):
        return "unsupported"
    op, _ = registry.lookup(node, gm)
    return "unsupported" if op is None else op.kind


def _constant_foldable(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether an unregistered call may run as Python runs it when none of its inputs depends on the model's
    input (``x @ self.weight.t()``, ``self.log_scale.exp()``): it then computes the same constant every time."""
    if node.op not in ("call_function", "call_method", "call_module") or mutates_input(node, gm):
        return False
    return not draws_at_random(node)


def classify_nodes(gm: fx.GraphModule, registry: OpRegistry = REGISTRY) -> dict[fx.Node, str]:
    """Kind of every node; raises on the first unsupported one, before any computation.

    Kinds: ``placeholder``, ``get_attr``, ``output``, ``linear``, ``affine``, ``arith``, ``cpwl``,
    ``output_transform`` (a trailing Softmax/LogSoftmax/Sigmoid, skipped) and ``constant`` (an unregistered call
    on values that do not depend on the input, evaluated as is).
    """
    kinds: dict[fx.Node, str] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise UnsupportedModelError("the model's forward takes no input")
    for n in placeholders[1:]:
        if not n.args:  # extra inputs without defaults cannot be sliced
            raise UnsupportedModelError(
                f"the model's forward takes more than one input ('{placeholders[0].name}', '{n.name}'); "
                "wrap it so that it takes a single tensor"
            )
    depends = {placeholders[0]}
    for node in gm.graph.nodes:
        if any(i in depends for i in node.all_input_nodes):
            depends.add(node)
        kind = _node_kind(node, gm, registry)
        if kind == "unsupported" and node not in depends and _constant_foldable(node, gm):
            kind = "constant"
        if kind == "unsupported":
            raise UnsupportedModelError(
                f"unsupported operation: {describe(node, gm)}. Only affine layers and continuous piecewise-linear "
                "activations (ReLU, LeakyReLU, PReLU, ReLU6/Hardtanh, abs, max pooling, maxout) are exact"
            )
        if kind == "output_transform" and not _is_trailing(node, registry):
            raise UnsupportedModelError(
                f"{describe(node, gm)} is not piecewise linear; it is only allowed as the model's final output "
                "transform, where it is skipped"
            )
        kinds[node] = kind
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node, same in inplace_aliases(gm).items():
        if node is not same[0]:
            _check_inplace(node, same, kinds, order, gm)
    return kinds
