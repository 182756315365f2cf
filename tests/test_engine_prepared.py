"""prepare_model: snapshot on the calling thread, compute anywhere."""

import threading

import pytest
import torch
from torch import nn

from splinecam_lightning import Slice, compute_partition, prepare_model
from splinecam_lightning.errors import SplineCamWarning, UnsupportedModelError

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


def _hooked_weight_net(kind):
    """A net whose first layer's weight is computed by a forward pre-hook (old-style ``weight_norm`` or
    ``spectral_norm``): after an optimizer step that weight is stale (and has a grad_fn) until the next forward."""
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated, still in wide use
        wrap = {
            "weight_norm": torch.nn.utils.weight_norm,
            "spectral_norm": torch.nn.utils.spectral_norm,
            "prune": lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.5),
        }[kind]
        conv = wrap(nn.Conv2d(1, 3, 3, padding=1))
    net = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), conv, nn.ReLU(), nn.Flatten(), nn.Linear(48, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(2):
        loss = net(torch.randn(8, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return net, conv


def _assert_matches_next_forward(part, net):
    """Each region's map equals the model's next forward (its hook recomputes the weight first) inside it."""
    import copy

    uv = 0.5 * (part.vertices[:, 0] + part.vertices[:, 2])  # inside each convex region
    x = part.slice.to_input(uv)
    with torch.no_grad():
        net(x[:1].float())  # the hook's weight is now a leaf: the copy below can be made
        y = copy.deepcopy(net).double()(x)
    assert torch.allclose(part.evaluate(uv, torch.arange(part.num_regions)), y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "prune"])
def test_weights_computed_by_a_hook_are_those_of_the_next_forward(kind):
    from splinecam_lightning.worker import load_weights

    net, conv = _hooked_weight_net(kind)
    stale = conv.weight
    slc = Slice.through_points(*torch.randn(3, 16, generator=torch.Generator().manual_seed(1)))
    prep = prepare_model(net)
    assert conv.weight is stale  # the caller's module is not touched
    first = compute_partition(prep, slc)
    _assert_matches_next_forward(first, net)
    # a later snapshot through the callback's path: new raw weights loaded into the prepared copy
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("weight_v", "weight_orig")):
                p.mul_(-1.5)
    load_weights(prep, {k: v.detach() for k, v in net.state_dict().items()})
    second = compute_partition(prep, slc)
    assert second.num_regions != first.num_regions or not torch.equal(second.vertices, first.vertices)
    _assert_matches_next_forward(second, net)


def test_the_callers_forward_hooks_are_not_run():
    # Logging hooks: one on the whole net calls .item() (tracing would hand it a proxy), one records shapes.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    seen = []
    net.register_forward_hook(lambda m, i, o: seen.append(o.abs().mean().item()))
    net[1].register_forward_pre_hook(lambda m, i: seen.append(tuple(i[0].shape)))
    slc = Slice.box(-2.0, 2.0, -2.0, 2.0)
    with pytest.warns(SplineCamWarning, match=r"forward hooks on '\(the model\)', '1' are not run"):
        part = compute_partition(net, slc)
    assert seen == []
    assert len(net._forward_hooks) == 1 and len(net[1]._forward_pre_hooks) == 1  # the caller's stay
    assert part.num_regions > 1
    net(torch.zeros(1, 2))
    assert len(seen) == 2


class _WithHandles(nn.Module):
    """Attributes ``copy.deepcopy`` refuses (a lock, a generator), as a logger's run handle would be."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = _net(0)
        self.lock = threading.Lock()
        self.pending = (i for i in range(3))

    def forward(self, x):
        return self.body(x)


def test_attributes_that_cannot_be_copied_are_shared_not_refused():
    net = _WithHandles()
    lock, before = net.lock, {k: v.clone() for k, v in net.state_dict().items()}
    sl = Slice.from_vertices(2 * SQ)
    part = compute_partition(net, sl)
    ref = compute_partition(net.body, sl)
    assert part.num_regions == ref.num_regions > 1 and torch.equal(part.vertices, ref.vertices)
    assert net.lock is lock and not lock.locked()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_private_attribute_that_cannot_be_copied_names_the_cause():
    net = _WithHandles()
    net._guard = threading.Lock()
    with pytest.raises(UnsupportedModelError, match="cannot copy _WithHandles .*lock"):
        compute_partition(net, Slice.from_vertices(SQ))


class _Holder(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.float())  # a cast written for the user's own float32 training


def test_torch_compile_wrappers_are_seen_through_and_keep_their_weight_names():
    from splinecam_lightning.worker import WeightLayout

    net = _net(3)
    slc = Slice.from_vertices(SQ)
    ref = compute_partition(net, slc)
    holder = _Holder(torch.compile(net, backend="eager"))  # never called: nothing is compiled
    for model in (torch.compile(net, backend="eager"), holder):
        part = compute_partition(model, slc)
        assert part.num_regions == ref.num_regions and torch.equal(part.vertices, ref.vertices)

    # The callback copies weights by name: `net._orig_mod.0.weight` feeds the traced copy's `net.0.weight`.
    layout = WeightLayout(holder, prepare_model(holder).graph_module)
    assert len(layout.entries) == len(list(net.parameters()))
    assert all(s.startswith("net._orig_mod.") for s in layout.sources)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert torch.equal(layout.read(holder)["net.0.weight"], net[0].weight)


class _Rounds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 4)

    def forward(self, x):
        return self.lin(x).to(torch.long).sum(1, keepdim=True)


def test_a_cast_to_an_integer_type_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"\.to\(\) .* casts an input-dependent tensor to torch.int64"):
        compute_partition(_Rounds(), Slice.from_vertices(SQ))


def test_a_data_parallel_wrapper_is_refused_naming_what_to_pass():
    with pytest.raises(UnsupportedModelError, match="DataParallel .* pass the network it wraps, `model.module`"):
        compute_partition(nn.DataParallel(_net(0)), Slice.from_vertices(SQ))
