"""Exactness for maxout, element-wise max/min, clamp variants and functional forms.

Check used throughout: at random points strictly inside every region, the model's own float64 forward pass
equals the region's affine map. A breakpoint missed inside a region makes that fail on the part beyond it.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splinecam_lightning.ops as ops
from splinecam_lightning import Maxout, Slice, UnsupportedModelError, compute_partition

SQ = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)


def assert_affine_inside(net, p, input_shape=None, per_region=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    R, K, _ = p.vertices.shape
    w = torch.rand(R, per_region, K, generator=g, dtype=torch.float64) + 1e-3
    w = w * (torch.arange(K)[None, None, :] < p.counts[:, None, None])
    w = w / w.sum(-1, keepdim=True)
    uv = torch.einsum("rnk,rkd->rnd", w, p.vertices).reshape(-1, 2)
    region = torch.arange(R).repeat_interleave(per_region)
    x = p.slice.to_input(uv)
    if input_shape is not None:
        x = x.reshape(-1, *input_shape)
    ref = copy.deepcopy(net).double().eval()
    with torch.no_grad():
        y = ref(x).reshape(len(uv), -1)
    y_hat = p.evaluate(uv, region)
    scale = y.abs().max().clamp(min=1.0)
    assert (y - y_hat).abs().max() / scale < 1e-9
    assert abs(float(p.areas.sum()) - p.slice.area) / p.slice.area < 1e-9


class MaxoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 24)
        self.m = Maxout(3)
        self.b = nn.Linear(8, 12)
        self.m2 = Maxout(4)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.m2(self.b(self.m(self.a(x)))))


class MaxMinNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 8)
        self.b = nn.Linear(2, 8)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        h1 = torch.maximum(self.a(x), self.b(x))
        h2 = torch.minimum(self.a(x), 0.5 * self.b(x))
        return self.out(torch.cat([h1, h2], 1))


class AmaxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 12)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        h = self.a(x).view(x.shape[0], 4, 3)
        return self.out(torch.amax(h, dim=2)) + self.out(h.max(dim=-1).values)


class ClampNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 10)
        self.b = nn.Linear(10, 10)
        self.out = nn.Linear(30, 1)

    def forward(self, x):
        h = self.a(x)
        c1 = torch.clamp(h, min=-0.2)
        c2 = h.clamp(max=0.3)
        c3 = torch.clamp(self.b(F.relu(h)), -0.1, 0.1)
        return self.out(torch.cat([c1, c2, c3], dim=1))


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 12)
        self.b = nn.Linear(12, 12)
        self.c = nn.Linear(12, 3)

    def forward(self, x):
        h = F.leaky_relu(self.a(x), 0.2)
        h = F.hardtanh(self.b(h), -0.5, 0.7) + F.relu6(3 * h) - h.abs() / 2
        return self.c(torch.relu(h) - 0.1)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lift = nn.Linear(2, 16)
        self.conv = nn.Conv1d(1, 3, 3, padding=1)
        self.pool = nn.MaxPool1d(2)
        self.out = nn.Linear(24, 2)

    def forward(self, x):
        h = self.lift(x).unsqueeze(1)
        return self.out(torch.flatten(self.pool(F.relu(self.conv(h))), 1))


class CapturedBatchNet(nn.Module):
    """The batch size read once at the top of ``forward`` and used after the activations split the slice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 12)
        self.b = nn.Linear(4, 6)
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        B = x.shape[0]
        n = x.size(0)
        h = F.relu(self.a(x)).view(B, 4, 3).amax(2)
        return self.out(F.relu(self.b(h)).reshape((n, 2, 3)).reshape(B, -1))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cls", [MaxoutNet, MaxMinNet, AmaxNet, ClampNet, FunctionalNet, Conv1dNet, CapturedBatchNet])
def test_layer_exact(cls, seed):
    torch.manual_seed(seed)
    net = cls()
    p = compute_partition(net, Slice.from_vertices(2 * SQ))
    assert p.num_regions > 1
    assert_affine_inside(net, p)


def test_maxpool_ceil_mode_and_padding():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(2, 2 * 5 * 5),
        nn.Unflatten(1, (2, 5, 5)),
        nn.MaxPool2d(2, stride=2, padding=1, ceil_mode=True),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 1),
    )
    p = compute_partition(net, Slice.from_vertices(2 * SQ))
    assert_affine_inside(net, p)


