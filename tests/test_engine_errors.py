"""Unsupported layers fail first and name the layer; bad input gets ValueError; the user's model is untouched."""

import time

import pytest
import torch
import torch.nn.functional as F
from oracles import mlp, square
from torch import nn

import splinecam_lightning
from splinecam_lightning import Slice, compute_partition

SQ = Slice.from_vertices(square(1.0))


class Wrapper(nn.Module):
    def __init__(self, bad: nn.Module, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, width), nn.ReLU(), bad, nn.Linear(width, 1))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize(
    "bad,name",
    [
        (nn.GELU(), "GELU"),
        (nn.SiLU(), "SiLU"),
        (nn.Tanh(), "Tanh"),
        (nn.LayerNorm(8), "LayerNorm"),
        (nn.ELU(), "ELU"),
        (nn.Softplus(), "Softplus"),
    ],
)
def test_unsupported_module_named_with_path(bad, name):
    with pytest.raises(Exception, match=name) as ei:
        compute_partition(Wrapper(bad), SQ)
    assert "body.2" in str(ei.value)
    assert isinstance(ei.value, (TypeError, ValueError))


@pytest.mark.parametrize("bad,name", [(nn.GELU(), "GELU"), (nn.Tanh(), "Tanh")])
def test_unsupported_fails_before_any_work(bad, name):
    """A wide net before the bad layer would exceed max_regions: the layer error must come first."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module(
        "net", nn.Sequential(nn.Linear(2, 2000), nn.ReLU(), nn.Linear(2000, 2000), nn.ReLU(), bad, nn.Linear(2000, 1))
    )
    t = time.perf_counter()
    with pytest.raises(Exception, match=name) as ei:
        compute_partition(model, Slice.from_vertices(square(3.0)), max_regions=50)
    assert "net.4" in str(ei.value)
    assert "max_regions" not in str(ei.value)
    assert time.perf_counter() - t < 5.0


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        h = self.proj(x)[:, None, :]
        h = self.attn(h, h, h)[0]
        return self.out(h[:, 0])


def test_attention_rejected():
    with pytest.raises(Exception, match="MultiheadAttention") as ei:
        compute_partition(Attn(), SQ)
    assert "attn" in str(ei.value)


class ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 1), nn.Linear(2, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


def test_data_dependent_control_flow_rejected():
    with pytest.raises((TypeError, ValueError)) as ei:
        compute_partition(ControlFlow(), SQ)
    assert len(str(ei.value)) > 20


class FunctionalTanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_unsupported_function_named():
    with pytest.raises((TypeError, ValueError), match="(?i)tanh"):
        compute_partition(FunctionalTanh(), SQ)


class FunctionalDropout(nn.Module):
    def __init__(self, call):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.call = nn.Linear(2, 8), nn.Linear(8, 1), call

    def forward(self, x):
        return self.b(self.call(self, torch.relu(self.a(x))))


@pytest.mark.parametrize(
    "call, refused",
    [
        (lambda m, h: F.dropout(h, 0.5), True),  # training defaults to True: random in eval mode too
        (lambda m, h: F.dropout(h, p=0.2, training=True), True),
        (lambda m, h: F.dropout(h, 0.5, training=m.training), False),
        (lambda m, h: F.dropout2d(h[:, :, None, None], 0.5, m.training).flatten(1), False),
        (lambda m, h: F.alpha_dropout(h, 0.5), False),  # its training defaults to False
        (lambda m, h: F.feature_alpha_dropout(h, 0.5, True), True),
        (lambda m, h: F.dropout(h, 0.0), False),  # p=0 drops nothing
    ],
)
def test_functional_dropout_active_in_eval_mode_is_refused(call, refused):
    net = FunctionalDropout(call)
    if refused:
        with pytest.raises(
            splinecam_lightning.UnsupportedModelError, match="at random even in eval mode.*training=self"
        ):
            compute_partition(net, SQ)
    else:
        ref = compute_partition(nn.Sequential(net.a, nn.ReLU(), net.b), SQ)
        assert compute_partition(net, SQ).num_regions == ref.num_regions > 5


class Mul(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(2, 4), nn.Linear(2, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.c(self.a(x) * self.b(x))  # product of two inputs: quadratic, not CPWL


def test_product_of_activations_rejected():
    with pytest.raises((TypeError, ValueError)):
        compute_partition(Mul(), SQ)


# ------------------------------------------------------------------------------------------ slices
@pytest.mark.parametrize(
    "V,word",
    [
        ([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], "collinear"),
        ([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], "repeated"),
        ([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], ""),
        ([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "coplanar"),
        ([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]], "collinear"),
        ([[0.0, 0.0], [1.0, 0.0], [2.0, 1e-15]], ""),
    ],
)
def test_degenerate_slices(V, word):
    with pytest.raises(ValueError, match=word or None):
        Slice.from_vertices(torch.tensor(V))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_slice(bad):
    V = square(1.0).clone()
    V[2, 1] = bad
    with pytest.raises(ValueError):
        Slice.from_vertices(V)
    with pytest.raises(ValueError):
        Slice.through_points(torch.zeros(5), torch.ones(5), torch.tensor([0.0, 1.0, bad, 0.0, 0.0]))


def test_through_points_collinear():
    with pytest.raises(ValueError):
        Slice.through_points(torch.zeros(4), torch.ones(4), 2 * torch.ones(4))


def test_slice_dimension_mismatch():
    model = mlp([3, 4, 1], 0)
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        compute_partition(model, SQ)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["weight0", "bias_last", "bn_var", "bn_mean"])
def test_nonfinite_weights(bad, where):
    model = nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1)).eval()
    with torch.no_grad():
        if where == "weight0":
            model[0].weight[1, 0] = bad
        elif where == "bias_last":
            model[3].bias[0] = bad
        elif where == "bn_var":
            model[1].running_var[2] = bad
        else:
            model[1].running_mean[2] = bad
    with pytest.raises(ValueError):
        compute_partition(model, SQ)


# ------------------------------------------------------------------------------------------ max_regions
def test_max_regions_exceeded():
    model = mlp([2, 100, 1], 0)  # about 1 + 100 + ~2000 regions on [-1,1]^2
    with pytest.raises(Exception, match="max_regions") as ei:
        compute_partition(model, SQ, max_regions=200)
    assert isinstance(ei.value, splinecam_lightning.TooManyRegionsError)
    assert isinstance(ei.value, RuntimeError)
    assert compute_partition(model, SQ, max_regions=10**6).num_regions > 200


def test_max_regions_stops_early():
    """A huge deep net must fail fast, long before it would finish (or run out of memory)."""
    model = mlp([2, 1024, 1024, 1024, 1], 0)
    t = time.perf_counter()
    with pytest.raises(Exception, match="max_regions"):
        compute_partition(model, Slice.from_vertices(square(5.0)), max_regions=2000)
    assert time.perf_counter() - t < 20.0


def test_max_regions_exact_limit_ok():
    model = mlp([2, 8, 1], 0)
    n = compute_partition(model, SQ).num_regions
    assert compute_partition(model, SQ, max_regions=n).num_regions == n
    with pytest.raises(Exception, match="max_regions"):
        compute_partition(model, SQ, max_regions=n - 1)


# ------------------------------------------------------------------------------------------ model untouched
def _snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
        "devices": {k: v.device for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "req": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        "grad_id": {n: id(p.grad) for n, p in model.named_parameters()},
        "param_id": {n: id(p) for n, p in model.named_parameters()},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        },
        "class": {n: type(m) for n, m in model.named_modules()},
    }


def _assert_same(model, snap):
    now = _snapshot(model)
    for k in snap["state"]:
        assert torch.equal(now["state"][k], snap["state"][k]), f"{k} changed"
        assert now["dtypes"][k] == snap["dtypes"][k], f"{k} dtype changed"
        assert now["devices"][k] == snap["devices"][k], f"{k} device changed"
    for key in ("training", "req", "grad_id", "param_id", "hooks", "class"):
        assert now[key] == snap[key], key
    for n, g in snap["grad"].items():
        if g is None:
            assert now["grad"][n] is None, n
        else:
            assert torch.equal(now["grad"][n], g), n


def _bn_model(mode):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Sequential(nn.Linear(16, 16), nn.PReLU()),
        nn.Linear(16, 3),
    )
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    model.train(mode == "train")
    if mode == "mixed":
        model.train()
        model[1].eval()
        model[4].eval()
    return model


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
@pytest.mark.parametrize("with_grad", [False, True])
def test_model_unchanged(mode, with_grad):
    model = _bn_model(mode)
    model[0].weight.requires_grad_(False)
    if with_grad:
        model(torch.randn(4, 2)).sum().backward()
    snap = _snapshot(model)
    part = compute_partition(model, SQ)
    assert part.num_regions > 1
    _assert_same(model, snap)
    assert next(model.parameters()).dtype == torch.float32


def test_model_unchanged_after_error():
    model = _bn_model("train")
    snap = _snapshot(model)
    with pytest.raises(Exception, match="max_regions"):
        compute_partition(model, Slice.from_vertices(square(50.0)), max_regions=3)
    _assert_same(model, snap)


def test_float64_and_float16_models_unchanged():
    for dt in (torch.float64, torch.bfloat16):
        model = mlp([2, 8, 8, 1], 0).to(dt)
        snap = _snapshot(model)
        part = compute_partition(model, SQ)
        assert part.vertices.dtype == torch.float64
        _assert_same(model, snap)


def test_global_rng_and_grad_mode_untouched():
    model = mlp([2, 8, 1], 0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    grad_enabled = torch.is_grad_enabled()
    compute_partition(model, SQ)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.is_grad_enabled() == grad_enabled


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_without_running_stats_rejected(mode):
    """BatchNorm with track_running_stats=False always normalises with batch statistics: not affine per sample.

    The error must name the module and its path, not blame the input shape.
    """
    model = Wrapper(nn.BatchNorm1d(8, track_running_stats=False))
    model.train(mode == "train")
    with pytest.raises((TypeError, ValueError), match="BatchNorm1d") as ei:
        compute_partition(model, SQ)
    assert "body.2" in str(ei.value)


def test_input_shape_mismatch_is_value_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 1))
    slc = Slice.around(torch.zeros(16), 1.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        compute_partition(model, slc, input_shape=(1, 5, 5))  # 25 != 16


def test_explicit_cpu_device_same_result():
    model = mlp([2, 16, 16, 1], 0)
    p0 = compute_partition(model, SQ)
    for dev in ("cpu", torch.device("cpu")):
        p = compute_partition(model, SQ, device=dev)
        assert p.num_regions == p0.num_regions
        assert torch.allclose(p.areas.sort().values, p0.areas.sort().values, rtol=1e-12, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_unchanged_and_result_on_cpu():
    model = _bn_model("train").cuda()
    snap = _snapshot(model)
    part = compute_partition(model, SQ)
    _assert_same(model, snap)
    assert part.vertices.device.type == "cpu" and part.vertices.dtype == torch.float64
    ref = compute_partition(_bn_model("train"), SQ)
    assert part.num_regions == ref.num_regions


class _SlicedSequential(nn.Module):
    """Layers called through modules made inside forward: a slice of a Sequential and a stateless ReLU."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
        self.how = how

    def forward(self, x):
        if self.how == "slice":
            return self.net[-1](self.net[:-1](x))
        if self.how == "stateless":
            return self.net[2](nn.ReLU()(self.net[0](x)))
        return nn.Linear(8, 1)(F.relu(self.net[0](x)))  # new random weights on every call


