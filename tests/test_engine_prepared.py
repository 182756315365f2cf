"""prepare_model: snapshot on the calling thread, compute anywhere."""

import threading

import torch
from torch import nn

from splinecam_lightning import Slice, compute_partition, prepare_model

SQ = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


def test_prepared_is_a_snapshot(small_mlp):
    net = small_mlp
    sl = Slice.from_vertices(2 * SQ)
    prep = prepare_model(net)
    before = compute_partition(net, sl)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5)
    after_direct = compute_partition(net, sl)
    from_prep = compute_partition(prep, sl)
    assert from_prep.num_regions == before.num_regions
    assert torch.equal(from_prep.vertices, before.vertices)
    assert after_direct.num_regions != before.num_regions or not torch.equal(after_direct.vertices, before.vertices)


def test_prepared_computes_on_another_thread_while_main_thread_trains():
    net = _net(1)
    sl = Slice.from_vertices(2 * SQ)
    expected = compute_partition(net, sl)
    prep = prepare_model(net)
    out = {}

    def work():
        out["p"] = compute_partition(prep, sl)

    t = threading.Thread(target=work)
    t.start()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(50):  # ordinary module calls on the main thread meanwhile
        loss = net(torch.randn(32, 2)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    t.join()
    assert torch.equal(out["p"].vertices, expected.vertices)
    assert torch.equal(out["p"].jacobians, expected.jacobians)


def test_prepared_keeps_input_shape():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 1))
    prep = prepare_model(net, input_shape=(1, 4, 4))
    assert prep.input_shape == (1, 4, 4)
    g = torch.Generator().manual_seed(0)
    sl = Slice.through_points(*torch.randn(3, 16, generator=g))
    assert compute_partition(prep, sl).num_regions == compute_partition(net, sl, input_shape=(1, 4, 4)).num_regions
