"""splinecam-lightning: exact linear-region partitions of piecewise-linear networks, watched while they train."""

from splinecam_lightning.boundary import decision_boundary, sample_boundary
from splinecam_lightning.engine import PreparedModel, check_model, compute_partition, prepare_model
from splinecam_lightning.errors import (
    MemoryBudgetError,
    OutputChoiceError,
    SplineCamError,
    SplineCamWarning,
    TooManyRegionsError,
    UnsupportedModelError,
)
from splinecam_lightning.layers import Maxout
from splinecam_lightning.local import LocalComplexity, LocalConfig, local_complexity, log_spaced_steps
from splinecam_lightning.partition import Partition
from splinecam_lightning.slices import Slice
from splinecam_lightning.stats import partition_stats

__all__ = [
    "SplineCamCallback",
    "make_video",
    "plot_stats",
    "render_partition",
    "save_frame",
    "Maxout",
    "LocalComplexity",
    "LocalConfig",
    "Partition",
    "PreparedModel",
    "Slice",
    "TooManyRegionsError",
    "MemoryBudgetError",
    "OutputChoiceError",
    "SplineCamError",
    "SplineCamWarning",
    "UnsupportedModelError",
    "check_model",
    "compute_partition",
    "decision_boundary",
    "local_complexity",
    "log_spaced_steps",
    "partition_stats",
    "prepare_model",
    "sample_boundary",
]
__version__ = "0.1.0"


_LAZY = {
    # Edges with heavier imports (Lightning, matplotlib, imageio) load only when asked for.
    "SplineCamCallback": "splinecam_lightning.callback",
    "make_video": "splinecam_lightning.video",
    "plot_stats": "splinecam_lightning.video",
    "render_partition": "splinecam_lightning.render",
    "save_frame": "splinecam_lightning.render",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'splinecam_lightning' has no attribute {name!r}")
