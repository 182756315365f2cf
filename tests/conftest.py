"""Shared fixtures: two-moons data, a small MLP and a square slice (the helpers behind them live in
``callback_utils.py``; brute-force oracles for the engine tests in ``oracles.py``)."""

from __future__ import annotations

import pytest
import torch
from callback_utils import SQUARE, moons
from torch import nn

from splinecam_lightning.slices import Slice


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end runs (subprocesses, DDP, examples); -m 'not slow' skips them")


@pytest.fixture
def moons_data() -> tuple[torch.Tensor, torch.Tensor]:
    """128 two-moons points ``(x (128, 2), y (128,) in {0, 1})``."""
    return moons(128, seed=0)


@pytest.fixture
def small_mlp() -> nn.Module:
    """A seeded 2 -> 16 -> 16 -> 1 ReLU MLP."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


@pytest.fixture
def square_slice() -> Slice:
    """:data:`callback_utils.SQUARE` as a slice named ``sq``."""
    return Slice.from_vertices(SQUARE, name="sq")