def test_cnn_with_input_shape_and_float32_model():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(3, 64, generator=g)
    pts = pts.mean(0) + 0.3 * (pts - pts.mean(0))  # a smaller triangle: ~9k regions instead of ~40k
    p = compute_partition(net, Slice.through_points(*pts), input_shape=(1, 8, 8))
    assert p.num_regions > 10
    assert all(len(torch.unique(c, dim=0)) > 1 for c in p.codes.values())  # ReLUs and max pooling all split
    assert_affine_inside(net, p, input_shape=(1, 8, 8))
    assert next(net.parameters()).dtype == torch.float32


class CapturedShapeCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.out = nn.Linear(64, 2)

    def forward(self, x):
        B, C, H, W = x.shape
        return self.out(F.relu(self.conv(x)).reshape(B, -1))


def test_batch_size_unpacked_from_the_input_shape():
    torch.manual_seed(0)
    net = CapturedShapeCnn()
    slc = Slice.around(torch.randn(32, dtype=torch.float64), 1.0, generator=torch.Generator().manual_seed(0))
    p = compute_partition(net, slc, input_shape=(2, 4, 4))
    assert p.num_regions > 10
    assert_affine_inside(net, p, input_shape=(2, 4, 4))


class UpsampleNet(nn.Module):
    """Conv autoencoder-style net: ConvTranspose, Upsample, interpolate, constant padding, stack, flip, roll."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.dec = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.pad = nn.ConstantPad2d(1, 0.25)
        self.t1 = nn.ConvTranspose1d(2, 2, 3, padding=1)
        self.out = nn.Linear(2 * 18 * 18 + 2 * 2 * 8 + 2 * 16, 2)

    def forward(self, x):
        h = F.relu(self.enc(x))  # (3, 4, 4)
        d = F.leaky_relu(self.dec(h), 0.1)  # (2, 8, 8)
        u = self.pad(self.up(d))  # (2, 18, 18)
        near = F.interpolate(d[:, :, :4, :4], scale_factor=2, mode="nearest")  # (2, 8, 8)
        s = torch.stack([near.flatten(2)[:, :, :8], torch.flip(d, dims=[3]).flatten(2)[:, :, :8]], dim=1)
        r = torch.roll(F.relu(self.t1(d.mean(2))), 1, dims=2)  # (2, 8)
        z = torch.cat([u.flatten(1), s.flatten(1), F.pad(r, (4, 4), value=-0.5).flatten(1)], 1)
        z = z + torch.stack([z, -z], dim=-1).amax(-1) * 0.5  # negative stack dim, then max over it
        return self.out(z)


def test_convolutions_in_sub_batches_give_the_same_partition(monkeypatch):
    """Convolutions run in sub-batches (their unfolded work buffer is bounded): one sample per call changes
    nothing (Conv2d, ConvTranspose2d, ConvTranspose1d)."""
    torch.manual_seed(1)
    net = UpsampleNet()
    g = torch.Generator().manual_seed(1)
    sl = Slice.around(torch.randn(64, generator=g), 2.0, generator=g)
    whole = compute_partition(net, sl, input_shape=(1, 8, 8))
    monkeypatch.setitem(ops._CONV_WORK_BYTES, "cpu", 1)
    monkeypatch.setattr(ops, "_DENSE_MAX_BYTES", 0)  # no dense matrices: sub-batches everywhere
    calls = []
    real = ops._conv_in_batches
    monkeypatch.setattr(
        ops,
        "_conv_in_batches",
        lambda conv, x, w, direct=None, key=None: calls.append(x.shape[0]) or real(conv, x, w, direct, key),
    )
    single = compute_partition(net, sl, input_shape=(1, 8, 8))
    assert max(calls) > 3  # per-region maps went through a convolution one sample at a time
    assert single.num_regions == whole.num_regions > 50
    assert single.codes.keys() == whole.codes.keys()
    for k in whole.codes:
        assert torch.equal(single.codes[k], whole.codes[k])
    torch.testing.assert_close(single.jacobians, whole.jacobians)
    torch.testing.assert_close(single.vertices, whole.vertices)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2)),
        dict(kernel_size=1, stride=2, bias=False),
        dict(kernel_size=5, padding=2, stride=3),
        dict(kernel_size=3, padding=(2, 1), dilation=(2, 1)),
    ],
)
@pytest.mark.parametrize("size", [(5, 6), (12, 10)])  # small maps: one product over samples (if deep); larger: torch's
@pytest.mark.parametrize("work_bytes", [1, 1 << 20])
def test_conv2d_written_in_place_equals_torch_conv(monkeypatch, kw, size, work_bytes):
    """On the CPU, plain 2-D convolutions write each sub-batch straight into the output. On small maps they
    are one matrix product over several samples (equal to torch's convolution up to rounding); on larger ones
    torch's own kernel (equal bit for bit), in sub-batches of one sample or several."""
    torch.manual_seed(0)
    m = nn.Conv2d(16, 6, **kw).double()
    x = torch.randn(37, 32, *size, dtype=torch.float64)[:, 1::2]  # a strided view: every other channel
    monkeypatch.setitem(ops._CONV_WORK_BYTES, "cpu", work_bytes)
    with torch.no_grad():
        direct = ops._conv2d_direct(x, m.weight, m.stride, m.padding, m.dilation, m.groups)
        ref = m._conv_forward(x, m.weight, None)
        deep = m.weight[0].numel() >= ops._GEMM_MIN_INNER  # in-channels x kernel
        small = ref[0, 0].numel() <= ops._GEMM_MAX_POSITIONS and deep
        if not small and m.dilation != (1, 1):
            assert direct is None  # torch's dilated convolution has its own path
            return
        assert direct is not None and (direct.step is not None) == small
        got = ops._conv_in_batches(lambda x: m._conv_forward(x, m.weight, None), x, m.weight, direct)
        copied = ops._conv_in_batches(lambda x: m._conv_forward(x, m.weight, None), x, m.weight)
    if small:
        assert direct.step > 1  # several samples per product
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
    else:
        assert torch.equal(got, copied)
    assert ops._conv2d_direct(x, torch.ones(6, 8, 3, 3, dtype=x.dtype), groups=2) is None  # torch's own path
    assert ops._conv2d_direct(x, m.weight.detach()) is None  # gradients on: out= takes no autograd


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv2d(8, 16, 3, padding=1), (8, 4, 4)),
        (nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), (4, 5, 6)),
        (nn.Conv2d(6, 4, 3, padding=1, groups=2, padding_mode="reflect"), (6, 4, 4)),
        (nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular"), (3, 3, 4)),
        (nn.Conv1d(4, 8, 3, padding=1), (4, 6)),
        (nn.Conv3d(2, 3, 2), (2, 3, 3, 3)),
        (nn.Conv2d(16, 16, 3, padding=1), (16, 8, 8)),  # an 8 MB matrix: not dense
        (nn.Conv2d(2, 2, 3, padding=1), (2, 16, 16)),  # 28x the work: not dense
    ],
)
def test_small_convolutions_as_one_dense_product(conv, shape):
    """On the CPU, a convolution on small maps is one product with its dense matrix, built once per weight and
    call shape (equal to torch's convolution up to rounding, whatever its stride, padding mode or groups); it
    is built again when the weight changes in place."""
    torch.manual_seed(0)
    m = conv.double()
    x = torch.randn(40, *shape, dtype=torch.float64)
    with torch.no_grad():
        ref = m._conv_forward(x, m.weight, None)
        got = ops.conv_without_bias(m, x)
        dense = m.weight in ops._dense_matrices
        n_in, n_out = x[0].numel(), ref[0].numel()
        small = n_in * n_out * 8 <= ops._DENSE_MAX_BYTES
        assert dense == (small and n_in <= ops._DENSE_MAX_WORK * m.weight[0].numel())
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
        if dense:
            (D,) = ops._dense_matrices[m.weight].values()
            assert D.shape == (n_in, n_out)
            m.weight.mul_(2.0)
            torch.testing.assert_close(ops.conv_without_bias(m, x), 2 * ref, rtol=1e-13, atol=1e-13)
            with torch.enable_grad():  # gradients on: torch's own convolution
                m.weight.requires_grad_(True)
                assert len(ops._dense_matrices[m.weight]) == 2
                ops.conv_without_bias(m, x)
                assert len(ops._dense_matrices[m.weight]) == 2


