"""The one family of errors and warnings the library raises; import them from here (or the package root)."""

from __future__ import annotations

__all__ = [
    "SplineCamError",
    "UnsupportedModelError",
    "TooManyRegionsError",
    "MemoryBudgetError",
    "OutputChoiceError",
    "SplineCamWarning",
]


class SplineCamError(Exception):
    """Base class of every error splinecam-lightning raises on purpose."""


class UnsupportedModelError(SplineCamError, TypeError, NotImplementedError, ValueError):
    """The model contains an operation that is not affine or continuous piecewise-linear, or cannot be traced.

    It also subclasses ``TypeError``, ``NotImplementedError`` and ``ValueError`` so that callers catching any of
    them see it.
    """


class OutputChoiceError(UnsupportedModelError):
    """The model's forward returns several values (a tuple, list or dict) and ``output=`` chooses none of them,
    or names one it does not return."""


class TooManyRegionsError(SplineCamError, RuntimeError, ValueError):
    """The partition would have more regions than ``max_regions`` (raised before the memory is allocated)."""


class MemoryBudgetError(SplineCamError, MemoryError):
    """Even the smallest chunk of work does not fit the memory budget (raised before allocating), or the
    allocator failed; the message names the layer, the regions so far and the budget."""


class SplineCamWarning(UserWarning):
    """A SplineCam snapshot, frame, video or log call failed and training went on; or what was partitioned
    differs from the caller's model in a way to know about (its forward hooks are not run)."""
