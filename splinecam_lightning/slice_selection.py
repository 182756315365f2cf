"""Choose 2D slices from training data, with a private seeded generator and no effect on global RNG state.

Used by :class:`~splinecam_lightning.callback.SplineCamCallback` when no slices are given, and usable on its
own::

    x, y = collect_samples(train_loader, pool_size=256, generator=torch.Generator().manual_seed(0))
    slices = choose_slices(x, y, num_slices=2, num_local_slices=1, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from splinecam_lightning.slices import Slice

__all__ = ["choose_slices", "collect_samples", "extract_xy", "preserve_rng"]

# Label vectors with more distinct values than this are not treated as class labels.
_MAX_CLASSES = 10_000
# Attempts at drawing three points that span a plane before giving up on a slice.
_MAX_TRIES = 50


@contextlib.contextmanager
def preserve_rng() -> Iterator[None]:
    """Restore the global torch (CPU), numpy and Python ``random`` states on exit.

    Data loading draws from the global RNGs (``RandomSampler`` seeds, worker seeds, random augmentations), so
    anything that reads training data outside the training loop runs inside this guard. CUDA generators are
    not touched by CPU data loading and are left alone (saving them would initialise CUDA).
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def extract_xy(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a batch (or a single sample) into inputs and optional labels.

    Understands ``x``, ``(x, y, ...)``/``[x, y, ...]`` and mappings with an input key (``"x"``, ``"input"``,
    ``"inputs"``, ``"image"``, ``"images"``, ``"data"``, ``"features"``) and an optional label key (``"y"``,
    ``"label"``, ``"labels"``, ``"target"``, ``"targets"``).

    Raises:
        ValueError: No tensor input could be found.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(batch), None
    if isinstance(batch, Mapping):
        x = next(
            (batch[k] for k in ("x", "input", "inputs", "image", "images", "data", "features") if k in batch),
            None,
        )
        if x is None:
            x = next((v for v in batch.values() if isinstance(v, (torch.Tensor, np.ndarray))), None)
        y = next((batch[k] for k in ("y", "label", "labels", "target", "targets") if k in batch), None)
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) > 0:
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
    else:
        x, y = None, None
    if x is None:
        raise ValueError(f"cannot find the model input in a batch of type {type(batch).__name__}")
    x = torch.as_tensor(x)
    if y is not None:
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError):
            y = None
    return x, y


def _class_labels(y: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``(n,)`` int64 class labels if ``y`` looks like integer class labels, else ``None``."""
    if y is None:
        return None
    y = y.detach().cpu()
    if y.ndim > 1:
        y = y.reshape(y.shape[0], -1)
        if y.shape[1] != 1:
            return None
    y = y.reshape(-1)
    if y.shape[0] != n or y.is_complex():
        return None
    if y.is_floating_point():
        if not torch.isfinite(y).all() or not torch.equal(y, y.round()):
            return None
    if y.dtype == torch.bool:
        y = y.long()
    y = y.long()
    if torch.unique(y).numel() > _MAX_CLASSES:
        return None
    return y


def collect_samples(
    source: Any,
    *,
    pool_size: int = 256,
    generator: torch.Generator | None = None,
    max_batches: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """Draw a pool of training samples to build slices from.

    A ``DataLoader`` over a map-style dataset (or such a dataset itself) is sampled by index with
    ``generator``, so the pool is the same on every process of a distributed run whatever its sampler. Other
    loaders and iterables give their first batches. The global RNG states are restored afterwards (see
    :func:`preserve_rng`).

    Args:
        source: A ``DataLoader``, a map-style dataset, an iterable of batches, or a list of loaders (the first
            is used).
        pool_size: Number of samples to draw at most.
        generator: CPU generator for the indices (default: seeded with 0).
        max_batches: Batches to read at most from an iterable source.

    Returns:
        ``(x, y, input_shape)``: ``(n, D)`` float64 flat inputs on the CPU, ``(n,)`` int64 class labels or
        ``None`` when the labels are not integer classes, and the per-sample input shape.

    Raises:
        ValueError: No samples could be read.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    source = _first_loader(source)
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor | None] = []
    with preserve_rng():
        dataset = getattr(source, "dataset", source)
        if _is_map_style(dataset):
            n = len(dataset)
            idx = torch.randperm(n, generator=generator)[:pool_size].tolist()
            for i in idx:
                x, y = extract_xy(dataset[i])
                xs.append(x.unsqueeze(0))
                ys.append(None if y is None else y.reshape(1, *y.shape))
        else:
            for b, batch in enumerate(source):
                if b >= max_batches or sum(x.shape[0] for x in xs) >= pool_size:
                    break
                x, y = extract_xy(batch)
                if x.ndim < 2:
                    x = x.unsqueeze(0)
                    y = None if y is None else y.reshape(1, *y.shape)
                xs.append(x)
                ys.append(y if y is not None and y.ndim >= 1 and y.shape[0] == x.shape[0] else None)
    if not xs:
        raise ValueError("the training data gave no samples to choose slices from")
    input_shape = tuple(int(s) for s in xs[0].shape[1:])
    x = torch.cat([t.detach().to("cpu", torch.float64).reshape(t.shape[0], -1) for t in xs])[:pool_size]
    y = None
    if all(t is not None for t in ys):
        try:
            y = torch.cat([t.detach().cpu().reshape(t.shape[0], -1) for t in ys])[:pool_size]  # type: ignore[union-attr]
        except RuntimeError:
            y = None
    return x, _class_labels(y, x.shape[0]), input_shape


