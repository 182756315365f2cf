"""Every supported layer kind gets its own exactness test (tiling, forward agreement, one pattern, grid)."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracles import f64_copy, forward, full_exactness, mlp, square
from torch import nn

from splinecam_lightning import Slice, compute_partition, prepare_model


def _slice2d(r=1.5):
    return Slice.from_vertices(square(r))


def _slice_nd(D, seed, radius):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(D, generator=g, dtype=torch.float64)
    return Slice.around(x0, radius=radius, generator=g)


def run_exact(model, slc, input_shape=None, pattern_fn=None, distinct=True, grid=100, min_regions=2):
    part = compute_partition(model, slc, input_shape=input_shape)
    assert part.num_regions >= min_regions, part.num_regions
    full_exactness(part, f64_copy(model), slc, input_shape, pattern_fn, distinct, grid)
    return part


def _randomize_bn(bn, g):
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) * 2 + 0.2)
        bn.weight.copy_(torch.randn(bn.weight.shape, generator=g))
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.3)
        bn.num_batches_tracked.fill_(17)


SEEDS = [0, 1]


# ------------------------------------------------------------------------------------------ affine layers
@pytest.mark.parametrize("seed", SEEDS)
def test_linear(seed):
    run_exact(mlp([2, 20, 20, 2], seed), _slice2d())


@pytest.mark.parametrize("seed", SEEDS)
def test_conv1d(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3),
        nn.ReLU(),
        nn.Conv1d(4, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 1),
    )
    run_exact(model, _slice_nd(20, seed, 1.5), input_shape=(2, 10))


@pytest.mark.parametrize("seed", SEEDS)
def test_conv2d(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    run_exact(model, _slice_nd(36, seed, 1.5), input_shape=(1, 6, 6))


@pytest.mark.parametrize("seed", SEEDS)
def test_batchnorm1d_uses_running_stats_in_train_mode(seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)
    )
    _randomize_bn(model[1], g)
    _randomize_bn(model[4], g)
    model.train()
    before = copy.deepcopy(model.state_dict())
    part = run_exact(model, _slice2d())
    assert model.training and model[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed: BN running statistics must not be updated"
    # and the partition is not the one of the train-mode (batch statistics) function
    assert part.num_regions > 1


@pytest.mark.parametrize("seed", SEEDS)
def test_batchnorm2d_uses_running_stats_in_train_mode(seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    _randomize_bn(model[1], g)
    model.train()
    before = copy.deepcopy(model.state_dict())
    run_exact(model, _slice_nd(36, seed, 1.0), input_shape=(1, 6, 6))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("seed", SEEDS)
def test_avgpool2d(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(27, 1))
    run_exact(model, _slice_nd(36, seed, 1.5), input_shape=(1, 6, 6))


@pytest.mark.parametrize("seed", SEEDS)
def test_adaptive_avgpool2d_uneven_windows(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(3),
        nn.Flatten(),
        nn.Linear(27, 4),
        nn.ReLU(),
        nn.Linear(4, 1),
    )
    run_exact(model, _slice_nd(49, seed, 1.5), input_shape=(1, 7, 7))


@pytest.mark.parametrize("seed", SEEDS)
def test_flatten_dropout_identity_nested_sequential_train_mode(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(2, 12), nn.ReLU()),
        nn.Sequential(nn.Identity(), nn.Dropout(0.5), nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Dropout(0.2))),
        nn.Flatten(),
        nn.Linear(12, 1),
    )
    model.train()  # dropout must act as identity, as in eval
    part = run_exact(model, _slice2d())
    ref = compute_partition(f64_copy(model), _slice2d())
    assert part.num_regions == ref.num_regions
    assert model.training


# ------------------------------------------------------------------------------------------ CPWL layers
@pytest.mark.parametrize("seed", SEEDS)
def test_maxpool2d(seed):
    """Max pooling of conv outputs (no ties): patterns include the argmax in each window."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(18, 1),
    )
    run_exact(model, _slice_nd(36, seed, 1.5), input_shape=(1, 6, 6))


