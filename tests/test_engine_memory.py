"""Memory budget (chunked depth-first evaluation, clear errors) and held-out fixes: far-away thin regions,
meta-device models, integer shape arithmetic."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from oracles import check_interior_forward, check_tiling, f64_copy, full_exactness, square
from torch import nn

import splinecam_lightning.engine as engine
from splinecam_lightning import (
    MemoryBudgetError,
    Slice,
    SplineCamError,
    TooManyRegionsError,
    UnsupportedModelError,
    compute_partition,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ResCat(nn.Module):
    """Residual add, channel split by integer shape arithmetic, cat, BatchNorm and max pooling."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(2, 2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.r1, self.r2, self.r3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        h = self.r1(self.bn(self.c1(x)))
        r = self.r2(self.c2(h)) + h
        half = r.shape[1] // 2
        a, b = r[:, :half], r[:, half:]
        m = torch.cat([self.r3(self.c3(a)), b, r[:, : r.shape[1] - 2]], 1)
        return self.fc(self.pool(m).flatten(1))


def _rescat(seed=0):
    torch.manual_seed(seed)
    net = ResCat()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def _plane(seed=0, dim=64, radius=0.3):
    g = torch.Generator().manual_seed(seed)
    return Slice.around(torch.randn(dim, generator=g), radius, generator=g)


def _pattern_set(p):
    c = np.ascontiguousarray(p.activation_pattern().numpy())
    return {row.tobytes() for row in c}


def test_shape_arithmetic_traces_and_is_exact():
    net = _rescat()
    slc = _plane()
    p = compute_partition(net, slc, input_shape=(1, 8, 8))
    assert p.num_regions > 20
    full_exactness(p, f64_copy(net), slc, input_shape=(1, 8, 8), grid=60)


@pytest.mark.parametrize("work", [1 << 17, 1 << 20])
def test_chunked_depth_first_matches_whole(monkeypatch, work):
    """Tiny working sets force chunks at every layer (lazy gathers, residuals, cat): same partition, exact."""
    net = _rescat(1)
    slc = _plane(1)
    whole = compute_partition(net, slc, input_shape=(1, 8, 8))
    monkeypatch.setattr(engine, "WORK_BYTES", work)
    chunked = compute_partition(net, slc, input_shape=(1, 8, 8))
    assert chunked.num_regions == whole.num_regions > 20
    assert _pattern_set(chunked) == _pattern_set(whole)
    assert len(_pattern_set(chunked)) == chunked.num_regions
    assert chunked.codes.keys() == whole.codes.keys()
    full_exactness(chunked, f64_copy(net), slc, input_shape=(1, 8, 8), grid=60)


