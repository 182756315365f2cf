"""Region counts: one-hidden-layer arrangements, affine layers never split, degenerate line configurations."""

import numpy as np
import pytest
import torch
from oracles import (
    arrangement_count,
    check_one_pattern,
    check_tiling,
    check_vertex_forward,
    f64_copy,
    full_exactness,
    mlp,
    plane_lines,
    square,
)
from torch import nn

from splinecam_lightning import Slice, compute_partition


def _one_hidden_count(model, slc):
    A, c = plane_lines(model[0].weight.detach(), model[0].bias.detach(), slc)
    return arrangement_count(A, c, slc.domain.numpy())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("width", [5, 20, 50])
@pytest.mark.parametrize("r", [1.0, 4.0])
def test_one_hidden_layer_count(width, seed, r):
    model = mlp([2, width, 1], seed)
    slc = Slice.from_vertices(square(r, center=(0.1, -0.2)))
    expected, n_lines, n_inter = _one_hidden_count(model, slc)
    part = compute_partition(model, slc)
    assert part.num_regions == expected, (part.num_regions, expected, n_lines, n_inter)
    check_tiling(part, slc)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_hidden_layer_count_rotated_slice(seed):
    model = mlp([2, 30, 1], seed)
    slc = Slice.around(torch.tensor([0.2, 0.1]), radius=1.5, generator=torch.Generator().manual_seed(seed))
    expected, *_ = _one_hidden_count(model, slc)
    part = compute_partition(model, slc)
    assert part.num_regions == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("width", [10, 50])
def test_one_hidden_layer_784_through_points(width, seed):
    model = mlp([784, width, 10], seed)
    g = torch.Generator().manual_seed(100 + seed)
    a, b, c = torch.rand(3, 784, generator=g)
    slc = Slice.through_points(a, b, c, margin=0.5)
    expected, n_lines, _ = _one_hidden_count(model, slc)
    assert n_lines > 0
    part = compute_partition(model, slc)
    assert part.num_regions == expected
    check_vertex_forward(part, f64_copy(model), slc)


def _compose(l1: nn.Linear, l2: nn.Linear) -> nn.Linear:
    out = nn.Linear(l1.in_features, l2.out_features).to(l1.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(l2.weight @ l1.weight)
        out.bias.copy_(l2.weight @ l1.bias + l2.bias)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_affine_layers_never_split(seed):
    """Linear-ReLU-Linear-Linear has as many regions as Linear-ReLU-(composed Linear)."""
    torch.manual_seed(seed)
    l1, l2, l3 = nn.Linear(2, 20), nn.Linear(20, 16), nn.Linear(16, 1)
    deep = nn.Sequential(l1, nn.ReLU(), l2, l3)
    flat = nn.Sequential(l1, nn.ReLU(), _compose(l2, l3))
    slc = Slice.from_vertices(square(1.0))
    pd, pf = compute_partition(deep, slc), compute_partition(flat, slc)
    expected, *_ = _one_hidden_count(flat, slc)
    assert pd.num_regions == pf.num_regions == expected
    check_vertex_forward(pd, f64_copy(deep), slc)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_affine_layers_before_relu_compose(seed):
    """Linear-Linear-ReLU-Linear: the lines are those of the composed first two layers."""
    torch.manual_seed(seed)
    l1, l2, l3 = nn.Linear(2, 8), nn.Linear(8, 20), nn.Linear(20, 1)
    deep = nn.Sequential(l1, nn.Identity(), l2, nn.ReLU(), l3)
    comp = _compose(l1, l2)
    slc = Slice.from_vertices(square(1.0))
    A, c = plane_lines(comp.weight.detach(), comp.bias.detach(), slc)
    expected, *_ = arrangement_count(A, c, slc.domain.numpy())
    pd = compute_partition(deep, slc)
    assert pd.num_regions == expected
    full_exactness(pd, f64_copy(deep), slc, grid=100)


@pytest.mark.parametrize(
    "model",
    [
        lambda: nn.Sequential(nn.Linear(2, 8), nn.Linear(8, 8), nn.Linear(8, 3)),
        lambda: nn.Linear(2, 1),
        lambda: nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.3), nn.Identity(), nn.Flatten(), nn.Linear(4, 2)),
    ],
)
def test_no_nonlinearity_one_region(model):
    torch.manual_seed(0)
    m = model()
    slc = Slice.from_vertices(square(1.5))
    part = compute_partition(m, slc)
    assert part.num_regions == 1
    check_tiling(part, slc)
    check_vertex_forward(part, f64_copy(m), slc)
    assert part.activation_pattern().shape == (1, 0)


def _handcrafted(rows):
    """2 -> len(rows) -> 1 ReLU net with first-layer rows ``(w1, w2, b)``."""
    Wb = torch.tensor(rows, dtype=torch.float64)
    m = nn.Sequential(nn.Linear(2, len(rows)), nn.ReLU(), nn.Linear(len(rows), 1)).double()
    with torch.no_grad():
        m[0].weight.copy_(Wb[:, :2])
        m[0].bias.copy_(Wb[:, 2])
        m[2].weight.copy_(torch.linspace(-1, 1.3, len(rows))[None].double())
        m[2].bias.fill_(0.1)
    return m