@pytest.mark.parametrize("seed", SEEDS)
def test_maxpool2d_after_relu_and_overlapping_windows(seed):
    """conv -> ReLU -> MaxPool(3, stride 2): tied zeros after ReLU and overlapping windows."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2),
        nn.Flatten(),
        nn.Linear(8, 1),
    )
    run_exact(model, _slice_nd(36, seed, 1.5), input_shape=(1, 6, 6), pattern_fn=_relu_maxpool_pattern)


def _relu_maxpool_pattern(m64, slc, uv, input_shape):
    """ReLU signs plus the argmax of each window, where a window of tied zeros counts as one code (-1)."""
    x = slc.to_input(torch.as_tensor(uv, dtype=torch.float64)).reshape(-1, *input_shape)
    with torch.no_grad():
        z = m64[0](x)
        v, i = F.max_pool2d(torch.relu(z), 3, 2, return_indices=True)
    i = torch.where(v > 0, i, torch.full_like(i, -1))
    return torch.cat([(z > 0).reshape(len(x), -1).long(), i.reshape(len(x), -1)], 1).numpy()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "act", [lambda: nn.LeakyReLU(0.1), lambda: nn.LeakyReLU(-0.5), lambda: nn.PReLU(), lambda: nn.PReLU(12)]
)
def test_relu_like(act, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 12), act(), nn.Linear(12, 12), act(), nn.Linear(12, 1))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.randn(m.weight.shape) * 0.5)
    run_exact(model, _slice2d())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("act", [lambda: nn.ReLU6(), lambda: nn.Hardtanh(-0.5, 0.8), lambda: nn.Hardtanh()])
def test_clamp_like(act, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 12), act(), nn.Linear(12, 12), act(), nn.Linear(12, 1))
    lo, hi = model[1].min_val, model[1].max_val
    with torch.no_grad():
        model[0].weight.mul_(3 * max(abs(lo), abs(hi)))
        model[0].bias.mul_(3 * max(abs(lo), abs(hi)))
    slc = _slice2d()
    # the pre-activations must actually reach both saturation levels on the domain
    from oracles import grid_in_domain

    pts, keep, _ = grid_in_domain(slc, 50)
    z = f64_copy(model)[0](torch.as_tensor(pts[keep]))
    assert (z > hi).any() and (z < lo).any()
    run_exact(model, slc)


class _CrossedClamp(nn.Module):
    """``torch.clamp`` with ``min > max``, which torch defines as ``max`` everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b, self.out = nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 6), nn.Linear(6, 1)

    def forward(self, x):
        return self.out(torch.clamp(self.b(self.act(self.a(x))), 0.5, -0.5))


def test_clamp_with_min_above_max_is_its_max():
    torch.manual_seed(0)
    model = _CrossedClamp()
    part = run_exact(model, _slice2d())  # the ReLU's regions, and the constant output on each
    assert list(part.codes) == ["act"]
    assert torch.equal(part.jacobians, torch.zeros_like(part.jacobians))


class AbsNet(nn.Module):
    def __init__(self, method=False):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(2, 10), nn.Linear(10, 10), nn.Linear(10, 1)
        self.act = nn.ReLU()
        self.method = method

    def forward(self, x):
        z = self.l1(x)
        h = z.abs() if self.method else torch.abs(z)
        return self.l3(self.act(self.l2(h)))


def _abs_pattern(m64, slc, uv, input_shape=None):
    x = slc.to_input(torch.as_tensor(uv, dtype=torch.float64))
    with torch.no_grad():
        z1 = m64.l1(x)
        z2 = m64.l2(z1.abs())
    return torch.cat([(z1 > 0).long(), (z2 > 0).long()], 1).numpy()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", [False, True])
def test_torch_abs(method, seed):
    torch.manual_seed(seed)
    run_exact(AbsNet(method), _slice2d(), pattern_fn=_abs_pattern)


class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(2, 10), nn.Linear(10, 10), nn.Linear(10, 1)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(F.relu(self.l1(x)))))


def _frelu_pattern(m64, slc, uv, input_shape=None):
    x = slc.to_input(torch.as_tensor(uv, dtype=torch.float64))
    with torch.no_grad():
        z1 = m64.l1(x)
        z2 = m64.l2(torch.relu(z1))
    return torch.cat([(z1 > 0).long(), (z2 > 0).long()], 1).numpy()


@pytest.mark.parametrize("seed", SEEDS)
def test_functional_relu(seed):
    torch.manual_seed(seed)
    run_exact(FunctionalReLU(), _slice2d(), pattern_fn=_frelu_pattern)


