"""Turning a ``torch.nn.Module`` into a graph of affine and continuous piecewise-linear steps with ``torch.fx``.

This module only classifies; :mod:`splinecam_lightning.engine` evaluates. Both read the supported ops from
:data:`splinecam_lightning.ops.REGISTRY`. Every node of the traced graph gets a kind before any computation
starts, so an unsupported layer fails first, with its type and module path.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from splinecam_lightning.errors import UnsupportedModelError
from splinecam_lightning.ops import REGISTRY, OpRegistry, describe

__all__ = ["UnsupportedModelError", "trace_model", "classify_nodes"]


class _Tracer(fx.Tracer):
    """Keeps torch.nn layers (and registered layers of our own, such as Maxout) as leaves so they are classified
    by type."""

    def __init__(self, registry: OpRegistry = REGISTRY) -> None:
        super().__init__()
        self.registry = registry

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self.registry.is_leaf(m) or super().is_leaf_module(m, qualname)


def trace_model(model: nn.Module, registry: OpRegistry = REGISTRY) -> fx.GraphModule:
    """Trace ``model`` (already an eval-mode copy) with ``torch.fx``.

    Raises:
        UnsupportedModelError: tracing failed, e.g. because of data-dependent control flow.
    """
    try:
        graph = _Tracer(registry).trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} with torch.fx: {type(e).__name__}: {e}. Data-dependent control "
            "flow (e.g. `if x.sum() > 0`) is not supported; the network must be a fixed graph of layers."
        ) from None
    return fx.GraphModule(model, graph)


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


def classify_nodes(gm: fx.GraphModule, registry: OpRegistry = REGISTRY) -> dict[fx.Node, str]:
    """Kind of every node; raises on the first unsupported one, before any computation.

    Kinds: ``placeholder``, ``get_attr``, ``output``, ``linear``, ``affine``, ``arith``, ``cpwl`` and
    ``output_transform`` (a trailing Softmax/LogSoftmax/Sigmoid, skipped).
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
    for node in gm.graph.nodes:
        kind = _node_kind(node, gm, registry)
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
    return kinds