def test_degenerate_lines_exact_count():
    """Lines on domain edges, through domain corners, duplicated, negated, and constant neurons."""
    rows = [
        (1, 0, 0),  # x = 0
        (1, 1, 0),  # x + y = 0, through the corners (1,-1) and (-1,1)
        (0, 1, -0.5),  # y = 0.5
        (1, 0, -1),  # x = 1: on the domain edge
        (-1, 0, -1),  # x = -1: on the domain edge
        (0, 1, 1),  # y = -1: on the domain edge
        (2, 0, 0),  # x = 0 again (scaled)
        (-1, 0, 0),  # x = 0 again (negated)
        (0, 0, 1),  # constant active
        (0, 0, -1),  # constant inactive
        (0, 0, 0),  # identically zero
    ]
    m = _handcrafted(rows)
    slc = Slice.from_vertices(square(1.0))
    part = compute_partition(m, slc)
    assert part.num_regions == 7
    check_tiling(part, slc)
    check_vertex_forward(part, m, slc)
    check_one_pattern(part, m, slc)


def test_concurrent_lines_exact_count():
    """Three lines through one point make 6 sectors, not 7 (no zero-area sliver)."""
    m = _handcrafted([(1, 0, 0), (0, 1, 0), (1, 1, 0)])
    slc = Slice.from_vertices(square(1.0))
    part = compute_partition(m, slc)
    assert part.num_regions == 6
    check_tiling(part, slc)
    check_one_pattern(part, m, slc)


def test_concurrent_lines_at_domain_corner():
    """Lines that all pass through one domain corner: 1 + (lines) regions, nothing degenerate."""
    m = _handcrafted([(1, -1, 0), (1, -2, 1), (2, -1, -1), (1, 0, -1)])  # all through (1, 1); last on edge
    slc = Slice.from_vertices(square(1.0))
    part = compute_partition(m, slc)
    assert part.num_regions == 4
    check_tiling(part, slc)
    check_one_pattern(part, m, slc)


@pytest.mark.parametrize("seed", [0, 1])
def test_second_layer_neuron_through_first_layer_vertex(seed):
    """A layer-2 neuron whose bent line passes exactly through a layer-1 intersection point."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        W1, b1 = m[0].weight, m[0].bias
        # intersection of lines 0 and 1
        p = torch.linalg.solve(W1[:2], -b1[:2])
        p = p.clamp(-0.5, 0.5)
        b1[:2] = -(W1[:2] @ p)
        h = torch.relu(W1 @ p + b1)
        m[2].bias.copy_(-(m[2].weight @ h))  # every layer-2 neuron is zero at p
    slc = Slice.from_vertices(square(1.0))
    part = compute_partition(m, slc)
    full_exactness(part, m, slc, grid=150)
    # the point p is a vertex of some region
    allv = torch.cat(part.regions)
    assert (allv - p).norm(dim=1).min() < 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_count_is_rotation_invariant(seed):
    """The same 2D net and domain, with the domain's vertices listed in a different order / start."""
    model = mlp([2, 16, 16, 1], seed)
    V = square(1.0)
    p1 = compute_partition(model, Slice.from_vertices(V))
    p2 = compute_partition(model, Slice.from_vertices(V.flip(0).roll(1, 0)))
    assert p1.num_regions == p2.num_regions
    assert np.isclose(sum(a for a in p1.areas.tolist()), sum(a for a in p2.areas.tolist()), rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_degenerate_second_layer_neurons(seed):
    """Layer-2 neurons that are zero on whole regions, duplicated, scaled or identically zero: no slivers."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    with torch.no_grad():
        W, b = m[2].weight, m[2].bias
        W[0] = 0
        W[0, 0] = 1
        b[0] = 0  # pre = h0: zero on a half-plane, kink on a layer-1 edge
        W[1] = 0
        W[1, 0] = -1
        b[1] = 0  # pre = -h0
        W[2] = 0
        W[2, 1] = 1
        W[2, 2] = -1
        b[2] = 0  # h1 - h2: zero where both are dead
        W[3] = W[4]
        b[3] = b[4]  # duplicate
        W[5] = 2 * W[4]
        b[5] = 2 * b[4]  # scaled duplicate
        W[6] = 0
        b[6] = 0  # identically zero
    slc = Slice.from_vertices(square(1.0))
    part = compute_partition(m, slc)
    full_exactness(part, m, slc, grid=150)
    # identity-like layers add no regions: relu(relu(z)) has the regions of relu(z)
    m2 = nn.Sequential(m[0], nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    with torch.no_grad():
        m2[2].weight.copy_(torch.eye(6, dtype=torch.float64))
        m2[2].bias.zero_()
    A, c = plane_lines(m[0].weight.detach(), m[0].bias.detach(), slc)
    assert compute_partition(m2, slc).num_regions == arrangement_count(A, c, slc.domain.numpy())[0]