def test_upsample_transpose_pad_stack_flip_roll_exact():
    torch.manual_seed(0)
    net = UpsampleNet()
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(3, 64, generator=g)
    pts = pts.mean(0) + 0.2 * (pts - pts.mean(0))  # a smaller triangle: ~500 regions instead of ~38k
    sl = Slice.through_points(*pts)
    p = compute_partition(net, sl, input_shape=(1, 8, 8))
    assert p.num_regions > 5
    assert all(len(torch.unique(p.codes[k], dim=0)) > 1 for k in ("relu", "leaky_relu", "amax"))  # each one splits
    assert_affine_inside(net, p, input_shape=(1, 8, 8))


class _OpNet(nn.Module):
    """``Linear(2, 16)``, then ``op``, then a Linear read-out of whatever shape ``op`` returns."""

    def __init__(self, op, module=None, width=16):
        super().__init__()
        self.a = nn.Linear(2, width)
        self.m = module
        self.op = op
        with torch.no_grad():
            self.a.weight.mul_(4.0)  # breakpoints at +-3 (Hardsigmoid) must cross the square too
        self.out = nn.Linear(int(op(self, torch.zeros(1, width)).flatten(1).shape[1]), 2)

    def forward(self, x):
        return self.out(self.op(self, self.a(x)).flatten(1))