def _two_conv_net(c1: int, c2: int) -> nn.Sequential:
    """conv(c1)-relu-conv(c2)-relu-linear on 1x8x8 inputs, seed 0."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 64, 1),
    )


def test_max_memory_too_small_names_layer_regions_budget():
    net = _two_conv_net(8, 4)
    with pytest.raises(MemoryBudgetError, match=r"Conv2d at '0'.*1 regions so far.*memory budget") as ei:
        compute_partition(net, _plane(), input_shape=(1, 8, 8), max_memory=1 << 12)
    assert isinstance(ei.value, SplineCamError) and isinstance(ei.value, MemoryError)
    assert not isinstance(ei.value, UnsupportedModelError)
    g = torch.Generator().manual_seed(0)  # a plane through three points, with a larger (still too small) budget
    with pytest.raises(MemoryBudgetError, match=r"memory budget 64.00 KiB"):
        compute_partition(
            net, Slice.through_points(*torch.randn(3, 64, generator=g)), input_shape=(1, 8, 8), max_memory=1 << 16
        )
    # a budget that holds a few regions at a time still gives the whole partition
    full = compute_partition(net, _plane(), input_shape=(1, 8, 8))
    small = compute_partition(net, _plane(), input_shape=(1, 8, 8), max_memory=1 << 21)
    assert small.num_regions == full.num_regions
    assert _pattern_set(small) == _pattern_set(full)


def test_partition_without_codes_is_the_same_and_fits_a_smaller_budget():
    """codes=False drops the activation codes (one byte per unit and region, most of a conv net's result) and
    nothing else; a budget too small for the codes then still holds the partition."""
    net = _two_conv_net(16, 16)
    slc = _plane(0, radius=0.5)
    full = compute_partition(net, slc, input_shape=(1, 8, 8))
    bare = compute_partition(net, slc, input_shape=(1, 8, 8), codes=False)
    assert bare.codes == {} and sum(c.numel() for c in full.codes.values()) > 4 << 20
    assert bare.num_regions == full.num_regions > 1000
    for a, b in [(bare.vertices, full.vertices), (bare.jacobians, full.jacobians), (bare.boundary, full.boundary)]:
        assert torch.equal(a, b)
    with pytest.raises(MemoryBudgetError, match="Flatten"):
        compute_partition(net, slc, input_shape=(1, 8, 8), max_memory=4 << 20)
    small = compute_partition(net, slc, input_shape=(1, 8, 8), max_memory=4 << 20, codes=False)
    assert small.num_regions == full.num_regions
    assert abs(float(small.areas.sum()) - slc.area) < 1e-9 * slc.area


def test_max_regions_across_chunks(monkeypatch):
    """max_regions counts the regions of every chunk, finished or pending."""
    net = _rescat(2)
    slc = _plane(2)
    n = compute_partition(net, slc, input_shape=(1, 8, 8)).num_regions
    monkeypatch.setattr(engine, "WORK_BYTES", 1 << 18)
    with pytest.raises(TooManyRegionsError, match="max_regions"):
        compute_partition(net, slc, input_shape=(1, 8, 8), max_regions=n - 1)
    assert compute_partition(net, slc, input_shape=(1, 8, 8), max_regions=n).num_regions == n


def test_invalid_max_memory():
    with pytest.raises(ValueError, match="max_memory"):
        compute_partition(nn.Linear(2, 1), Slice.from_vertices(square()), max_memory=0)


_RLIMIT_SCRIPT = textwrap.dedent(
    """
    import resource
    import torch
    from torch import nn
    from splinecam_lightning import Slice, compute_partition, MemoryBudgetError
    with open("/proc/self/status") as f:
        vm = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:")][0]
    limit = vm + (768 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.manual_seed(0)
    # Conv layers whose work buffers (float64 convolutions unfold their whole batch: ~5x their input plus
    # output) would take ~1 GB at this budget's chunk size: they must run in sub-batches to fit.
    conv = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64 * 32 * 32, 1))
    g = torch.Generator().manual_seed(0)
    slc = Slice.around(torch.randn(32 * 32, generator=g), 0.01, generator=g)
    try:
        p = compute_partition(conv, slc, input_shape=(1, 32, 32), max_memory=384 << 20)
        print("conv", "OK", p.num_regions, flush=True)
    except Exception as e:
        print("conv", "OTHER", type(e).__name__, " ".join(str(e).split()), flush=True)
    # 64 channels of 96x96: one region's maps are 3 x 590k float64 = 14 MB per layer; 5k regions would need 70 GB.
    net = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(64 * 96 * 96, 1))
    g = torch.Generator().manual_seed(0)
    slc = Slice.through_points(*torch.randn(3, 96 * 96, generator=g))
    for mode in ("default", "huge"):  # one process for both: each start imports torch
        kw = {"max_memory": 1 << 40} if mode == "huge" else {"max_regions": 200}
        try:
            p = compute_partition(net, slc, input_shape=(1, 96, 96), **kw)
            print(mode, "OK", p.num_regions, flush=True)
        except MemoryBudgetError as e:
            print(mode, "MemoryBudgetError:", " ".join(str(e).split()), flush=True)
        except Exception as e:
            print(mode, "OTHER", type(e).__name__, " ".join(str(e).split()), flush=True)
    """
)


@pytest.mark.slow
def test_address_space_limit_ends_in_memory_budget_error(tmp_path):
    """Under RLIMIT_AS the run ends with MemoryBudgetError (budget from the limit, or the allocator's failure
    mapped), never a kill and never UnsupportedModelError; a conv net within its budget finishes."""
    script = tmp_path / "limited.py"
    script.write_text(_RLIMIT_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    assert set(out) == {"conv", "default", "huge"}, res.stdout + res.stderr[-2000:]
    # a budget well within the limit is kept, convolutions' hidden work buffers included
    assert out["conv"] == "OK 471", out["conv"]
    # a default budget within the limit: either the partition fits in chunks or a clear budget error
    assert out["default"].startswith(("MemoryBudgetError:", "OK")), out["default"]
    # a budget far above the limit: the allocator's failure comes out as MemoryBudgetError
    assert out["huge"].startswith("MemoryBudgetError:"), out["huge"]
    assert "allocat" in out["huge"]


def test_thin_regions_far_from_origin():
    """Two parallel neuron lines 1e-7 apart in a unit domain centred at (1e4, 1e4) stay three regions."""
    c = torch.tensor([1e4, 1e4], dtype=torch.float64)
    w = torch.tensor([0.6, 0.8], dtype=torch.float64)
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.stack([w, w]))
        net[0].bias.copy_(torch.stack([-(w @ c), -(w @ c) + 1e-7]))
        net[2].weight.copy_(torch.tensor([[1.0, -3.0]]))
        net[2].bias.zero_()
    slc = Slice.from_vertices(square(1.0, center=(1e4, 1e4)))
    p = compute_partition(net, slc)
    assert p.num_regions == 3
    assert len(_pattern_set(p)) == 3
    full_exactness(p, f64_copy(net), slc, grid=50)


@pytest.mark.parametrize("act, shift", [(nn.ReLU6(), 6.0), (nn.Hardtanh(-1.0, 1.0), -1.0)])
def test_thin_regions_at_a_large_threshold_in_a_tiny_slice(act, shift):
    """Two parallel breakpoints 2e-11 apart (1e-5 of the domain) at ReLU6's threshold 6 in a box of half-width
    1e-6: the threshold's size, not the unit's variation, once set the tolerance, and the strip merged."""
    lin = nn.Linear(2, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        lin.bias.copy_(torch.tensor([shift, shift + 2e-11], dtype=torch.float64))
    net = nn.Sequential(lin, act, nn.Linear(2, 1).double())
    with torch.no_grad():
        net[2].weight.copy_(torch.tensor([[1.0, 2.0]]))
    slc = Slice.box(-1e-6, 1e-6, -1e-6, 1e-6)
    p = compute_partition(net, slc)
    assert p.num_regions == 3
    full_exactness(p, f64_copy(net), slc, grid=50)


def test_max_of_large_inputs_in_a_tiny_slice():
    """max(x0, x1) around (1e4, 1e4) with a radius of 1e-7: the inputs' size once hid the whole kink."""

    class Max(nn.Module):
        def forward(self, x):
            return torch.maximum(x[:, :1], x[:, 1:])

    for slc in (Slice.box(1e4 - 1e-7, 1e4 + 1e-7, 1e4 - 1e-7, 1e4 + 1e-7), Slice.around(torch.full((2,), 1e4), 1e-7)):
        p = compute_partition(Max(), slc)
        assert p.num_regions == 2
        assert not torch.allclose(p.jacobians[0], p.jacobians[1])  # one region follows x0, the other x1
        check_tiling(p, slc)
        check_interior_forward(p, Max(), slc)


