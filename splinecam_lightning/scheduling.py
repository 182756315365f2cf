"""When SplineCam snapshots are taken, and how much training time they may cost.

Pure Python: no Lightning or torch imports.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Sequence

__all__ = ["SnapshotSchedule", "OverheadBudget", "log_spaced_steps", "BACKLOG_POLICIES"]

#: What happens to a due snapshot while every weight slot is taken (see ``SplineCamCallback(on_backlog=)``).
BACKLOG_POLICIES = ("wait", "skip", "defer")


def log_spaced_steps(max_steps: int, num: int) -> list[int]:
    """About ``num`` steps from 0 to ``max_steps``, evenly spaced on a log axis (sorted, unique, with 0 and the end).

    Training dynamics unfold on a log time axis, so early steps get most snapshots.
    """
    if max_steps < 1 or num < 1:
        return [0]
    steps = {0, int(max_steps)}
    for i in range(num):
        steps.add(int(round(math.expm1(math.log1p(max_steps) * i / max(1, num - 1)))))
    return sorted(s for s in steps if 0 <= s <= max_steps)


class SnapshotSchedule:
    """Exactly one of: every ``n`` optimizer steps, every ``n`` epochs, a wall-clock interval, explicit steps, or
    ``log_spaced`` (a number of log-spaced steps up to the run's last step, fixed when training starts).

    With none given, every 100 steps.
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        train_time_interval: datetime.timedelta | float | None = None,
        at_steps: Sequence[int] | None = None,
        log_spaced: int | bool | None = None,
    ) -> None:
        given = [
            n
            for n, v in (
                ("every_n_train_steps", every_n_train_steps),
                ("every_n_epochs", every_n_epochs),
                ("train_time_interval", train_time_interval),
                ("at_steps", at_steps),
                ("log_spaced", log_spaced or None),
            )
            if v is not None
        ]
        if len(given) > 1:
            raise ValueError(
                "give at most one of every_n_train_steps, every_n_epochs, train_time_interval, at_steps, "
                f"log_spaced; got {given}"
            )
        if not given:
            every_n_train_steps = 100
        if every_n_train_steps is not None and (not isinstance(every_n_train_steps, int) or every_n_train_steps < 1):
            raise ValueError(f"every_n_train_steps must be a positive int, got {every_n_train_steps!r}")
        if every_n_epochs is not None and (not isinstance(every_n_epochs, int) or every_n_epochs < 1):
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        interval_s: float | None = None
        if train_time_interval is not None:
            interval_s = (
                train_time_interval.total_seconds()
                if isinstance(train_time_interval, datetime.timedelta)
                else float(train_time_interval)
            )
            if not (interval_s > 0 and math.isfinite(interval_s)):
                raise ValueError(f"train_time_interval must be positive, got {train_time_interval!r}")
        steps: set[int] | None = None
        if at_steps is not None:
            steps = {int(s) for s in at_steps}
            if not steps or min(steps) < 0:
                raise ValueError(f"at_steps must be a non-empty list of steps >= 0, got {at_steps!r}")
        if log_spaced is True:
            log_spaced = 30
        if log_spaced is not None and log_spaced is not False and (not isinstance(log_spaced, int) or log_spaced < 2):
            raise ValueError(f"log_spaced must be True or a number of snapshots >= 2, got {log_spaced!r}")
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.train_time_interval = interval_s
        self.at_steps = steps
        self.log_spaced = int(log_spaced) if log_spaced else None
        self._last_time = time.monotonic()

    @property
    def by_time(self) -> bool:
        return self.train_time_interval is not None

    def start(self, max_steps: int | None) -> None:
        """Fix the log-spaced steps once the run's length is known; restart the interval clock."""
        if self.log_spaced is not None:
            if max_steps is None or max_steps <= 0 or not math.isfinite(max_steps):
                raise ValueError("log_spaced needs a known number of training steps (set max_steps or max_epochs)")
            self.at_steps = set(log_spaced_steps(int(max_steps), self.log_spaced))
        self._last_time = time.monotonic()

    def due_at_step(self, step: int) -> bool:
        """After an optimizer step (``step`` is the new ``global_step``)."""
        if self.every_n_train_steps is not None:
            return step % self.every_n_train_steps == 0
        if self.at_steps is not None:
            return step in self.at_steps
        if self.train_time_interval is not None:
            return time.monotonic() - self._last_time >= self.train_time_interval
        return False

    def due_at_epoch_end(self, epoch: int) -> bool:
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def taken(self) -> None:
        self._last_time = time.monotonic()


class OverheadBudget:
    """The training-thread time the callback may spend, as a fraction of the training time around it.

    ``spent`` counts every second the callback held the training thread (weight copies, waits, deferred
    writes, the end-of-fit finish); training time is the wall time since :meth:`start` minus ``spent``.

    Args:
        fraction: Allowed ``spent / training time``; ``None`` for no limit.
    """

    def __init__(self, fraction: float | None) -> None:
        if fraction is not None and not (fraction >= 0 and math.isfinite(fraction)):
            raise ValueError(f"max_overhead must be a fraction >= 0 or None, got {fraction!r}")
        self.fraction = fraction
        self.spent = 0.0
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self.spent = 0.0
        self._t0 = time.perf_counter()

    def add(self, seconds: float) -> None:
        self.spent += seconds

    @property
    def training_seconds(self) -> float:
        return max(0.0, time.perf_counter() - self._t0 - self.spent)

    def remaining(self) -> float:
        """Seconds the callback may still spend (``inf`` without a limit)."""
        if self.fraction is None:
            return math.inf
        return self.fraction * self.training_seconds - self.spent
