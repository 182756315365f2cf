"""An MLP on scikit-learn's bundled 8x8 digits, watched on slices through three training digits.

The callback records the partition (regions coloured by predicted class, the decision boundary in red) on each
slice while the network trains. Afterwards the exact decision boundary between the first two of the slice's
three classes (``class_pair``) is sampled with ``sample_boundary``: the samples are input images on which
the network hesitates between the two classes, shown as 8x8 images in ``<slice>_boundary_samples.png``.
Nothing is downloaded.

Run::

    python examples/digits_mlp.py            # ~1-2 minutes on 2 CPU cores
    python examples/digits_mlp.py --quick    # smoke test
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _digits  # noqa: E402

DEFAULTS = {"steps": 1500, "every": 100, "num_slices": 2, "margin": 0.2, "lr": 2e-3, "out": "examples_out/digits_mlp"}
QUICK = {"steps": 60, "every": 30, "num_slices": 1, "frame_size": 128, "samples": 8, "width": 16, "lr": 1e-2}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the summary (also written to ``summary.json``)."""
    args = _digits.parse_args(argv, __doc__.split("\n\n")[0], DEFAULTS, QUICK)
    width = getattr(args, "width", 64)
    return _digits.run(args, lambda: _common.mlp(64, width, 3, 10), input_shape=None, tag=f"mlp{width}x3")


if __name__ == "__main__":
    main()
