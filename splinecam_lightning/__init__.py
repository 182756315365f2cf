"""splinecam-lightning: exact linear-region partitions of piecewise-linear networks, watched while they train."""

from splinecam_lightning.boundary import decision_boundary, sample_boundary
from splinecam_lightning.engine import check_model, compute_partition
from splinecam_lightning.layers import Maxout
from splinecam_lightning.partition import Partition
from splinecam_lightning.refine import TooManyRegionsError
from splinecam_lightning.slices import Slice
from splinecam_lightning.stats import partition_stats
from splinecam_lightning.tracing import UnsupportedModelError

__all__ = [
    "Maxout",
    "Partition",
    "Slice",
    "TooManyRegionsError",
    "UnsupportedModelError",
    "check_model",
    "compute_partition",
    "decision_boundary",
    "partition_stats",
    "sample_boundary",
]
__version__ = "0.1.0"
