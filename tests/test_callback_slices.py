"""Choosing slices from training data: classes, determinism, global RNG left alone, batch formats."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from callback_utils import moons
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from splinecam_lightning.slice_selection import choose_slices, collect_samples, extract_xy, preserve_rng


def _labels_of(anchors_in, x, y):
    """Labels of the pool samples a slice's anchors came from."""
    out = []
    for a in anchors_in:
        i = int(torch.cdist(a[None], x).argmin())
        assert torch.allclose(x[i], a, atol=1e-9)
        out.append(int(y[i]))
    return out


def test_three_class_slices_use_three_classes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 5, generator=g, dtype=torch.float64)
    y = torch.arange(90) % 3
    slices = choose_slices(x, y, num_slices=4, num_local_slices=0, generator=torch.Generator().manual_seed(1))
    for i, s in enumerate(slices):
        pts = s.to_input(s.anchors)
        assert sorted(_labels_of(pts, x, y)) == [0, 1, 2]
        # The name gives the anchors' classes in anchor order, and the slice's index.
        assert s.name == "plane_" + "-".join(f"c{c}" for c in _labels_of(pts, x, y)) + f"_{i}"


def test_two_class_slices_use_both_classes_and_local_slices():
    x, y = moons(64)
    x = x.double()
    slices = choose_slices(x, y.long(), num_slices=3, num_local_slices=2, generator=torch.Generator().manual_seed(0))
    for s in slices[:3]:
        assert set(_labels_of(s.to_input(s.anchors), x, y)) == {0, 1}
    for i, s in enumerate(slices[3:]):
        assert s.name == f"local_c{_labels_of(s.to_input(s.anchors), x, y)[0]}_{i}"
        assert s.anchors.shape == (1, 2)
        # default radius: 10% of the RMS spread of the pool
        rms = float((x - x.mean(0)).pow(2).sum(1).mean().sqrt())
        assert float(s.domain.abs().max()) == pytest.approx(0.1 * rms)


def test_choice_is_deterministic_and_leaves_global_rng_alone():
    x, y = moons(64)
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    a = choose_slices(x, y, generator=torch.Generator().manual_seed(5))
    b = choose_slices(x, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]
    for sa, sb in zip(a, b, strict=True):
        assert torch.equal(sa.origin, sb.origin) and torch.equal(sa.basis, sb.basis)


def test_collect_samples_from_shuffled_loader_preserves_rng():
    x, y = moons(100)
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    xs, ys, shape = collect_samples(loader, pool_size=40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert xs.shape == (40, 2) and xs.dtype == torch.float64
    assert ys is not None and ys.dtype == torch.int64 and set(ys.tolist()) <= {0, 1}
    assert shape == (2,)


class _Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(50):
            yield {"image": torch.randn(1, 4, 4, generator=g), "label": torch.randint(3, (), generator=g)}


def test_collect_samples_from_iterable_dict_batches():
    xs, ys, shape = collect_samples(DataLoader(_Stream(), batch_size=8), pool_size=20)
    assert xs.shape == (20, 16)
    assert shape == (1, 4, 4)
    assert ys is not None and ys.shape == (20,)


def test_regression_targets_are_not_classes():
    x = torch.randn(30, 3)
    y = torch.randn(30)
    _, ys, _ = collect_samples(TensorDataset(x, y), pool_size=30)
    assert ys is None


def test_extract_xy_formats():
    t = torch.zeros(4, 2)
    assert extract_xy(t)[1] is None
    assert extract_xy((t, torch.ones(4)))[1].shape == (4,)
    assert extract_xy({"x": t, "y": torch.ones(4)})[0] is not None
    with pytest.raises(ValueError):
        extract_xy("text")


def test_degenerate_pool_is_a_clear_error():
    with pytest.raises(ValueError, match="three training samples"):
        choose_slices(torch.zeros(10, 3), None, num_slices=1, num_local_slices=0)
    with pytest.raises(ValueError, match="at least 3"):
        choose_slices(torch.randn(2, 3), None, num_slices=1, num_local_slices=0)


def test_preserve_rng_restores_after_draws():
    torch.manual_seed(1)
    s = torch.get_rng_state()
    with preserve_rng():
        torch.rand(10)
        np.random.rand(3)
    assert torch.equal(torch.get_rng_state(), s)


def test_slice_names_are_unique_safe_folder_names():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([-1, 0, 1] * 20)
    named = choose_slices(x, y, num_slices=5, num_local_slices=3, generator=torch.Generator().manual_seed(2))
    plain = choose_slices(x, None, num_slices=2, num_local_slices=1)
    for slices in (named, plain):
        names = [s.name for s in slices]
        assert len(set(names)) == len(names)
        assert all(re.fullmatch(r"[a-z0-9_-]+", n) for n in names), names
    assert any("cm1" in n for n in (s.name for s in named))  # class -1 has no '-' of its own
    assert [s.name for s in plain] == ["plane_0", "plane_1", "local_0"]