def _first_loader(source: Any) -> Any:
    """The loader :func:`collect_samples` reads from a list or mapping of loaders (the first one)."""
    if isinstance(source, (list, tuple)) and source and not isinstance(source[0], torch.Tensor):
        source = source[0]
    if isinstance(source, Mapping) and source and not any(isinstance(v, torch.Tensor) for v in source.values()):
        source = next(iter(source.values()))  # CombinedLoader-style mapping of loaders
    return source


def reads_by_index(source: Any) -> bool:
    """Whether :func:`collect_samples` reads ``source`` by index (a map-style dataset), which leaves what training
    draws from it untouched; iterating any other loader would consume or advance it."""
    source = _first_loader(source)
    return source is not None and _is_map_style(getattr(source, "dataset", source))


def _is_map_style(dataset: Any) -> bool:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return False
    try:
        n = len(dataset)
    except TypeError:
        return False
    return n > 0 and hasattr(dataset, "__getitem__") and not isinstance(dataset, (torch.Tensor, list, tuple))


def _pick_three(labels: torch.Tensor | None, n: int, generator: torch.Generator) -> list[int]:
    """Three distinct sample indices, from three different classes when possible (two when only two exist)."""
    if labels is not None:
        classes = torch.unique(labels)
        if classes.numel() >= 2:
            order = classes[torch.randperm(classes.numel(), generator=generator)]
            if classes.numel() >= 3:
                chosen = order[:3].tolist()
            else:
                chosen = [
                    order[0].item(),
                    order[1].item(),
                    order[int(torch.randint(2, (1,), generator=generator))].item(),
                ]
            picked: list[int] = []
            for c in chosen:
                members = torch.nonzero(labels == c).reshape(-1)
                members = members[~torch.isin(members, torch.tensor(picked, dtype=torch.long))]
                if members.numel() == 0:
                    break
                picked.append(int(members[torch.randint(members.numel(), (1,), generator=generator)]))
            if len(picked) == 3:
                return picked
    return torch.randperm(n, generator=generator)[:3].tolist()


def _class_tag(labels: torch.Tensor | None, idx: Sequence[int]) -> str:
    """``"c0-c1-c2_"`` for the classes of samples ``idx`` (empty without labels); safe in file names."""
    if labels is None:
        return ""
    return "-".join(f"c{c}" if c >= 0 else f"cm{-c}" for c in (int(labels[i]) for i in idx)) + "_"


def choose_slices(
    x: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    num_slices: int = 2,
    num_local_slices: int = 1,
    local_radius: float | None = None,
    margin: float = 0.2,
    generator: torch.Generator | None = None,
) -> list[Slice]:
    """Build slices from a pool of samples.

    * ``num_slices`` planes: each is :meth:`Slice.through_points` of three samples, from three different
      classes when ``labels`` holds at least three classes, from both classes when it holds two, and any three
      samples otherwise. Draws whose points are repeated or collinear are redrawn.
    * ``num_local_slices`` local squares: :meth:`Slice.around` a random sample, with half-width
      ``local_radius``. The default radius is 10% of the root-mean-square distance of the pool to its mean.

    Names say what a slice is and are unique, filesystem-safe folder names: the classes of its anchors in
    anchor order, then its index among slices of its kind, e.g. ``plane_c0-c1-c2_0``, ``plane_c3-c3-c7_1``,
    ``local_c3_0`` (a negative class ``-1`` is written ``cm1``). Without class labels: ``plane_0``,
    ``local_0``.

    Args:
        x: ``(n, D)`` flat samples (``n >= 3`` for through-point slices).
        labels: ``(n,)`` integer class labels, or ``None``.
        num_slices: Number of three-point slices.
        num_local_slices: Number of local slices.
        local_radius: Half-width of local slices (input units).
        margin: Margin of three-point slices, see :meth:`Slice.through_points`.
        generator: CPU generator for every random choice (default: seeded with 0). The global RNG is not used.

    Raises:
        ValueError: Too few or degenerate samples (e.g. all identical).
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    x = torch.as_tensor(x).detach().to("cpu", torch.float64).reshape(len(x), -1)
    n = x.shape[0]
    if labels is not None and labels.shape[0] != n:
        labels = None
    slices: list[Slice] = []
    for i in range(num_slices):
        if n < 3:
            raise ValueError(f"need at least 3 training samples to choose a slice, got {n}")
        last_err: Exception | None = None
        for _ in range(_MAX_TRIES):
            a, b, c = _pick_three(labels, n, generator)
            try:
                name = f"plane_{_class_tag(labels, (a, b, c))}{i}"
                slices.append(Slice.through_points(x[a], x[b], x[c], margin=margin, name=name))
                break
            except ValueError as e:  # repeated / collinear samples: draw again
                last_err = e
        else:
            raise ValueError(f"could not find three training samples spanning a plane: {last_err}")
    if num_local_slices > 0:
        if n < 1:
            raise ValueError("need at least one training sample for a local slice")
        radius = local_radius
        if radius is None:
            rms = float((x - x.mean(0)).pow(2).sum(1).mean().sqrt())
            radius = 0.1 * rms if rms > 0 else 0.1
        for i in range(num_local_slices):
            j = int(torch.randint(n, (1,), generator=generator))
            name = f"local_{_class_tag(labels, (j,))}{i}"
            slices.append(Slice.around(x[j], radius, generator=generator, name=name))
    return slices
