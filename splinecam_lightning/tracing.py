"""Turning a ``torch.nn.Module`` into a graph of affine and continuous piecewise-linear steps with ``torch.fx``.

This module only classifies; :mod:`splinecam_lightning.engine` evaluates. Every node of the traced graph gets a
kind before any computation starts, so an unsupported layer fails first, with its type and module path.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from splinecam_lightning.errors import UnsupportedModelError
from splinecam_lightning.layers import Maxout

__all__ = ["UnsupportedModelError", "trace_model", "classify_nodes"]


# Modules whose forward is linear in the input (no bias term): applied directly to the stacked maps.
LINEAR_MODULES: tuple[type[nn.Module], ...] = (
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.Upsample,  # every interpolation mode is linear in the input
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
)
# Affine modules with a bias-like term, handled one by one in the engine.
AFFINE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
)
CPWL_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.MaxPool1d,
    nn.MaxPool2d,
    Maxout,
)
# Monotone output transforms: they move neither the argmax nor the 0.5 level, so a trailing one is skipped.
OUTPUT_MODULES: tuple[type[nn.Module], ...] = (nn.Softmax, nn.LogSoftmax, nn.Sigmoid)

LINEAR_FUNCTIONS = {
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
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    torch.cat,
    torch.concat,
    torch.stack,
    torch.flip,
    torch.roll,
    F.interpolate,
    operator.getitem,
    getattr,
    F.pad,
}
ARITH_FUNCTIONS = {
    operator.floordiv,  # shape arithmetic, e.g. ``x.shape[1] // 2``; refused on input-dependent tensors
    operator.mod,
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.iadd,
    operator.isub,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.neg,
}
AFFINE_FUNCTIONS = {F.linear, F.conv1d, F.conv2d}
CPWL_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.hardtanh,
    torch.clamp,
    torch.clip,
    torch.abs,
    F.max_pool1d,
    F.max_pool2d,
    torch.amax,
    torch.max,
    torch.maximum,
    torch.minimum,
}
OUTPUT_FUNCTIONS = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, torch.sigmoid, F.sigmoid}

LINEAR_METHODS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "mean",
    "sum",
    "size",
    "dim",
    "float",
    "double",
    "to",
    "type_as",
    "flip",
    "roll",
}
ARITH_METHODS = {"add", "sub", "mul", "div", "neg", "__add__", "__sub__", "__mul__", "__neg__"}
CPWL_METHODS = {"relu", "abs", "clamp", "clip", "amax", "max"}
OUTPUT_METHODS = {"softmax", "log_softmax", "sigmoid"}


class _Tracer(fx.Tracer):
    """Keeps torch.nn layers (and our Maxout) as leaves so they are classified by type."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Maxout) or super().is_leaf_module(m, qualname)


def trace_model(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` (already an eval-mode copy) with ``torch.fx``.

    Raises:
        UnsupportedModelError: tracing failed, e.g. because of data-dependent control flow.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} with torch.fx: {type(e).__name__}: {e}. Data-dependent control "
            "flow (e.g. `if x.sum() > 0`) is not supported; the network must be a fixed graph of layers."
        ) from None
    return fx.GraphModule(model, graph)


def _is_trailing(node: fx.Node) -> bool:
    """True when every path from ``node`` reaches the output through output transforms only."""
    for user in node.users:
        if user.op == "output":
            continue
        if _node_kind(user, None) != "output_transform":
            return False
        if not _is_trailing(user):
            return False
    return True


def _node_kind(node: fx.Node, gm: fx.GraphModule | None) -> str:
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    if node.op == "call_module":
        if gm is None:
            return "module"
        m = gm.get_submodule(node.target)
        if isinstance(m, OUTPUT_MODULES):
            return "output_transform"
        if isinstance(m, LINEAR_MODULES):
            return "linear"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.running_mean is None or m.running_var is None):
            return "unsupported"
        if isinstance(m, AFFINE_MODULES):
            return "affine"
        if isinstance(m, CPWL_MODULES):
            return "cpwl"
        return "unsupported"
    if node.op == "call_function":
        t = node.target
        if t in OUTPUT_FUNCTIONS:
            return "output_transform"
        if t in LINEAR_FUNCTIONS:
            return "linear"
        if t in ARITH_FUNCTIONS:
            return "arith"
        if t in AFFINE_FUNCTIONS:
            return "affine"
        if t in CPWL_FUNCTIONS:
            return "cpwl"
        return "unsupported"
    if node.op == "call_method":
        t = node.target
        if t in OUTPUT_METHODS:
            return "output_transform"
        if t in LINEAR_METHODS:
            return "linear"
        if t in ARITH_METHODS:
            return "arith"
        if t in CPWL_METHODS:
            return "cpwl"
        return "unsupported"
    return "unsupported"


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    """Human-readable name of a node: module type and path, function or method name."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        why = ""
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            why = " with track_running_stats=False (it normalises with batch statistics, not a fixed affine map)"
        return f"{type(m).__name__} at '{node.target}'{why}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)} (node '{node.name}')"
    return f"method .{node.target}() (node '{node.name}')"


def classify_nodes(gm: fx.GraphModule) -> dict[fx.Node, str]:
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
        kind = _node_kind(node, gm)
        if kind == "unsupported":
            raise UnsupportedModelError(
                f"unsupported operation: {describe(node, gm)}. Only affine layers and continuous piecewise-linear "
                "activations (ReLU, LeakyReLU, PReLU, ReLU6/Hardtanh, abs, max pooling, maxout) are exact"
            )
        if kind == "output_transform" and not _is_trailing(node):
            raise UnsupportedModelError(
                f"{describe(node, gm)} is not piecewise linear; it is only allowed as the model's final output "
                "transform, where it is skipped"
            )
        kinds[node] = kind
    return kinds