@pytest.mark.parametrize("how", ["slice", "stateless"])
def test_modules_made_in_forward_without_weights_are_traced_through(how):
    from oracles import f64_copy, full_exactness, hook_pattern

    net = _SlicedSequential(how)
    slc = Slice.from_vertices(square(2.0))
    part = compute_partition(net, slc)
    assert part.num_regions == compute_partition(net.net, slc).num_regions
    inner = f64_copy(net.net)  # the same units; a ReLU made in forward has no hook to read its pattern from

    def pattern(model64, slc, uv, input_shape=None):
        return hook_pattern(inner, slc, uv, input_shape)

    full_exactness(part, f64_copy(net), slc, pattern_fn=pattern)


def test_a_layer_with_weights_made_in_forward_is_named():
    with pytest.raises(splinecam_lightning.UnsupportedModelError, match="Linear that is not a submodule.*__init__"):
        compute_partition(_SlicedSequential("weights"), Slice.from_vertices(square(2.0)))


def test_an_unsupported_function_is_named_with_its_line_of_code():
    class Tanh(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 4)

        def forward(self, x):
            return torch.tanh(self.lin(x)).sum(1, keepdim=True)

    with pytest.raises(
        splinecam_lightning.UnsupportedModelError, match=r"tanh.*test_engine_errors\.py:\d+: return torch\.tanh"
    ):
        compute_partition(Tanh(), Slice.from_vertices(square(2.0)))
