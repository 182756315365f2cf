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


class TiedWeights(nn.Module):
    """Unregistered calls on parameters only (``.t()``, ``.exp()``, ``torch.tanh``): constants of the forward."""

    def __init__(self, noise: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(2, 8)
        self.log_gain = nn.Parameter(0.3 * torch.randn(8))
        self.mix = nn.Parameter(torch.randn(8, 8))
        self.out = nn.Linear(8, 1)
        self.noise = noise

    def forward(self, x):
        h = torch.relu(x @ self.enc.weight.t() * self.log_gain.exp() + self.enc.bias)
        h = torch.relu(h @ torch.tanh(self.mix))
        if self.noise:  # drawn at each call: not a constant
            h = h + 0.0 * torch.randn_like(self.log_gain)
        return self.out(h)


def test_calls_on_parameters_only_are_evaluated_as_constants():
    from oracles import f64_copy, full_exactness

    net = TiedWeights()
    kinds = tracing.classify_nodes(tracing.trace_model(engine._private_copy(net, torch.device("cpu"))))
    folded = sorted(n.name for n, k in kinds.items() if k == "constant")
    assert folded == ["exp", "t", "tanh"]

    def pattern(model64, slc, uv, input_shape=None):  # the functional ReLUs' signs, by hand
        x = slc.to_input(torch.as_tensor(uv))
        h1 = x @ model64.enc.weight.t() * model64.log_gain.exp() + model64.enc.bias
        h2 = torch.relu(h1) @ torch.tanh(model64.mix)
        return torch.cat([h1 > 0, h2 > 0], 1).numpy()

    part = compute_partition(net, SQ)
    full_exactness(part, f64_copy(net), SQ, pattern_fn=pattern, grid=100)
    # The same network written with registered layers only: the same regions.
    with torch.no_grad():
        ref = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU(), net.out)
        ref[0].weight.copy_(net.enc.weight * net.log_gain.exp()[:, None])
        ref[0].bias.copy_(net.enc.bias)
        ref[2].weight.copy_(torch.tanh(net.mix).t())
    assert part.num_regions == compute_partition(ref, SQ).num_regions > 8


def test_a_random_draw_in_the_forward_is_refused_and_the_rng_is_left_alone():
    net = TiedWeights(noise=True)
    state = torch.get_rng_state()
    with pytest.raises(UnsupportedModelError, match="function randn_like"):
        compute_partition(net, SQ)
    assert torch.equal(torch.get_rng_state(), state)


class DrawsWhileTracing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 4)

    def forward(self, x):
        return torch.relu(self.lin(x)).sum(1, keepdim=True) + 0.0 * torch.randn(1)  # runs once, at tracing


def test_tracing_leaves_the_rng_alone():
    net = DrawsWhileTracing()
    state = torch.get_rng_state()
    assert compute_partition(net, SQ).num_regions > 1
    assert torch.equal(torch.get_rng_state(), state)


class WeightDropout(nn.Module):
    """Dropout on a weight (DropConnect), with ``training=self.training`` or with F.dropout's default (True)."""

    def __init__(self, follows_mode: bool) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.lin, self.out, self.follows_mode = nn.Linear(2, 8), nn.Linear(8, 1), follows_mode

    def forward(self, x):
        if self.follows_mode:
            w = nn.functional.dropout(self.lin.weight, 0.5, training=self.training)
        else:
            w = nn.functional.dropout(self.lin.weight, 0.5)
        return self.out(torch.relu(nn.functional.linear(x, w, self.lin.bias)))


def test_dropout_on_a_weight_is_the_identity_in_eval_mode_or_refused_and_never_draws():
    net, random_net = WeightDropout(follows_mode=True), WeightDropout(follows_mode=False)
    ref = nn.Sequential(net.lin, nn.ReLU(), net.out)
    state = torch.get_rng_state()
    assert compute_partition(net, SQ, input_shape=(2,)).num_regions == compute_partition(ref, SQ).num_regions > 3
    with pytest.raises(UnsupportedModelError, match="drops units at random even in eval mode"):
        compute_partition(random_net, SQ, input_shape=(2,))
    assert torch.equal(torch.get_rng_state(), state)  # neither the probe forward nor the rule drew
