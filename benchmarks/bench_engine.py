"""Speed of the exact partition engine on the issue's reference networks.

Prints, for each case: sizes, regions, seconds (best of ``--repeats``) and regions per second, once per thread
count. Networks use torch's default init with the printed seeds; everything runs in float64 inside the engine.

    python benchmarks/bench_engine.py                 # CPU, 1 and 2 threads
    python benchmarks/bench_engine.py --device cuda   # on a GPU
    python benchmarks/bench_engine.py --cases mlp1024 --threads 2
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from splinecam_lightning import Slice, compute_partition, memory

SQUARE = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)


def add_reuse_memory_flag(ap: argparse.ArgumentParser) -> None:
    """``--reuse-memory``: measure with freed memory kept in the heap, as the snapshot worker runs."""
    ap.add_argument(
        "--reuse-memory",
        action="store_true",
        help="memory.reuse_freed_memory() first, as the snapshot worker does (freed blocks stay in the heap)",
    )


def apply_reuse_memory(enabled: bool) -> str:
    """Switch the allocator if ``enabled``; returns how freed memory is handled, for the header line."""
    if enabled and memory.reuse_freed_memory():
        return "freed memory reused (as in the snapshot worker)"
    return "freed memory returned to the OS (glibc default)"


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train_sdf_mlp(seed: int, steps: int = 1500) -> nn.Module:
    """2->64x4->1 MLP fitted to the signed distance of a circle: regions crowd along the learned boundary."""
    torch.manual_seed(seed)
    net = mlp([2, 64, 64, 64, 64, 1])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        x = torch.rand(512, 2) * 4 - 2
        y = x.norm(dim=1, keepdim=True) - 1.0
        loss = (net(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def train_moons_classifier(seed: int, steps: int = 1500) -> nn.Module:
    """2->32x3->2 classifier on generated two-moons data."""
    torch.manual_seed(seed)
    n = 1024
    t = torch.rand(n) * math.pi
    lab = torch.randint(0, 2, (n,))
    x = torch.stack([torch.cos(t), torch.sin(t)], 1)
    x = torch.where(lab[:, None] == 1, torch.stack([1 - x[:, 0], 0.5 - x[:, 1]], 1), x)
    x = x + 0.1 * torch.randn(n, 2)
    net = mlp([2, 32, 32, 32, 2])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(x), lab)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cases(selected: set[str]):
    if "mlp1024" in selected:
        torch.manual_seed(0)
        yield (
            "mlp1024",
            "2->1024->1 on [-1,1]^2, seed 0",
            mlp([2, 1024, 1]),
            Slice.from_vertices(SQUARE),
            None,
        )
    if "mlp64x3" in selected:
        torch.manual_seed(0)
        yield (
            "mlp64x3",
            "2->64->64->64->1 on [-2,2]^2, seed 0",
            mlp([2, 64, 64, 64, 1]),
            Slice.from_vertices(2 * SQUARE),
            None,
        )
    if "mlp784" in selected:
        torch.manual_seed(0)
        net = mlp([784, 50, 50, 50, 10])
        g = torch.Generator().manual_seed(1)
        a, b, c = torch.randn(3, 784, generator=g)
        yield (
            "mlp784",
            "784->50->50->50->10, plane through 3 points, seeds 0/1",
            net,
            Slice.through_points(a, b, c),
            None,
        )
    if "trained_sdf" in selected:
        yield (
            "trained_sdf",
            "trained SDF MLP 2->64x4->1 on [-2,2]^2, seed 0",
            train_sdf_mlp(0),
            Slice.from_vertices(2 * SQUARE),
            None,
        )
    if "trained_moons" in selected:
        yield (
            "trained_moons",
            "trained two-moons 2->32x3->2 on [-1.5,2.5]x[-1,1.5], seed 0",
            train_moons_classifier(0),
            Slice.from_vertices(torch.tensor([[-1.5, -1.0], [2.5, -1.0], [2.5, 1.5], [-1.5, 1.5]])),
            None,
        )
    if "cnn" in selected:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        x = torch.rand(3 * 16 * 16, generator=g)
        sl = Slice.around(x, 0.5, generator=torch.Generator().manual_seed(2))
        yield (
            "cnn",
            "CNN conv8-pool-conv16-pool-fc32-fc10 on 3x16x16, square r=0.5, seeds 0/1/2",
            SmallCNN(),
            sl,
            (3, 16, 16),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--cases", nargs="+", default=["mlp1024", "mlp64x3", "mlp784", "trained_sdf", "trained_moons", "cnn"]
    )
    args = ap.parse_args()
    print(f"torch {torch.__version__}, device {args.device}")
    print(f"{'case':<14} {'threads':>7} {'regions':>8} {'seconds':>9} {'regions/s':>11}  description")
    for name, desc, net, sl, shape in cases(set(args.cases)):
        net = net.to(args.device)
        for th in args.threads:
            torch.set_num_threads(th)
            compute_partition(net, sl, input_shape=shape)  # warm-up
            best = math.inf
            for _ in range(args.repeats):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                p = compute_partition(net, sl, input_shape=shape)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            print(
                f"{name:<14} {th:>7} {p.num_regions:>8} {best:>9.3f} {p.num_regions / best:>11.0f}  {desc}",
                flush=True,
            )


if __name__ == "__main__":
    main()