def test_meta_device_model_gets_value_error():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="meta"):
        compute_partition(net, Slice.from_vertices(square()))


def test_floordiv_on_input_dependent_tensor_is_refused():
    class Bad(nn.Module):
        def forward(self, x):
            return x // 2

    with pytest.raises(UnsupportedModelError):
        compute_partition(Bad(), Slice.from_vertices(square()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_budget_and_chunks_match_cpu(monkeypatch):
    from splinecam_lightning import memory

    assert memory.available_bytes("cuda") > 0
    net = _rescat(3)
    slc = _plane(3)
    cpu = compute_partition(net, slc, input_shape=(1, 8, 8))
    monkeypatch.setattr(engine, "WORK_BYTES", 1 << 18)
    gpu = compute_partition(net.cuda(), slc, input_shape=(1, 8, 8))
    assert gpu.num_regions == cpu.num_regions
    assert _pattern_set(gpu) == _pattern_set(cpu)


def _vm_flags(addr: int) -> list[str]:
    """VmFlags of the mapping of this process that holds ``addr`` (Linux ``/proc/self/smaps``)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return []


@pytest.mark.skipif(
    not (os.path.exists("/proc/self/smaps") and os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")),
    reason="needs Linux with transparent huge pages",
)
def test_large_engine_tensors_ask_for_huge_pages():
    from splinecam_lightning import memory

    like = torch.zeros(1, dtype=torch.float64)
    t = memory.empty((3000, 3, 1000), like)  # 72 MB
    assert t.shape == (3000, 3, 1000) and t.dtype == torch.float64
    codes = memory.empty((5000, 2000), like, torch.int8)
    assert codes.dtype == torch.int8 and codes.shape == (5000, 2000)
    mid = t.data_ptr() + t.numel() * t.element_size() // 2
    assert "hg" in _vm_flags(mid)  # MADV_HUGEPAGE on the tensor's pages
    small = memory.empty((10, 3), like)  # too small to advise: a plain tensor
    assert small.shape == (10, 3)


_HEAP_PROBE = """
import os, sys, torch
from splinecam_lightning import memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
on = sys.argv[1] == "reuse" and memory.reuse_freed_memory()
x = torch.ones(64 << 17, dtype=torch.float64)  # 64 MiB
y = torch.ones(1000)  # allocated after it: the freed block is not at the heap's top
del x
kept = memory.release_freed_memory(1 << 40)  # reports the heap's free bytes, releases nothing
before = rss()
memory.release_freed_memory(0)
print(int(on), kept, before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_reused_memory_stays_in_the_heap_until_released():
    """With reuse_freed_memory (as in the snapshot worker) a freed 64 MiB tensor stays resident in the heap for
    the next one; release_freed_memory gives it back to the OS. By default glibc unmaps it at once."""

    def probe(mode):
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        return [int(v) for v in out.stdout.split()]

    on, kept, released = probe("reuse")
    if not on:
        pytest.skip("not glibc")
    assert kept >= 64 << 20
    assert released >= 60 << 20
    _, kept_default, released_default = probe("default")
    assert kept_default < 16 << 20 and released_default < 16 << 20
