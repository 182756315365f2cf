"""Conv nets at scale: exact partitions of VGG11-bn (3x64x64, 200 classes), a CIFAR ResNet-18 (width 16, basic
blocks, BatchNorm) and the digits CNN, against the floor of the method.

The floor is the time of 3 float64 forward passes per final region (one region's affine map is three columns):
it is measured on batches of 3, 12, 48 and ``3 * min(R, --floor-batch)`` samples and the fastest per sample is
scaled linearly to ``3 * R``. The engine runs 2-D convolutions on small feature maps as one matrix product over
several samples, which is faster than torch's own float64 convolution there, so a second floor (``floor*``) runs
the same forwards with the engine's convolutions: the ratio to it is what sharing work between regions gains,
the ratio to the first what a user gains. Each case runs
in its own subprocess so that its peak resident memory (``ru_maxrss``) is its own.

    python benchmarks/bench_conv.py                         # all cases, CPU, torch's default threads
    python benchmarks/bench_conv.py --cases vgg11 --radii 0.002 0.005
    python benchmarks/bench_conv.py --cases digits          # digits CNN on planes through three training digits
    python benchmarks/bench_conv.py --cases digits-wide     # the wider digits CNN (61k-89k regions per plane)
    python benchmarks/bench_conv.py --cases pool --threads 1  # max against average pooling, per region
    python benchmarks/bench_conv.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import bench_engine  # noqa: E402

from splinecam_lightning import Slice, compute_partition, ops, prepare_model  # noqa: E402


# ---------------------------------------------------------------------------------------------- networks
def vgg11_bn(num_classes: int = 200) -> nn.Sequential:
    """VGG11 with BatchNorm for 3x64x64 inputs (five 2x2 max pools leave 512x2x2) and the classic classifier."""
    cfg = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    layers: list[nn.Module] = []
    c = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
            c = int(v)
    layers += [
        nn.Flatten(),
        nn.Linear(512 * 2 * 2, 4096),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(4096, num_classes),
    ]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(h)) + self.short(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, four stages of two basic blocks (widths w, 2w, 4w, 8w), global average pool."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks = []
        c = width
        for i, w in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for j in range(2):
                blocks.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def _randomize_bn(net: nn.Module, g: torch.Generator) -> None:
    """Running statistics as after training (not the identity of a fresh BatchNorm)."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


NETS = {"vgg11": (vgg11_bn, (3, 64, 64)), "resnet18": (ResNet18, (3, 32, 32))}
RADII = {"vgg11": [0.002, 0.005, 0.015], "resnet18": [0.004, 0.015, 0.05]}


# ---------------------------------------------------------------------------------------------- one case
def _engine_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``Conv2d.forward`` by the engine's convolution (its sub-batches, products over samples on small maps)."""
    out = ops.conv_without_bias(self, x)
    return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


class _EngineConvs:
    """Within it, every ``nn.Conv2d`` runs as the engine runs its convolutions."""

    def __enter__(self) -> None:
        self._saved = nn.Conv2d.forward
        nn.Conv2d.forward = _engine_conv_forward

    def __exit__(self, *exc) -> None:
        nn.Conv2d.forward = self._saved


