"""Shared fixtures: two-moons data, a small MLP and a square slice (the helpers behind them live in
``callback_utils.py``; brute-force oracles for the engine tests in ``oracles.py``)."""

from __future__ import annotations

import os

# Under pytest-xdist (`-n 2` in pyproject.toml) two test processes share the cores: one torch thread each (and
# in their subprocesses), or their OpenMP threads wait on each other's descheduled threads. A 20-step fit of a
# tiny ResNet took 9.6 s with 2 threads per process on the busy 2-core machine, against 0.16 s with 1.
_XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if _XDIST:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if _XDIST:
    torch.set_num_threads(1)
from callback_utils import SQUARE, moons  # noqa: E402
from torch import nn  # noqa: E402

from splinecam_lightning.slices import Slice  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end runs (subprocesses, DDP, examples); -m 'not slow' skips them")


_LIGHTNING_RUNS = ("test_callback", "test_archive", "test_cli", "test_readme", "test_examples")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: slow runs, then the Lightning runs, then the quick core tests, so that the two xdist
    processes end together (an idle process steals queued tests, and quick ones balance best)."""

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("slow"):
            return 0
        return 1 if item.path.name.startswith(_LIGHTNING_RUNS) else 2

    items.sort(key=rank)  # stable: file order within a rank


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
