"""Activations written by hand with a comparison: ``torch.where(h > t, f(h), g(h))`` and ``h * (h > 0)``.

A comparison is a step function; with branches that are unit-wise affine in ``h`` and equal at ``t``, the
``where`` (or the product) is one continuous piecewise-linear function of ``h``, exact like the module it imitates.
"""

import pytest
import torch
import torch.nn.functional as F
from test_engine_more_layers import SQ, _OpNet, assert_affine_inside
from torch import nn

from splinecam_lightning import Slice, UnsupportedModelError, compute_partition


def _fill_in_place(s, h):
    h.masked_fill_(h > 0.3, 0.3)  # not assigned: later uses of h read the change
    return h


# (hand-written form, the module it equals)
EQUIVALENT = {
    "where(h > 0, h, 0.1 h)": (lambda s, h: torch.where(h > 0, h, 0.1 * h), lambda s, h: F.leaky_relu(h, 0.1)),
    "where(h >= 0, h, zeros_like(h))": (
        lambda s, h: torch.where(h >= 0, h, torch.zeros_like(h)),
        lambda s, h: F.relu(h),
    ),
    "h * (h > 0).float()": (lambda s, h: h * (h > 0).float(), lambda s, h: F.relu(h)),
    "(0 < h).to(dtype) * 2h": (lambda s, h: (0 < h).to(h.dtype) * (2 * h), lambda s, h: 2 * F.relu(h)),
    "where(h < 0, a h, h), a a parameter": (
        lambda s, h: torch.where(h < 0, s.m.weight * h, h),
        lambda s, h: F.prelu(h, s.m.weight),
    ),
    "h.masked_fill(h < 0, 0.0)": (lambda s, h: h.masked_fill(h < 0, 0.0), lambda s, h: F.relu(h)),
    "h.masked_fill_(h > 0.3, 0.3), in place": (_fill_in_place, lambda s, h: h.clamp(max=0.3)),
    "where(h <= 0.5, 0.5, h)": (lambda s, h: torch.where(h <= 0.5, 0.5, h), lambda s, h: h.clamp(min=0.5)),
    "where(h > 1, 1, where(h < -1, -1, h)): nested": (
        lambda s, h: torch.where(h > 1, 1.0, torch.where(h < -1, -torch.ones_like(h), h)),
        lambda s, h: F.hardtanh(h),
    ),
    "h.masked_fill(h < 0, 0).masked_fill(h > 0.5, 0.5): nested": (
        lambda s, h: h.masked_fill(h < 0, 0.0).masked_fill(h > 0.5, 0.5),
        lambda s, h: h.clamp(0.0, 0.5),
    ),
    "three levels of where, four slopes": (
        lambda s, h: torch.where(
            h > 1, 0.5 * h + 0.5, torch.where(h > 0, h, torch.where(h > -1, 0.1 * h, 0.2 * h + 0.1))
        ),
        lambda s, h: 0.2 * h + 0.1 - 0.1 * F.relu(h + 1) + 0.9 * F.relu(h) - 0.5 * F.relu(h - 1),
    ),
    "where(h > t, t + (h - t) / 4, h), t per unit": (
        lambda s, h: torch.where(h > s.m.weight, s.m.weight + (h - s.m.weight) / 4, h),
        lambda s, h: h.clamp(max=s.m.weight) + F.relu(h - s.m.weight) / 4,
    ),
}


def _two(op, seed=0):
    torch.manual_seed(seed)
    net = _OpNet(op, nn.PReLU(16, init=0.3))
    with torch.no_grad():
        net.m.weight.copy_(torch.linspace(-0.4, 0.6, 16))
    return net


@pytest.mark.parametrize("case", list(EQUIVALENT))
def test_hand_written_activation_equals_its_module(case):
    written, module = EQUIVALENT[case]
    net_w, net_m = _two(written), _two(module)
    slc = Slice.from_vertices(SQ)
    pw, pm = compute_partition(net_w, slc), compute_partition(net_m, slc)
    assert pw.num_regions == pm.num_regions > 1
    assert torch.allclose(pw.areas.sort().values, pm.areas.sort().values, rtol=1e-9, atol=1e-12)
    assert_affine_inside(net_w, pw)


