"""splinecam-lightning: exact linear-region partitions of piecewise-linear networks, watched while they train."""

from splinecam_lightning.boundary import decision_boundary, sample_boundary
from splinecam_lightning.engine import PreparedModel, check_model, compute_partition, prepare_model
from splinecam_lightning.layers import Maxout
from splinecam_lightning.partition import Partition
from splinecam_lightning.refine import TooManyRegionsError
from splinecam_lightning.slices import Slice
from splinecam_lightning.stats import partition_stats
from splinecam_lightning.tracing import UnsupportedModelError

__all__ = [
    "SplineCamCallback",
    "Maxout",
    "Partition",
    "PreparedModel",
    "Slice",
    "TooManyRegionsError",
    "UnsupportedModelError",
    "check_model",
    "compute_partition",
    "decision_boundary",
    "partition_stats",
    "prepare_model",
    "sample_boundary",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The callback needs Lightning; import it only when asked so the core stays importable without it.
    if name == "SplineCamCallback":
        from splinecam_lightning.callback import SplineCamCallback

        return SplineCamCallback
    raise AttributeError(f"module 'splinecam_lightning' has no attribute {name!r}")
