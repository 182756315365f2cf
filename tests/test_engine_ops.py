"""The op registry is the single source of supported ops: tracing classifies and the engine evaluates from it."""

import pytest
import torch
from oracles import square
from torch import nn

from splinecam_lightning import Slice, compute_partition, engine, tracing
from splinecam_lightning.errors import UnsupportedModelError
from splinecam_lightning.ops import KINDS, REGISTRY, OpRegistry

SQ = Slice.from_vertices(square(1.0))


def test_every_registered_op_has_a_kind_and_a_rule():
    tables = (REGISTRY.modules, REGISTRY.functions, REGISTRY.methods)
    ops = [op for table in tables for op in table.values()]
    assert len(ops) > 100
    assert {op.kind for op in ops} == set(KINDS)  # every kind is used, and nothing else
    for op in ops:
        assert callable(op.rule)
        assert not op.windows or op.kind == "cpwl"


def test_tracing_and_engine_keep_no_op_tables_of_their_own():
    tables = [n for n in vars(tracing) if n.endswith(("_MODULES", "_FUNCTIONS", "_METHODS"))]
    assert not tables
    assert not [n for n in vars(engine._Interpreter) if n.startswith("_do_")]


def test_registering_twice_or_an_unknown_kind_is_refused():
    reg = REGISTRY.copy()
    with pytest.raises(ValueError, match="already registered"):
        reg.register(nn.ReLU, kind="cpwl", rule=lambda *a: None)
    with pytest.raises(ValueError, match="kind"):
        reg.register(nn.Tanh, kind="smooth", rule=lambda *a: None)
    with pytest.raises(ValueError, match="already registered"):  # all or nothing
        reg.register(nn.Tanh, nn.ReLU, kind="cpwl", rule=lambda *a: None)
    with pytest.raises(TypeError, match="module types only"):
        reg.register(nn.Tanh, "tanh", kind="cpwl", rule=lambda *a: None, accepts=lambda m: True)
    assert nn.Tanh not in reg.modules and "tanh" not in reg.methods


class KinkAbs(nn.Module):
    """|x| written with an op the engine does not support (sign)."""

    def forward(self, x):
        return x * torch.sign(x)


class TorchAbs(nn.Module):
    def forward(self, x):
        return torch.abs(x)


def _net(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), act, nn.Linear(8, 1))
    return net


def _run(model: nn.Module, registry: OpRegistry):
    m = engine._private_copy(model, torch.device("cpu"))
    gm = tracing.trace_model(m, registry)
    kinds = tracing.classify_nodes(gm, registry)
    it = engine._Interpreter(
        gm, kinds, SQ, None, torch.device("cpu"), 10_000, torch.Generator().manual_seed(0), registry=registry
    )
    with torch.no_grad():
        out = it.run()
    return kinds, it, out


def test_one_registration_in_a_registry_copy_is_traced_classified_and_evaluated():
    with pytest.raises(UnsupportedModelError, match="function sign"):
        compute_partition(_net(KinkAbs()), SQ)

    reg = REGISTRY.copy()

    @reg.register(KinkAbs, kind="cpwl")
    def _kink_abs(it, node, m, args, kwargs):
        return it._scalar_cpwl(node.target, args[0], [0.0], [[-1.0], [1.0]], [[0.0], [0.0]])

    kinds, it, out = _run(_net(KinkAbs()), reg)
    assert [k for n, k in kinds.items() if n.op == "call_module"] == ["affine", "cpwl", "affine", "cpwl", "affine"]
    assert "3" in it.codes  # the registered layer, kept a leaf, refined the regions under its module path

    # Same regions and maps as the same network with the built-in torch.abs.
    _, ref_it, ref_out = _run(_net(TorchAbs()), REGISTRY)
    assert it.verts.shape == ref_it.verts.shape
    assert torch.equal(it.verts, ref_it.verts)
    assert torch.allclose(out.data, ref_out.data)

    # The copy left the shared registry alone.
    assert KinkAbs not in REGISTRY.modules
    with pytest.raises(UnsupportedModelError):
        compute_partition(_net(KinkAbs()), SQ)


def test_an_op_missing_from_the_registry_fails_at_classification_with_its_path():
    reg = REGISTRY.copy()
    del reg.modules[nn.ReLU]
    m = engine._private_copy(_net(TorchAbs()), torch.device("cpu"))
    gm = tracing.trace_model(m, reg)
    with pytest.raises(UnsupportedModelError, match="ReLU at '1'"):
        tracing.classify_nodes(gm, reg)
    assert tracing.classify_nodes(gm)  # the shared registry still has it