def _relu_in_place(s, h):
    h.relu_()
    return h


def _relu_module_unassigned(s, h):
    s.m(h)  # nn.ReLU(inplace=True) changes h; its result is not used
    return h


def _in_place_chain(s, h):
    h.sub_(0.3).relu_()  # the second change applies to h too
    return h


def _in_place_alias(s, h):
    g = s.m(h)  # g is h
    h.mul_(2)  # so g changes too
    return g


def _imul(s, h):
    h *= 2
    h -= 0.5
    return F.relu(h)


def _maps16(h):
    """16 channels of 4x4 maps: ``relu(h)`` scaled differently in each."""
    return F.relu(h).view(-1, 1, 4, 4) * torch.linspace(0.5, 1.5, 16, dtype=h.dtype).view(1, 16, 1, 1)


OP_CASES = {
    "AdaptiveMaxPool2d": (lambda s, h: s.m(F.relu(h).view(-1, 1, 4, 4)), nn.AdaptiveMaxPool2d((2, 3))),
    "adaptive_max_pool1d": (lambda s, h: F.adaptive_max_pool1d(h.view(-1, 2, 8), 3), None),
    "MaxPool3d": (lambda s, h: s.m(h.view(-1, 2, 2, 2, 2)), nn.MaxPool3d(2)),
    "amax over two dims": (lambda s, h: h.view(-1, 4, 2, 2).amax(dim=(2, 3)), None),
    "torch.min over a dim": (lambda s, h: torch.min(h.view(-1, 4, 4), dim=2)[0], None),
    "amin, keepdim": (lambda s, h: torch.amin(h.view(-1, 4, 4), dim=1, keepdim=True), None),
    "maximum(constant, h)": (lambda s, h: torch.maximum(torch.zeros(1, dtype=h.dtype), h), None),
    "h.max(other)": (lambda s, h: h[:, :8].max(h[:, 8:]), None),
    "torch.max(h, other=)": (lambda s, h: torch.max(h[:, :8], other=h[:, 8:]), None),
    "h.minimum(constant)": (lambda s, h: h.minimum(torch.full((1,), 0.3, dtype=h.dtype)), None),
    "h + broadcast constant": (lambda s, h: F.relu(h[:, :1] + torch.linspace(-1, 1, 5, dtype=h.dtype)), None),
    "clamp_min, clamp_max": (lambda s, h: h.clamp_min(-0.2) + torch.clamp_max(h, 0.3), None),
    "relu_()": (_relu_in_place, None),
    "ReLU(inplace) unassigned": (_relu_module_unassigned, nn.ReLU(inplace=True)),
    "*= and -=": (_imul, None),
    "in-place chain": (_in_place_chain, None),
    "in-place alias": (_in_place_alias, nn.ReLU(inplace=True)),
    "F.prelu": (lambda s, h: F.prelu(h, s.m.weight), nn.PReLU(16, init=-0.3)),
    "Threshold(t, t)": (lambda s, h: s.m(h), nn.Threshold(0.1, 0.1)),
    "Hardsigmoid": (lambda s, h: F.hardsigmoid(h), None),
    "ReflectionPad2d": (lambda s, h: s.m(F.relu(h).view(-1, 1, 4, 4)), nn.ReflectionPad2d(1)),
    # 16 channels: deep enough for the product over samples (ops._GEMM_MIN_INNER)
    "F.conv2d, keywords": (
        lambda s, h: F.relu(F.conv2d(_maps16(h), s.m.weight, s.m.bias, padding=1, stride=(1, 2))),
        nn.Conv2d(16, 3, 3),
    ),
    "F.conv2d, positional, dilated": (
        lambda s, h: F.relu(F.conv2d(_maps16(h), s.m.weight, None, 1, 2, 2)),
        nn.Conv2d(16, 3, 3),
    ),
    "PixelShuffle": (lambda s, h: s.m(F.relu(h).view(-1, 4, 2, 2)), nn.PixelShuffle(2)),
    "chunk, indexed": (lambda s, h: torch.maximum(h.chunk(2, 1)[0], h.chunk(2, 1)[1]), None),
    "rsub, true_divide": (lambda s, h: F.relu(torch.rsub(h, 0.2)) + torch.true_divide(h, 3), None),
    "new_zeros(batch, n)": (lambda s, h: torch.maximum(h, h.new_zeros(h.shape[0], 16) - 0.1), None),
    "full((batch, n))": (lambda s, h: torch.maximum(h, torch.full((h.shape[0], 16), 0.1, dtype=h.dtype)), None),
    "full(size=, fill_value=) * new_ones": (
        lambda s, h: torch.maximum(
            h, torch.full(size=(h.shape[0], 16), fill_value=0.1, dtype=h.dtype) * h.new_ones((h.shape[0], 1))
        ),
        None,
    ),
    "zeros_like": (lambda s, h: torch.maximum(h, torch.zeros_like(h) + 0.1), None),
    "new_full(batch)": (lambda s, h: torch.minimum(h, h.new_full((h.size(0), 16), 0.2)), None),
    # sizes one by one, the batch size read from a shape (torch's parser takes no traced size outside a tuple)
    "ones(batch, n)": (lambda s, h: torch.maximum(h, torch.ones(h.shape[0], 16, dtype=h.dtype) * 0.1), None),
    "cat with zeros(batch, n)": (lambda s, h: F.relu(torch.cat([h, torch.zeros(h.size(0), 3)], 1) - 0.1), None),
    # a constant made per sample from the batch size (a class token), then used with the input
    "class token: expand(batch), cat": (
        lambda s, h: F.relu(torch.cat([s.m.weight[None].expand(h.shape[0], -1), h.view(-1, 4, 4)[:, 0]], 1)),
        nn.PReLU(4, init=-0.7),
    ),
    "repeat(batch) + h": (lambda s, h: F.relu(h - s.m.weight[None].repeat(h.shape[0], 4)), nn.PReLU(4, init=0.2)),
    # products with one constant side
    "h @ W.T": (lambda s, h: F.relu(h @ s.m.weight.T), nn.Linear(16, 8)),
    "W @ h as matrices": (lambda s, h: F.relu(s.m.weight @ h.view(-1, 16, 1)), nn.Linear(16, 8)),
    "torch.matmul(h, vector)": (
        lambda s, h: F.relu(torch.matmul(h.view(-1, 4, 4), torch.linspace(-1, 1, 4, dtype=h.dtype))),
        None,
    ),
    "torch.mm, h.matmul": (lambda s, h: F.relu(torch.mm(h, s.m.weight.T)) - h.matmul(s.m.weight.T), nn.Linear(16, 8)),
    "einsum bi,oi->bo": (lambda s, h: F.relu(torch.einsum("bi,oi->bo", h, s.m.weight)), nn.Linear(16, 8)),
    "einsum ..., operand list": (
        lambda s, h: F.relu(torch.einsum("...ij, jk -> ...ik", [h.view(-1, 4, 4), s.m.weight[:4, :4]])),
        nn.Linear(16, 8),
    ),
    # clamp with tensor bounds: a learned scalar (PACT-style), per unit, and per unit with some bounds crossed
    "clamp(h, 0, scalar parameter)": (
        lambda s, h: torch.clamp(h, torch.zeros_like(s.m.weight[0]), s.m.weight[0]),
        nn.PReLU(1, init=0.6),
    ),
    "clamp(min=per-unit tensor)": (lambda s, h: torch.clamp(h, min=s.m.weight - 1.0), nn.PReLU(16, init=0.4)),
    "h.clamp(max=per-unit tensor)": (lambda s, h: h.clamp(max=s.m.weight), nn.PReLU(16, init=0.4)),
    "clamp(per-unit lo, hi), some crossed": (
        lambda s, h: torch.clamp(h, torch.linspace(-1.0, 0.5, 16, dtype=h.dtype), s.m.weight),
        nn.PReLU(16, init=0.2),  # units with lo > 0.2 are the constant 0.2
    ),
    "clamp(lo (4, 1), hi (4,)) broadcast": (
        lambda s, h: torch.clamp(h.view(-1, 4, 4), torch.linspace(-1, 0, 4, dtype=h.dtype)[:, None], s.m.weight),
        nn.PReLU(4, init=0.5),
    ),
    "Fold": (
        lambda s, h: s.m(F.relu(h).view(-1, 4, 4)).flatten(1) @ torch.ones(16, 3, dtype=h.dtype),
        nn.Fold(4, 2, stride=2),
    ),
    "Unfold": (lambda s, h: F.relu(s.m(h.view(-1, 1, 4, 4)) - 0.2), nn.Unfold(2, stride=(1, 2))),
    "F.unfold of a map": (lambda s, h: F.relu(F.unfold(h.view(-1, 1, 4, 4), 3) - 0.2), None),
    "h.unfold(dim, size, step)": (lambda s, h: F.relu(h.unfold(1, 4, 3) + 0.1), None),
    # found by fuzzing: a view after .contiguous(), bounds and constants with a leading dimension of 1
    "transpose, contiguous, view": (
        lambda s, h: F.relu(h.view(-1, 4, 4).transpose(1, 2).contiguous().view(-1, 16)),
        None,
    ),
    "clamp(min=(1, n) tensor)": (lambda s, h: torch.clamp(h, min=s.m.weight[None] - 1.0), nn.PReLU(16, init=0.4)),
    "constant.expand_as(h)": (lambda s, h: F.relu(h + s.m.weight[None].expand_as(h)), nn.PReLU(16, init=-0.2)),
    "buffer.expand(batch, -1)": (
        lambda s, h: F.relu(h - s.m.running_var.expand(h.shape[0], -1) + 0.5),
        nn.BatchNorm1d(16),
    ),
    "buffer.repeat(batch, 1)": (
        lambda s, h: F.relu(h - s.m.running_var.repeat(h.size(0), 1) + 0.5),
        nn.BatchNorm1d(16),
    ),
    "RReLU (eval)": (lambda s, h: s.m(h), nn.RReLU(0.1, 0.3)),
    "F.rrelu": (lambda s, h: F.rrelu(h, 0.2, 0.4), None),
    "Softshrink": (lambda s, h: s.m(h), nn.Softshrink(0.3)),
    "F.softshrink": (lambda s, h: F.softshrink(h, 0.2), None),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_forms_exact(case):
    """Max/min in every form, in-place activations, and linear re-arrangements, against the model's forward."""
    op, module = OP_CASES[case]
    torch.manual_seed(0)
    net = _OpNet(op, module)
    p = compute_partition(net, Slice.from_vertices(SQ))
    assert p.num_regions > 1, case
    assert_affine_inside(net, p)


REFUSED_PRODUCTS = {
    "h.T @ h": (lambda s, h: h.view(-1, 4, 4).transpose(1, 2) @ h.view(-1, 4, 4), "two input-dependent"),
    "ones(1, batch) @ h": (lambda s, h: torch.ones(1, h.shape[0], dtype=h.dtype) @ h, "across the batch"),
    "einsum bi,j->ij": (lambda s, h: torch.einsum("bi,j->ij", h, torch.ones(3, dtype=h.dtype)), "batch"),
    "einsum bi,bj->bij": (lambda s, h: torch.einsum("bi,bj->bij", h, h), "two input-dependent"),
    "rrelu(training=True)": (lambda s, h: F.rrelu(h, training=True), "random slopes"),
}


@pytest.mark.parametrize("case", list(REFUSED_PRODUCTS))
def test_products_that_are_not_piecewise_linear_per_sample_are_refused(case):
    op, match = REFUSED_PRODUCTS[case]
    with pytest.raises(ops.UnsupportedModelError, match=match):
        compute_partition(_OpNet(op), Slice.from_vertices(SQ))


def test_a_batch_sized_constant_that_differs_between_samples_is_refused():
    def op(s, h):  # a ramp over the whole batch: each sample gets a different constant
        return F.relu(h + torch.linspace(0, 1, 16 * h.shape[0], dtype=h.dtype).view(h.shape[0], 16))

    net = _OpNet(op)
    with pytest.raises(ops.UnsupportedModelError, match="not one constant per sample"):
        compute_partition(net, Slice.from_vertices(SQ))


def test_discontinuous_threshold_is_refused_by_name():
    net = _OpNet(lambda s, h: s.m(h), nn.Threshold(0.1, 0.0))
    with pytest.raises(ops.UnsupportedModelError, match="Threshold"):
        compute_partition(net, Slice.from_vertices(SQ))


@pytest.mark.parametrize(
    "between", [nn.Dropout(0.1), nn.FeatureAlphaDropout(0.2), nn.Identity(), nn.Unflatten(1, (2, 4))]
)
def test_in_place_activation_after_an_identity_or_view_is_followed(between):
    """The tensor a view or identity was made from is never read again: nothing to refuse."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), between, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8, 2)).eval()
    p = compute_partition(net, Slice.from_vertices(SQ))
    assert p.num_regions > 1
    assert_affine_inside(net, p)


def _view_then_change(s, h):
    v = h.view(-1, 4, 4)
    h.relu_()  # also changes v, which the graph does not show
    return v


def _change_a_slice(s, h):
    h[:, :4].relu_()  # changes part of h
    return h


@pytest.mark.parametrize("forward", [_view_then_change, _change_a_slice])
def test_in_place_change_through_a_view_is_refused(forward):
    with pytest.raises(ops.UnsupportedModelError, match="shares memory"):
        compute_partition(_OpNet(forward), Slice.from_vertices(SQ))


def test_unpacking_a_chunk_names_the_cause():
    def unpack(s, h):
        return torch.maximum(*h.chunk(2, 1))

    with pytest.raises(ops.UnsupportedModelError, match="index it instead"):
        compute_partition(_OpNet(unpack), Slice.from_vertices(SQ))


def test_a_max_pool_window_wholly_in_padding_is_refused_by_name():
    net = _OpNet(lambda s, h: s.m(F.relu(h).view(-1, 1, 4, 4)[:, :, :1, :1]), nn.MaxPool2d(2, 1, padding=1, dilation=2))
    with pytest.raises(ops.UnsupportedModelError, match="MaxPool2d at 'm' has a window with no member"):
        compute_partition(net, Slice.from_vertices(SQ))


def test_a_failed_trace_leaves_torch_factories_as_they_were():
    zeros, ones, expand = torch.zeros, torch.ones, torch.Tensor.expand

    def branch(s, h):
        if h.sum() > 0:  # data-dependent control flow: tracing fails inside the patched factories' scope
            return torch.zeros(h.shape[0], 16)
        return h

    with pytest.raises(ops.UnsupportedModelError, match="cannot trace"):
        compute_partition(_OpNet(branch), Slice.from_vertices(SQ))
    assert torch.zeros is zeros and torch.ones is ones and torch.Tensor.expand is expand


class _PoolWithIndices(nn.Module):
    """Max pooling asked for its indices, of which only the values are used (``v, _ = ...``, ``[0]``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv, self.out, self.how = nn.Conv2d(1, 3, 3, padding=1), nn.Linear(3 * 4 * 4, 2), how
        self.pool = nn.MaxPool2d(2, return_indices=True)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if self.how == "module":
            v, _ = self.pool(h)
        elif self.how == "functional":
            v = F.max_pool2d(h, 2, return_indices=True)[0]
        elif self.how == "unpool":  # the indices used: positions, not a continuous function
            v, i = self.pool(h)
            v = F.max_unpool2d(v, i, 2)[:, :, ::2, ::2]
        else:
            v = F.max_pool2d(h, 2)
        return self.out(v.flatten(1))


@pytest.mark.parametrize("how", ["module", "functional"])
def test_max_pooling_that_returns_indices_is_its_values(how):
    pts = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    slc = Slice.through_points(*pts)
    ref = compute_partition(_PoolWithIndices("plain"), slc, input_shape=(1, 8, 8))
    part = compute_partition(_PoolWithIndices(how), slc, input_shape=(1, 8, 8))
    assert part.num_regions == ref.num_regions > 20
    assert torch.equal(part.vertices, ref.vertices) and torch.equal(part.jacobians, ref.jacobians)
    with pytest.raises(UnsupportedModelError, match="positions of the maxima|max_unpool2d"):
        compute_partition(_PoolWithIndices("unpool"), slc, input_shape=(1, 8, 8))