# ------------------------------------------------------------------------------------------ graph structure
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(2, 12)
        self.f = nn.Sequential(nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12))
        self.act = nn.ReLU()
        self.out = nn.Linear(12, 1)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.f(h)
        return self.out(self.act(h))


@pytest.mark.parametrize("seed", SEEDS)
def test_residual(seed):
    torch.manual_seed(seed)
    run_exact(Residual(), _slice2d())


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.la, self.lb = nn.Linear(2, 8), nn.Linear(2, 6)
        self.ra, self.rb, self.r3 = nn.ReLU(), nn.LeakyReLU(0.2), nn.ReLU()
        self.mid = nn.Linear(16, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        h = torch.cat([self.ra(self.la(x)), self.rb(self.lb(x)), x], dim=1)
        return self.out(self.r3(self.mid(h)))


@pytest.mark.parametrize("seed", SEEDS)
def test_torch_cat(seed):
    torch.manual_seed(seed)
    run_exact(Cat(), _slice2d())


class BasicBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()  # reused twice, as in torchvision

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.block = BasicBlock(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.parametrize("seed", SEEDS)
def test_small_resnet_block(seed):
    torch.manual_seed(seed)
    model = TinyResNet()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomize_bn(m, g)
    model.train()
    before = copy.deepcopy(model.state_dict())
    part = run_exact(model, _slice_nd(192, seed, 0.6), input_shape=(3, 8, 8), grid=80, min_regions=5)
    assert part.output_dim == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(m.training for m in model.modules())


def test_input_shape_matters():
    """A conv net on flat points needs ``input_shape``; its result maps exactly through the reshape."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 1))
    slc = _slice_nd(50, 0, 1.0)
    part = compute_partition(model, slc, input_shape=(2, 5, 5))
    y = forward(f64_copy(model), slc, part.centroids, (2, 5, 5))
    assert torch.allclose(part.evaluate(part.centroids), y, atol=1e-10 * (1 + y.abs().max()))
    assert np.isfinite(part.areas.numpy()).all()


# ------------------------------------------------------------------------------------------ internals
@pytest.mark.parametrize("pieces", ["relu", "hardtanh", "prelu"])
def test_linear_from_parents_matches_dense(pieces, monkeypatch):
    """A Linear layer after a unit-wise activation shares one dense product per parent region; the rank-one
    corrections for the units that differ between sibling regions give the same maps as the dense product."""
    import splinecam_lightning.engine as engine
    from splinecam_lightning.engine import _Masked

    monkeypatch.setattr(engine, "_SHARED_MIN_WORK", 0)  # small enough to share here

    g = torch.Generator().manual_seed(0)
    R, P, F_, O = 7, 40, 12, 5
    M = torch.randn(R, 3, F_, generator=g, dtype=torch.float64)
    parent = torch.cat([torch.arange(R), torch.randint(0, R - 1, (P - R,), generator=g)])  # parent R-1: 1 child
    parent = parent[torch.randperm(P, generator=g)]
    n = {"relu": 2, "hardtanh": 3, "prelu": 2}[pieces]
    code = torch.randint(0, n, (P, F_), generator=g).to(torch.int8)
    if pieces == "relu":
        mult, const = torch.tensor([[0.0], [1.0]]), torch.zeros(2, 1)
    elif pieces == "hardtanh":
        mult, const = torch.tensor([[0.0], [1.0], [0.0]]), torch.tensor([[-1.0], [0.0], [1.0]])
    else:
        mult, const = torch.stack([torch.rand(F_, generator=g), torch.ones(F_)]), torch.zeros(2, 1)
    mult = mult.double().expand(-1, F_).contiguous()
    const = const.double().expand(-1, F_).contiguous()
    m = _Masked(M, parent, code, mult, const, (F_,))
    W = torch.randn(O, F_, generator=g, dtype=torch.float64)
    b = torch.randn(O, generator=g, dtype=torch.float64)
    dense = F.linear(m.materialize().data, W, b)
    dense = torch.stack([dense[:, 0] - b, dense[:, 1] - b, dense[:, 2]], 1)  # bias on the value row only
    got = m.linear(W, b).data
    assert torch.allclose(got, dense, rtol=0, atol=1e-12)
    chunk = m.take(torch.arange(0, P, 3))  # a chunk: some parents have no region in it
    assert torch.allclose(chunk.linear(W, b).data, dense[::3], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 3, 3, padding=1),
        nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(2, 0), dilation=(2, 1), groups=2),
        nn.Conv1d(4, 2, 5, stride=3, padding=4, bias=False),
        nn.Conv3d(4, 2, 2, padding=1),
    ],
    ids=["2d", "2d-strided-grouped", "1d", "3d"],
)
def test_convolution_from_parents_matches_dense(conv):
    """A convolution after a unit-wise activation runs densely on one region per parent; each sibling adds the
    convolution's response to the units where its pieces differ. That equals the dense convolution."""
    from splinecam_lightning.engine import _Masked
    from splinecam_lightning.ops import conv_add_units, conv_by_units

    assert conv_by_units(conv)
    conv = conv.double()
    g = torch.Generator().manual_seed(0)
    feat = (4,) + (5,) * (conv.weight.dim() - 2)
    F_ = math.prod(feat)
    R, P = 6, 30
    M = torch.randn(R, 3, F_, generator=g, dtype=torch.float64)
    parent = torch.cat([torch.arange(R), torch.randint(0, R - 1, (P - R,), generator=g)])
    parent = parent[torch.randperm(P, generator=g)]
    ref = torch.randint(0, 2, (R, F_), generator=g)
    flip = torch.rand(P, F_, generator=g) < 0.05  # siblings differ from one another in a few units
    code = (ref[parent] ^ flip).to(torch.int8)
    mult = torch.tensor([[0.1], [1.0]], dtype=torch.float64).expand(-1, F_).contiguous()  # LeakyReLU
    const = torch.zeros(2, F_, dtype=torch.float64)
    m = _Masked(M, parent, code, mult, const, feat)

    def dense(x: _Masked) -> torch.Tensor:
        d = x.materialize().data
        out = conv(d.flatten(0, 1)).unflatten(0, (-1, 3))
        if conv.bias is not None:
            out[:, :2] -= conv.bias.view(-1, *([1] * (out.dim() - 3)))  # bias on the value row only
        return out

    with torch.no_grad():
        want = dense(m)
        got = m.by_parents(
            dense, lambda out, pi, fi, v: conv_add_units(out, pi, fi, v, conv, feat), sibling_work=1 << 30, unit_work=1
        )
    assert got is not None  # shared, not the dense fallback
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def _sorted_maps(p) -> torch.Tensor:
    """Every region's affine map as one row, rows in lexicographic order (chunks may reorder regions)."""
    rows = torch.cat([p.jacobians.flatten(1), p.offsets.flatten(1)], 1)
    order = np.lexsort(rows.round(decimals=8).numpy().T[::-1])
    return rows[torch.as_tensor(order)]


def test_convolutions_after_activations_share_work_between_siblings_exactly(monkeypatch):
    """End to end: a ReLU -> Conv -> ReLU -> Conv net, with the sharing forced on, is exact and gives the same
    partition as without it."""
    import splinecam_lightning.engine as engine
    from splinecam_lightning import ops

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 2),
    )  # fmt: skip
    slc = _slice_nd(36, 3, 0.6)
    calls = []
    real = ops.conv_add_units
    monkeypatch.setattr(ops, "conv_add_units", lambda *a: calls.append(a[1].numel()) or real(*a))
    monkeypatch.setattr(engine, "_SHARED_MIN_WORK", 0)
    shared = run_exact(model, slc, input_shape=(1, 6, 6), min_regions=50)
    assert sum(calls) > 0
    whole_work = engine.WORK_BYTES
    monkeypatch.setattr(engine, "WORK_BYTES", 1 << 17)  # in chunks too: some parents lose their siblings
    chunked = compute_partition(model, slc, input_shape=(1, 6, 6))
    assert chunked.num_regions == shared.num_regions
    assert _sorted_maps(chunked).sub(_sorted_maps(shared)).abs().max() < 1e-10
    monkeypatch.setattr(engine, "WORK_BYTES", whole_work)
    monkeypatch.setattr(engine, "_SHARED_MIN_WORK", 1 << 62)
    calls.clear()
    plain = compute_partition(model, slc, input_shape=(1, 6, 6))
    assert not calls
    assert plain.num_regions == shared.num_regions
    assert torch.allclose(plain.jacobians, shared.jacobians, rtol=0, atol=1e-10)
    assert torch.allclose(plain.offsets, shared.offsets, rtol=0, atol=1e-10)


