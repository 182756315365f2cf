"""Engine speed on small MLPs: fixed cost per call and regions per second (issue 12's nets).

Every case partitions the box [-1, 1]^2 of a 2-input MLP, from a :func:`prepare_model` snapshot (as the callback
does) and from the raw module (which also copies, traces and checks it). Prints regions, median and best seconds
over ``--repeats`` calls after one warm-up, the median process CPU time of a call (summed over threads; steadier
than wall time on a shared machine), and regions per second of the median wall time. Random nets use torch's default
init with seed 0; the "trained SDF" nets are fitted here to the signed distance of a five-pointed star, so
regions crowd along the learned boundary as in trained nets.

    python benchmarks/bench_mlp_speed.py                      # 2 threads, all cases
    python benchmarks/bench_mlp_speed.py --threads 1 2 --cases 2-64-1 2-1024-1
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import bench_engine
import torch
from torch import nn

from splinecam_lightning import Slice, compute_partition, prepare_model

SQUARE = bench_engine.SQUARE


def mlp(sizes: list[int], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return bench_engine.mlp(sizes)


def star_sdf(x: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance to a five-pointed star of outer radius 0.8 (negative inside)."""
    r = x.norm(dim=1)
    ang = torch.atan2(x[:, 1], x[:, 0])
    edge = 0.55 + 0.25 * torch.cos(5 * ang)
    return r - edge


def trained_sdf(sizes: list[int], steps: int = 1500, seed: int = 0) -> nn.Sequential:
    net = mlp(sizes, seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        x = torch.rand(1024, 2, generator=g) * 2 - 1
        loss = (net(x)[:, 0] - star_sdf(x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


CASES = {
    "2-2-1": lambda: mlp([2, 2, 1]),  # a handful of regions: the fixed cost per call
    "2-64-1": lambda: mlp([2, 64, 1]),
    "2-64^3-1": lambda: mlp([2, 64, 64, 64, 1]),
    "2-256-1": lambda: mlp([2, 256, 1]),
    "2-128^4-1": lambda: mlp([2, 128, 128, 128, 128, 1]),
    "2-1024-1": lambda: mlp([2, 1024, 1]),
    "sdf-2-50^2-1": lambda: trained_sdf([2, 50, 50, 1]),
    "sdf-2-100^2-1": lambda: trained_sdf([2, 100, 100, 1]),
    "sdf-2-32^4-1": lambda: trained_sdf([2, 32, 32, 32, 32, 1]),
}


def timed(model, sl: Slice, repeats: int) -> tuple[float, float, float]:
    """Median and best wall seconds, and median process CPU seconds (all threads; robust on a shared machine)."""
    ts, cs = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        compute_partition(model, sl)
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return statistics.median(ts), min(ts), statistics.median(cs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    bench_engine.add_reuse_memory_flag(ap)
    args = ap.parse_args()
    freed = bench_engine.apply_reuse_memory(args.reuse_memory)
    sl = Slice.from_vertices(SQUARE)
    print(
        f"torch {torch.__version__}, CPU, box [-1,1]^2, median (best) of {args.repeats} calls after a warm-up, {freed}"
    )
    print(
        f"{'case':<14} {'threads':>7} {'regions':>8} {'prepared ms (best)':>19} {'cpu ms':>8} "
        f"{'raw module ms (best)':>21} {'regions/s':>11}"
    )
    for name in args.cases:
        net = CASES[name]()
        for th in args.threads:
            torch.set_num_threads(th)
            prep = prepare_model(net)
            part = compute_partition(prep, sl)  # warm-up
            reps = args.repeats if part.num_regions < 50_000 else max(3, args.repeats // 3)
            med, best, cpu = timed(prep, sl, reps)
            rmed, rbest, _ = timed(net, sl, max(3, reps // 2))
            rate = part.num_regions / med if med > 0 else math.inf
            print(
                f"{name:<14} {th:>7} {part.num_regions:>8} {med * 1e3:>10.1f} ({best * 1e3:>6.1f}) {cpu * 1e3:>8.1f} "
                f"{rmed * 1e3:>12.1f} ({rbest * 1e3:>6.1f}) {rate:>11.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
