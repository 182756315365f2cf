"""Region adjacency graph and connected pieces of class regions."""

import numpy as np
import pytest
import torch
from torch import nn

from splinecam_lightning import Slice, compute_partition
from splinecam_lightning._imports import GRAPH_TOOL_AVAILABLE
from splinecam_lightning.graph import class_pieces, polygon_adjacency

SQ = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)


def _grid(n, offset=0.0):
    xs = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    V = [
        torch.stack(
            [
                torch.stack([xs[i], xs[j]]),
                torch.stack([xs[i + 1], xs[j]]),
                torch.stack([xs[i + 1], xs[j + 1]]),
                torch.stack([xs[i], xs[j + 1]]),
            ]
        )
        for i in range(n)
        for j in range(n)
    ]
    return torch.stack(V) + offset, torch.full((n * n,), 4)


@pytest.mark.parametrize("offset", [0.0, 1000.0, -3e4])
def test_grid_adjacency_is_exact(offset):
    V, C = _grid(6, offset)
    pairs = polygon_adjacency(V, C)
    expected = set()
    for i in range(6):
        for j in range(6):
            r = i * 6 + j
            if j + 1 < 6:
                expected.add((r, r + 1))
            if i + 1 < 6:
                expected.add((r, r + 6))
    assert set(map(tuple, pairs.tolist())) == expected  # diagonal neighbours touch at a vertex only


def test_t_junction_neighbours():
    # One tall rectangle on the left, two stacked squares on the right: the long edge has two neighbours.
    V = torch.tensor(
        [
            [[0, 0], [1, 0], [1, 2], [0, 2]],
            [[1, 0], [2, 0], [2, 1], [1, 1]],
            [[1, 1], [2, 1], [2, 2], [1, 2]],
        ],
        dtype=torch.float64,
    )
    pairs = polygon_adjacency(V, torch.tensor([4, 4, 4]))
    assert set(map(tuple, pairs.tolist())) == {(0, 1), (0, 2), (1, 2)}


@pytest.mark.parametrize("seed", [0, 1])
def test_partition_adjacency_matches_edge_probes(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    p = compute_partition(net, Slice.from_vertices(3 * SQ))
    A = p.adjacency()
    assert A.shape == (p.num_regions, p.num_regions)
    assert (A != A.T).nnz == 0
    pairs = set(map(tuple, p.adjacency(as_edge_list=True).tolist()))
    # Independent check: step just outside the midpoint of every edge and locate the region there.
    v = p.vertices
    q = v.roll(-1, 1)
    d = q - v
    L = d.norm(dim=-1, keepdim=True)
    K = v.shape[1]
    valid = (torch.arange(K)[None] < p.counts[:, None]) & (L[..., 0] > 1e-6)
    normal = torch.stack([d[..., 1], -d[..., 0]], -1) / L.clamp(min=1e-300)
    probe = ((v + q) / 2 + 1e-8 * normal)[valid]
    own = torch.arange(p.num_regions)[:, None].expand(-1, K)[valid]
    other = p.locate(probe)
    inside = (other >= 0) & (other != own)
    probed = set(map(tuple, torch.stack([torch.minimum(own, other), torch.maximum(own, other)], 1)[inside].tolist()))
    assert probed <= pairs
    # Every edge of positive length in the interior has a neighbour, so the graph is connected.
    from scipy.sparse.csgraph import connected_components

    assert connected_components(A, directed=False)[0] == 1


def test_class_pieces_single_output():
    # y = |u| - 0.5: the positive class is two strips, the negative class one strip.
    net = nn.Sequential(nn.Linear(2, 1), nn.Identity())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
        net[0].bias.zero_()

    class AbsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = net[0]
            self.out = nn.Linear(1, 1)
            with torch.no_grad():
                self.out.weight.fill_(1.0)
                self.out.bias.fill_(-0.5)

        def forward(self, x):
            return self.out(torch.abs(self.lin(x)))

    p = compute_partition(AbsNet(), Slice.from_vertices(SQ))
    assert p.class_pieces() == {0: 1, 1: 2}
    s = p.stats()
    assert s["decision_pieces"] == 3.0 and s["pieces_class_1"] == 2.0


def test_class_pieces_multiclass_matches_grid_components():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    sl = Slice.from_vertices(4 * SQ)
    p = compute_partition(net, sl)
    pieces = class_pieces(p)
    # Brute force: connected components of each class on a fine grid (4-neighbourhood).
    from scipy.ndimage import label

    n = 800
    g = torch.linspace(-4, 4, n, dtype=torch.float64)
    U, V = torch.meshgrid(g, g, indexing="xy")
    with torch.no_grad():
        cls = net.double()(torch.stack([U.reshape(-1), V.reshape(-1)], 1)).argmax(1).reshape(n, n).numpy()
    grid = {int(c): int(label(cls == c)[1]) for c in np.unique(cls)}
    # Thin pieces can be missed by the grid, never invented by it.
    assert set(grid) <= set(pieces)
    for c, k in grid.items():
        assert pieces[c] >= k
    assert sum(pieces.values()) - sum(grid.values()) <= 1


@pytest.mark.skipif(bool(GRAPH_TOOL_AVAILABLE), reason="graph-tool is installed")
def test_to_graph_tool_explains_missing_dependency():
    torch.manual_seed(0)
    p = compute_partition(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)), Slice.from_vertices(SQ))
    with pytest.raises(ImportError, match="graph-tool is not installed.*conda"):
        p.to_graph_tool()