class _Interleaved(nn.Module):
    """A comparison made before a ReLU elsewhere splits the regions, consumed after it; per-channel thresholds
    in a CNN; a second where on the output of the first."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 32)
        self.b = nn.Linear(32, 16)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.t = nn.Parameter(torch.tensor([0.2, -0.1, 0.0]).view(3, 1, 1))
        self.out = nn.Linear(3 * 16 + 16, 2)

    def forward(self, x):
        h = self.a(x)
        first = F.leaky_relu(h[:, :16] + 0.3, 0.2)  # per-region maps, which a split must follow
        mask = first > 0.1
        g = F.relu(self.b(h))  # splits regions between the comparison and its use
        h = torch.where(mask, first, 0.1 + 0.25 * (first - 0.1))
        c = self.conv(h.view(-1, 1, 4, 4).expand(-1, 2, -1, -1) * torch.tensor([1.0, -0.5]).view(1, 2, 1, 1))
        c = torch.where(self.t > c, -0.3 * (self.t - c) + self.t, c)  # reversed operands, threshold per channel
        return self.out(torch.cat([c.flatten(1), g + h], 1))


def test_where_exact_when_regions_split_between_comparison_and_use():
    torch.manual_seed(1)
    net = _Interleaved()
    p = compute_partition(net, Slice.from_vertices(SQ * 1.5))
    assert p.num_regions > 50
    assert {"where", "where_1"} <= set(p.codes)
    assert_affine_inside(net, p)


def test_where_on_constants_in_forward_still_runs():
    class Pruned(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 8), nn.Linear(8, 1)

        def forward(self, x):
            w = torch.where(self.a.weight.abs() > 0.3, self.a.weight, 0.0)  # a constant: no breakpoint
            return self.b(F.relu(F.linear(x, w, self.a.bias)))

    torch.manual_seed(0)
    net = Pruned()
    p = compute_partition(net, Slice.from_vertices(SQ))
    assert p.num_regions > 1
    assert_affine_inside(net, p)


REFUSED = {
    "branches jump at the threshold": (lambda s, h: torch.where(h > 0, h + 1, h), "discontinuous"),
    "a mask times a constant": (lambda s, h: (h > 0).to(h.dtype) * 2.0, "discontinuous"),
    "a branch not affine in h": (lambda s, h: torch.where(h > 0, h, F.relu(-h)), "not a unit-wise affine"),
    "a mask times another tensor": (lambda s, h: h[:, :8] * (h[:, 8:] > 0), "not a unit-wise affine"),
    "a step added": (lambda s, h: h + (h > 0).float(), "step function"),
    "a step returned": (lambda s, h: (h > 0).to(h.dtype), "step function"),
    "masked_fill that jumps": (lambda s, h: h.masked_fill(h > 0.3, 0.0), "discontinuous"),
    "a nest that jumps": (lambda s, h: torch.where(h > 1, 2.0, torch.where(h < -1, -1.0, h)), "discontinuous"),
    "a nest whose inner where compares another tensor": (
        lambda s, h: (lambda a, b: torch.where(a > 0, a, torch.where(b > 0, 0.5 * a, b)))(h[:, :8], h[:, 8:]),
        "not a unit-wise affine",
    ),
    "two input-dependent sides": (lambda s, h: torch.where(h[:, :8] > h[:, 8:], h[:, :8], h[:, 8:]), "two input"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_comparisons_that_are_not_continuous_piecewise_linear_are_refused(case):
    op, match = REFUSED[case]
    with pytest.raises(UnsupportedModelError, match=match):
        compute_partition(_OpNet(op), Slice.from_vertices(SQ))


@pytest.mark.parametrize("form", ["where", "mask", "masked_fill"])
def test_a_comparison_of_a_map_constant_on_the_slice(form):
    """Far from the origin an earlier Hardtanh is saturated on the whole slice: its output is one constant map,
    still compared and selected as torch would."""
    ops_ = {
        "where": lambda s, h: torch.where(h > 0, h, 0.1 * h),
        "mask": lambda s, h: h * (h > 0).to(h.dtype),
        "masked_fill": lambda s, h: h.masked_fill(h < 0, 0.0),
    }
    torch.manual_seed(0)
    net = _OpNet(lambda s, h: ops_[form](s, F.hardtanh(h, -0.5, 0.5) - 0.2))
    near = compute_partition(net, Slice.from_vertices(SQ))
    far = compute_partition(net, Slice.from_vertices(SQ * 0.01 + 50.0))
    assert near.num_regions > 1 and far.num_regions == 1
    assert_affine_inside(net, near)
    assert_affine_inside(net, far)