def _floor_seconds(
    net: nn.Module, shape, regions: int, device, batch: int, engine_convs: bool = False
) -> tuple[float, float]:
    """Seconds (wall, CPU) of ``3 * regions`` float64 forwards, at the fastest of several batch sizes.

    Timed (best of 5) on batches of ``3 * b`` samples for ``b`` in 1, 4, 16 and ``min(regions, batch)``, scaled
    to ``3 * regions``: torch's float64 convolutions unfold their whole batch at once, so small batches can be the
    fastest, and the floor is the fastest way to run the forwards."""
    if engine_convs:
        with _EngineConvs():
            return _floor_seconds(net, shape, regions, device, batch)
    m = net.to(device=device, dtype=torch.float64).eval()
    best = (math.inf, math.inf)
    for b in sorted({1, 4, 16, max(1, min(regions, batch))}):
        n = 3 * b
        x = torch.randn(n, *shape, dtype=torch.float64, device=device)
        with torch.no_grad():
            m(x)  # warm-up at this size
            for _ in range(5):  # best of 5: the floor is the fastest the forwards run (and it is noisy here)
                t, c = time.perf_counter(), time.process_time()
                m(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt, dc = time.perf_counter() - t, time.process_time() - c
                per = (dt / n, dc / n)
                best = per if per[0] < best[0] else best
    return best[0] * 3 * regions, best[1] * 3 * regions


def run_one(
    name: str,
    radius: float,
    device: torch.device,
    floor_batch: int,
    max_memory: int | None,
    codes: bool = True,
    repeats: int = 1,
) -> dict:
    """One square: the partition, the floor and the floor with the engine's convolutions, ``repeats`` times in
    turn (this machine's speed drifts by tens of percent within minutes), keeping the best of each."""
    make, shape = NETS[name]
    torch.manual_seed(0)
    net = make()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _randomize_bn(net, g)
    x = torch.rand(*shape, generator=g).reshape(-1)  # an image-like point in [0, 1]
    slc = Slice.around(x, radius, generator=g)
    net = net.to(device)
    run = floor = floor_e = (math.inf, math.inf)  # (wall, CPU) seconds, best of the repeats
    for i in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        p = compute_partition(net, slc, input_shape=shape, device=device, max_memory=max_memory, codes=codes)
        run = min(run, (time.perf_counter() - t, time.process_time() - c))
        if i == 0:  # the partition's own peak, before the floors run
            peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            peak_gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        floor = min(floor, _floor_seconds(net, shape, p.num_regions, device, floor_batch))
        floor_e = min(floor_e, _floor_seconds(net, shape, p.num_regions, device, floor_batch, engine_convs=True))
    sec, cpu = run
    return {
        "case": f"{name} {'x'.join(map(str, shape))} r={radius}{'' if codes else ' no codes'}",
        "regions": p.num_regions,
        "seconds": sec,
        "cpu_s": cpu,
        "peak_gib": (peak_gpu or peak_rss) / 2**30,
        "floor_s": floor[0],
        "ratio": sec / floor[0],
        "cpu_ratio": cpu / floor[1],
        "floor_e_s": floor_e[0],
        "ratio_e": sec / floor_e[0],
    }


def run_digits(device: torch.device, steps: int, wide: bool = False) -> list[dict]:
    """The digits CNN (examples/digits_cnn.py, conv4-conv8), or with ``wide`` the wider one the callback overhead
    benchmark trains (conv8-conv16-fc32, ``bench_local.small_cnn``: the CNN whose planes issue 8 counts at
    70k-100k regions; 61k-89k here), trained briefly, on planes through three training digits."""
    import _digits
    from bench_local import small_cnn
    from digits_cnn import make_cnn

    x_tr, y_tr, _, _ = _digits.load_digits_data(0)
    torch.manual_seed(0)
    net = small_cnn() if wide else make_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(x_tr), (64,), generator=g)
        loss = nn.functional.cross_entropy(net(x_tr[idx].reshape(-1, 1, 8, 8)), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    rows = []
    for slc, _classes in _digits.digit_slices(x_tr, y_tr, 3, 0, 0.1):
        compute_partition(net, slc, input_shape=(1, 8, 8), device=device)  # warm-up
        t, c = time.perf_counter(), time.process_time()
        p = compute_partition(net, slc, input_shape=(1, 8, 8), device=device)
        sec, cpu = time.perf_counter() - t, time.process_time() - c
        floor = _floor_seconds(net, (1, 8, 8), p.num_regions, device, 20000)
        rows.append(
            {
                "case": f"digits {'wide ' if wide else ''}CNN {steps} steps, plane {slc.name}",
                "regions": p.num_regions,
                "seconds": sec,
                "cpu_s": cpu,
                "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
                "floor_s": floor[0],
                "ratio": sec / floor[0],
                "cpu_ratio": cpu / floor[1],
            }
        )
    return rows


def pool_cnn(pool: type[nn.Module]) -> nn.Sequential:
    """conv8-relu-pool-conv16-relu-pool-fc32-relu-fc10 on 1x8x8 (the digits CNN's shape) with ``pool``."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        pool(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        pool(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def run_pool(device: torch.device, repeats: int) -> None:
    """Max against average pooling, per region: one CNN with either pooling, the same weights, on planes
    through three U(0, 2) points; best CPU seconds of ``repeats``, the two alternating."""
    print(f"{'pooling':<8} {'plane':>5} {'regions':>8} {'cpu s':>8} {'us/region':>10}")
    ratios = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        slc = Slice.through_points(*(2 * torch.rand(3, 64, generator=g)))
        preps = {}
        for name, pool in (("avg", nn.AvgPool2d), ("max", nn.MaxPool2d)):
            torch.manual_seed(0)
            preps[name] = prepare_model(pool_cnn(pool).to(device), input_shape=(1, 8, 8), device=device)
            compute_partition(preps[name], slc)  # warm-up
        best = {name: math.inf for name in preps}
        regions = {}
        for _ in range(repeats):
            for name, prep in preps.items():
                c = time.process_time()
                regions[name] = compute_partition(prep, slc).num_regions
                best[name] = min(best[name], time.process_time() - c)
        per = {name: best[name] / regions[name] * 1e6 for name in preps}
        for name in preps:
            print(f"{name:<8} {seed:>5} {regions[name]:>8} {best[name]:>8.3f} {per[name]:>10.1f}")
        ratios.append(per["max"] / per["avg"])
        print(f"max / avg per region, plane {seed}: {ratios[-1]:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", nargs="+", default=["vgg11", "resnet18", "digits"])
    ap.add_argument("--radii", type=float, nargs="+", default=None, help="override the radii of vgg11/resnet18")
    ap.add_argument("--floor-batch", type=int, default=64, help="regions' worth of forwards timed for the floor")
    ap.add_argument("--max-memory-gib", type=float, default=None, help="max_memory of compute_partition")
    ap.add_argument("--digits-steps", type=int, default=800)
    ap.add_argument("--wide-digits-steps", type=int, default=1000, help="as the callback overhead benchmark")
    ap.add_argument("--no-codes", action="store_true", help="compute_partition(codes=False) for vgg11/resnet18")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--pool-repeats", type=int, default=3, help="repeats of the pooling case")
    ap.add_argument("--repeats", type=int, default=1, help="vgg11/resnet18: partition and floors in turn, best of")
    bench_engine.add_reuse_memory_flag(ap)
    ap.add_argument("--one", nargs=2, metavar=("NET", "RADIUS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    dev = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    freed = bench_engine.apply_reuse_memory(a.reuse_memory)
    mm = int(a.max_memory_gib * 2**30) if a.max_memory_gib else None
    if a.one:
        res = run_one(a.one[0], float(a.one[1]), dev, a.floor_batch, mm, not a.no_codes, a.repeats)
        print("RESULT " + json.dumps(res))
        return
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}, {freed}")
    print(
        f"{'case':<44} {'regions':>8} {'seconds':>9} {'cpu s':>9} {'regions/s':>10} {'peak GiB':>9} {'floor s':>9} "
        f"{'x floor':>8} {'x floor (cpu)':>13} {'floor* s':>9} {'x floor*':>8}"
    )

    def show(r: dict) -> None:
        print(
            f"{r['case']:<44} {r['regions']:>8} {r['seconds']:>9.2f} {r['cpu_s']:>9.2f} "
            f"{r['regions'] / r['seconds']:>10.1f} {r['peak_gib']:>9.2f} {r['floor_s']:>9.2f} {r['ratio']:>8.2f} "
            f"{r['cpu_ratio']:>13.2f}" + (f" {r['floor_e_s']:>9.2f} {r['ratio_e']:>8.2f}" if "floor_e_s" in r else ""),
            flush=True,
        )

    for name in a.cases:
        if name == "pool":
            run_pool(dev, a.pool_repeats)
            continue
        if name in ("digits", "digits-wide"):
            wide = name == "digits-wide"
            for r in run_digits(dev, a.wide_digits_steps if wide else a.digits_steps, wide):
                show(r)
            continue
        for radius in a.radii or RADII[name]:
            cmd = [sys.executable, __file__, "--one", name, str(radius), "--device", a.device]
            cmd += ["--floor-batch", str(a.floor_batch), "--repeats", str(a.repeats)]
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            if a.max_memory_gib:
                cmd += ["--max-memory-gib", str(a.max_memory_gib)]
            if a.no_codes:
                cmd += ["--no-codes"]
            if a.reuse_memory:
                cmd += ["--reuse-memory"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                print(f"{name} r={radius}: failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            show(json.loads(line[0][7:]))


if __name__ == "__main__":
    main()
