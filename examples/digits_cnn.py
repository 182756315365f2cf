"""A small CNN (conv + ReLU + max pooling + linear) on the bundled 8x8 digits, input shape ``(1, 8, 8)``.

As ``digits_mlp.py``: slices through three training digits of different classes are watched while training,
then the exact decision boundary between two of the classes is sampled and the samples shown as 8x8 images.
Max pooling makes the partition finer than an MLP's, so the CNN is small and snapshots are sparse.

Run::

    python examples/digits_cnn.py            # a few minutes on 2 CPU cores
    python examples/digits_cnn.py --quick    # smoke test
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _digits  # noqa: E402

DEFAULTS = {"steps": 800, "every": 200, "num_slices": 1, "margin": 0.1, "lr": 3e-3, "out": "examples_out/digits_cnn"}
QUICK = {
    "steps": 60,
    "every": 60,
    "num_slices": 1,
    "frame_size": 128,
    "samples": 8,
    "channels": (2, 2),
    "margin": 0.0,
    "lr": 2e-2,
}


def make_cnn(channels: tuple[int, int] = (4, 8)) -> nn.Sequential:
    """``(1, 8, 8) -> conv3 -> ReLU -> maxpool2 -> conv3 -> ReLU -> maxpool2 -> linear -> 10``."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 2 * 2, 10),
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the summary (also written to ``summary.json``)."""
    args = _digits.parse_args(argv, __doc__.split("\n\n")[0], DEFAULTS, QUICK)
    channels = getattr(args, "channels", (4, 8))
    return _digits.run(args, lambda: make_cnn(channels), input_shape=(1, 8, 8), tag=f"cnn{channels[0]}-{channels[1]}")


if __name__ == "__main__":
    main()
