"""Small piecewise-linear layers that torch.nn lacks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Maxout", "mlp"]


class Maxout(nn.Module):
    """Maxout over groups of ``pool_size`` consecutive channels (dim 1): ``(N, C*k, ...) -> (N, C, ...)``."""

    def __init__(self, pool_size: int) -> None:
        super().__init__()
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.pool_size = pool_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % self.pool_size:
            raise ValueError(f"channel count {x.shape[1]} is not a multiple of pool_size {self.pool_size}")
        return x.unflatten(1, (x.shape[1] // self.pool_size, self.pool_size)).amax(2)

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}"


def mlp(in_dim: int, width: int, depth: int, out_dim: int = 1, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """``in_dim -> width x depth -> out_dim`` MLP with ``activation`` after every hidden Linear layer."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), activation()]
        d = width
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)