def test_batchnorm_after_a_convolution_is_folded_into_it_and_stays_exact():
    """prepare_model folds a BatchNorm into the convolution it follows (one affine layer on every region's
    maps instead of two); the partition stays exact against the unfolded model. A convolution called twice, or
    one whose output has another user, keeps its BatchNorm."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.c2, self.b2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
            self.shared, self.b3, self.b4 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)
            self.fc = nn.Linear(3 * 36, 2)
            self.r = nn.ModuleList(nn.ReLU() for _ in range(4))  # modules: the oracle's patterns come from hooks

        def forward(self, x):
            x = self.r[0](self.b1(self.c1(x)))
            y = self.c2(x)
            x = self.r[1](self.b2(y)) + y  # c2's output has two users: b2 stays
            x = self.r[2](self.b3(self.shared(x)))
            x = self.r[3](self.b4(self.shared(x)))  # `shared` is called twice: b3 and b4 stay
            return self.fc(x.flatten(1))

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = Net()
    for bn in (model.b1, model.b2, model.b3, model.b4):
        _randomize_bn(bn, g)
    model.eval()
    prep = prepare_model(model, input_shape=(1, 6, 6))
    left = [n.target for n in prep.graph_module.graph.nodes if n.op == "call_module" and n.target.startswith("b")]
    assert left == ["b2", "b3", "b4"]
    assert isinstance(model.b1, nn.BatchNorm2d) and model.c1.bias is not None  # the caller's model is untouched
    run_exact(model, _slice_nd(36, 0, 4.0), input_shape=(1, 6, 6), min_regions=20)


@pytest.mark.parametrize("act", [nn.ReLU, lambda: nn.LeakyReLU(0.2), lambda: nn.Hardtanh(-0.3, 0.4)])
def test_max_pooling_reads_an_activation_factored_and_matches_materialized(act, monkeypatch):
    """Max pooling after a unit-wise activation reads its maps factored (rows and window members gathered on
    demand, pieces with slopes and constants): the partition is exact and the same as from materialized maps."""
    from splinecam_lightning import ops

    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1),
        act(),
        nn.MaxPool2d(3, stride=1),
        nn.Flatten(),
        nn.Linear(4, 1),
    )
    slc = _slice_nd(36, 3, 1.5)
    reads = []
    orig = ops.REGISTRY.modules[nn.MaxPool2d]
    rule = orig.rule

    def spy(it, node, m, args, kwargs):
        reads.append(type(args[0]).__name__)
        return rule(it, node, m, args, kwargs)

    monkeypatch.setitem(ops.REGISTRY.modules, nn.MaxPool2d, ops.Op(orig.kind, spy, orig.windows, orig.accepts, True))
    factored = compute_partition(model, slc, input_shape=(1, 6, 6))
    assert reads == ["_Masked", "_Masked"]
    full_exactness(factored, f64_copy(model), slc, (1, 6, 6), distinct=False, grid=80)
    monkeypatch.setitem(ops.REGISTRY.modules, nn.MaxPool2d, ops.Op(orig.kind, spy, orig.windows, orig.accepts, False))
    dense = compute_partition(model, slc, input_shape=(1, 6, 6))
    assert reads[2:] == ["_Aff", "_Aff"]
    assert dense.num_regions == factored.num_regions > 10
    assert _sorted_maps(dense).sub(_sorted_maps(factored)).abs().max() < 1e-10
    for name in dense.codes:
        assert torch.equal(dense.codes[name].sort(0).values, factored.codes[name].sort(0).values)
    # In chunks of regions (each chunk's factored maps taken from the whole's): the same partition.
    import splinecam_lightning.engine as engine

    monkeypatch.setitem(ops.REGISTRY.modules, nn.MaxPool2d, ops.Op(orig.kind, spy, orig.windows, orig.accepts, True))
    monkeypatch.setattr(engine, "WORK_BYTES", 1 << 17)
    reads.clear()
    chunked = compute_partition(model, slc, input_shape=(1, 6, 6))
    assert len(reads) > 2 and set(reads) == {"_Masked"}  # max pooling ran once per chunk, factored
    assert chunked.num_regions == factored.num_regions
    assert _sorted_maps(chunked).sub(_sorted_maps(factored)).abs().max() < 1e-10


@pytest.mark.parametrize(
    ("act", "grouped"),
    [(nn.ReLU, True), (lambda: nn.Hardtanh(-0.3, 0.4), True), (lambda: nn.LeakyReLU(-0.5), False)],
)
@pytest.mark.parametrize("first", [True, False])  # one map for every region, or one per parent
def test_window_pretest_by_groups_keeps_the_pairs(act, grouped, first, monkeypatch):
    """Max pooling after a nondecreasing activation settles windows once per group of nearby regions from one
    parent: the pairs left for refinement are exactly those found region by region. A decreasing piece
    (negative leaky slope) keeps the region-by-region test."""
    from splinecam_lightning import refine

    torch.manual_seed(5)
    head = [] if first else [nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
    model = nn.Sequential(
        *head,
        nn.Conv2d(1 if first else 3, 4, 3, padding=1),
        act(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(36 if first else 4, 1),
    )
    slc = _slice_nd(36, 5, 1.5)
    orig, calls = refine.WindowFamily.initial_pairs, []

    def both_ways(fam, vertices, root):
        q, w = orig(fam, vertices, root)
        by_group = fam._grouped_pairs(vertices, refine._centre_radius(vertices)[0], root)
        calls.append(by_group is not None)
        monkeypatch.setattr(fam, "_grouped_pairs", lambda *a: None)
        q0, w0 = orig(fam, vertices, root)
        assert q.numel() > 0 and torch.equal(q, q0) and torch.equal(w, w0)
        return q, w

    monkeypatch.setattr(refine.WindowFamily, "initial_pairs", both_ways)
    monkeypatch.setattr(refine, "_GROUPS_MAX", 1.0)  # this small net splits few regions per parent
    part = compute_partition(model, slc, input_shape=(1, 6, 6))
    assert calls == [grouped]
    full_exactness(part, f64_copy(model), slc, (1, 6, 6), distinct=False, grid=80)


def test_max_pool_with_every_window_settled_by_groups():
    """Each window's first member wins everywhere by a wide margin: the by-group pre-test settles every pair and
    leaves no window to cut."""
    torch.manual_seed(0)
    lin = nn.Linear(2, 16)
    with torch.no_grad():
        lin.bias.mul_(0.3)
        lin.bias[[0, 2, 8, 10]] = 100.0
    model = nn.Sequential(lin, nn.Unflatten(1, (1, 4, 4)), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 1))
    slc = Slice.from_vertices(square(1.0))
    part = compute_partition(model, slc)
    assert part.num_regions > 8
    full_exactness(part, f64_copy(model), slc, distinct=False, grid=80)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=1)])  # disjoint and overlapping windows
def test_windows_cut_by_one_line_join_a_line_arrangement(pool, monkeypatch):
    """Windows with two competing members over a region are cut together in one line arrangement; the rest go
    to rounds. The partition is the one that rounds alone give."""
    from splinecam_lightning import refine

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), pool, nn.Flatten(), nn.LazyLinear(1))
    model(torch.zeros(1, 1, 6, 6))
    slc = _slice_nd(36, 7, 2.0)
    orig, seen = refine.WindowFamily.two_member_lines, []

    def spy(fam, *a):
        out = orig(fam, *a)
        seen.append((int(out[0].sum()), int((~out[0]).sum())))
        return out

    monkeypatch.setattr(refine.WindowFamily, "two_member_lines", spy)
    part = compute_partition(model, slc, input_shape=(1, 6, 6))
    assert seen and seen[0][0] > 20 and seen[0][1] > 0  # both paths ran
    full_exactness(part, f64_copy(model), slc, (1, 6, 6), distinct=False, grid=80)

    def none(fam, vertices, root, q, item):
        ok, lines, tol = orig(fam, vertices, root, q, item)
        return torch.zeros_like(ok), lines, tol

    monkeypatch.setattr(refine.WindowFamily, "two_member_lines", none)
    rounds = compute_partition(model, slc, input_shape=(1, 6, 6))
    assert rounds.num_regions == part.num_regions
    assert torch.allclose(rounds.areas.sort().values, part.areas.sort().values, rtol=1e-9, atol=1e-15)
    assert _sorted_maps(rounds).sub(_sorted_maps(part)).abs().max() < 1e-10
