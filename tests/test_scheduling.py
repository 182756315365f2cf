"""Snapshot schedules and the overhead budget (pure Python)."""

from __future__ import annotations

import time

import pytest

from splinecam_lightning.scheduling import OverheadBudget, SnapshotSchedule, log_spaced_steps


def test_log_spaced_steps_are_sorted_unique_and_dense_early():
    steps = log_spaced_steps(10_000, 20)
    assert steps[0] == 0 and steps[-1] == 10_000
    assert steps == sorted(set(steps))
    assert len([s for s in steps if s <= 100]) >= len([s for s in steps if s > 1000])  # log axis: early-heavy
    assert log_spaced_steps(0, 5) == [0]


def test_schedule_kinds_are_exclusive_and_validated():
    with pytest.raises(ValueError, match="at most one"):
        SnapshotSchedule(every_n_train_steps=5, at_steps=[1])
    with pytest.raises(ValueError, match="at most one"):
        SnapshotSchedule(log_spaced=True, every_n_epochs=1)
    with pytest.raises(ValueError):
        SnapshotSchedule(at_steps=[])
    with pytest.raises(ValueError):
        SnapshotSchedule(log_spaced=1)
    assert SnapshotSchedule().every_n_train_steps == 100


def test_at_steps_and_log_spaced_due():
    s = SnapshotSchedule(at_steps=[3, 7])
    s.start(None)
    assert [k for k in range(10) if s.due_at_step(k)] == [3, 7]
    s = SnapshotSchedule(log_spaced=10)
    with pytest.raises(ValueError, match="max_steps"):
        s.start(None)
    s.start(1000)
    due = [k for k in range(1001) if s.due_at_step(k)]
    assert due == [k for k in log_spaced_steps(1000, 10) if k > 0] or due == log_spaced_steps(1000, 10)


def test_overhead_budget_tracks_spent_time():
    b = OverheadBudget(0.5)
    b.start()
    time.sleep(0.05)
    assert b.remaining() > 0
    b.add(1.0)
    assert b.remaining() < 0  # spent far more than half the training time
    assert OverheadBudget(None).remaining() == float("inf")
    with pytest.raises(ValueError):
        OverheadBudget(-1)
