"""The callback's worker process: honest wait metrics, deferral and replay, skipping, and clean shutdown."""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch
from callback_utils import MoonsModule, frame_steps, make_trainer, moons_loader, video_frames

import splinecam_lightning.worker as worker_mod
from splinecam_lightning.callback import SplineCamCallback, SplineCamWarning
from splinecam_lightning.cli import main as cli_main
from splinecam_lightning.engine import compute_partition
from splinecam_lightning.slices import Slice


class _TimedCallback(SplineCamCallback):
    """Measures the training-thread time of the snapshot hooks from outside."""

    hook_seconds = 0.0

    def on_train_batch_end(self, *a, **k):
        t0 = time.perf_counter()
        super().on_train_batch_end(*a, **k)
        self.hook_seconds += time.perf_counter() - t0


def _slow_slice() -> Slice:
    return Slice.from_vertices([[-40.0, -40.0], [40.0, -40.0], [40.0, 40.0], [-40.0, 40.0]], name="big")


def test_wait_metric_reports_a_forced_stall(tmp_path):
    # A snapshot every step with one slot and on_backlog="wait": training must wait for the worker each time.
    cb = _TimedCallback(
        slices=[_slow_slice()],
        every_n_train_steps=1,
        dirpath=tmp_path / "sc",
        frame_size=256,
        max_queue=1,
        on_backlog="wait",
        max_overhead=None,
    )
    make_trainer(max_steps=6, logger=False, callbacks=[cb]).fit(MoonsModule(width=64), moons_loader())
    assert cb.snapshot_steps == list(range(7))
    logged = sum(h["waited"] for h in cb.history if h["step"] != 0)  # steps 1-6 are taken in on_train_batch_end
    assert cb.hook_seconds > 0.5, cb.hook_seconds  # the stall is real...
    assert logged >= 0.8 * cb.hook_seconds  # ...and the metric reports it
    assert cb.overhead_seconds >= logged
    assert all(h["worker_seconds"] > 0 for h in cb.history)


def test_defer_saves_weights_and_replay_finishes_them(tmp_path, square_slice):
    out = tmp_path / "sc"
    cb = SplineCamCallback(
        slices=[square_slice],
        every_n_train_steps=1,
        dirpath=out,
        frame_size=64,
        max_queue=1,
        on_backlog="defer",
        max_overhead=0.0,  # nothing may be finished at the end of fit: all backlog goes to disk
    )
    model = MoonsModule()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        make_trainer(max_steps=5, logger=False, callbacks=[cb]).fit(model, moons_loader())
    pending = cb.pending_steps
    assert pending, "the worker cannot have finished 6 snapshots in zero time"
    assert any(issubclass(w.category, SplineCamWarning) and "replay" in str(w.message) for w in rec)
    assert sorted(set(cb.snapshot_steps) | set(pending)) == list(range(6))  # nothing lost
    assert (out / "snapshots" / "pending.json").exists()

    assert cli_main(["replay", str(out), "--no-progress"]) == 0
    assert frame_steps(out / "sq") == list(range(6))
    assert video_frames(out / "sq.mp4") == 6
    rows = (out / "stats.csv").read_text().splitlines()
    assert len(rows) == 1 + 6
    assert not (out / "snapshots" / "pending.json").exists()
    # the last step's replayed statistics are those of the final weights
    part = compute_partition(model.net, cb.slices[0])
    header = rows[0].split(",")
    last = dict(zip(header, rows[-1].split(","), strict=True))
    assert int(last["step"]) == 5
    assert int(float(last["num_regions"])) == part.num_regions


def test_skip_drops_and_lists_snapshots(tmp_path):
    cb = SplineCamCallback(
        slices=[_slow_slice()],
        every_n_train_steps=1,
        dirpath=tmp_path / "sc",
        write_frames=False,
        max_queue=1,
        on_backlog="skip",
        max_overhead=None,
    )
    make_trainer(max_steps=8, logger=False, callbacks=[cb]).fit(MoonsModule(width=64), moons_loader())
    assert cb.skipped_steps, "one slot and a slow slice: some snapshots must be skipped"
    assert sorted(cb.snapshot_steps + cb.skipped_steps) == list(range(9))
    assert not set(cb.snapshot_steps) & set(cb.skipped_steps)


class _SlotFilesCallback(SplineCamCallback):
    """Records which shared-memory slot files still have a name once the worker has answered."""

    slot_files: list[str] | None = None

    def on_train_end(self, trainer, pl_module):
        if self._worker is not None:
            self._outbox.extend(self._worker.poll(timeout=None))  # an answer: the worker has mapped its slots
            self.slot_files = [p for p in self._worker._paths if os.path.exists(p)]
        super().on_train_end(trainer, pl_module)


def test_slot_files_are_unlinked_once_the_worker_maps_them(tmp_path, square_slice):
    """Nothing is left in /dev/shm even if both processes are killed: the names go as soon as both map them."""
    cb = _SlotFilesCallback(
        slices=[square_slice], every_n_train_steps=1, dirpath=tmp_path / "sc", write_frames=False, max_overhead=None
    )
    make_trainer(max_steps=2, logger=False, callbacks=[cb]).fit(MoonsModule(), moons_loader())
    assert cb.slot_files == []
    assert cb.snapshot_steps == [0, 1, 2]  # the slots still carry the weights after their names are gone


def test_worker_is_stopped_when_training_fails(tmp_path, square_slice):
    cb = SplineCamCallback(slices=[square_slice], every_n_train_steps=1, dirpath=tmp_path / "sc", frame_size=64)
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(max_steps=20, logger=False, callbacks=[cb]).fit(MoonsModule(fail_at_step=3), moons_loader())
    assert cb._worker is None  # stopped on the exception path
    assert not list((tmp_path / "sc").glob("**/.*.tmp"))


def test_archive_and_end_of_fit_videos_use_one_run_scale(tmp_path, square_slice, monkeypatch):
    """Also: the end of fit waits for the worker, which leaves SCHED_IDLE for the wait and goes back after."""
    from splinecam_lightning.archive import archived_partitions
    from splinecam_lightning.partition import Partition

    seen = []
    real = worker_mod._set_policy

    def spy(pid, policy):
        ok = real(pid, policy)
        seen.append((policy, os.sched_getscheduler(pid) if ok else None, ok))
        return ok

    monkeypatch.setattr(worker_mod, "_set_policy", spy)
    out = tmp_path / "sc"
    cb = SplineCamCallback(
        slices=[square_slice],
        every_n_train_steps=3,
        dirpath=out,
        frame_size=64,
        max_overhead=None,
    )
    make_trainer(max_steps=9, logger=False, callbacks=[cb]).fit(MoonsModule(), moons_loader())
    steps = cb.snapshot_steps
    assert steps == [0, 3, 6, 9]
    archived = archived_partitions(out)["sq"]
    assert [s for s, _ in archived] == steps
    last = Partition.load(archived[-1][1])
    assert last.num_regions == int(cb.history[-1]["slices"]["sq"]["num_regions"])
    # training-time frames stay; the video is redrawn from the archive with one scale
    assert frame_steps(out / "sq") == steps
    assert frame_steps(out / "sq" / "rendered") == steps
    assert video_frames(out / "sq.mp4") == len(steps)

    if hasattr(os, "SCHED_IDLE"):  # Linux
        policies = [p for p, _, _ in seen]
        assert policies and policies[0] == os.SCHED_OTHER  # the end of fit waits: lifted first
        assert os.SCHED_IDLE in policies[1:]  # and put back after the wait
        for policy, now, ok in seen:
            if ok:  # where the OS allowed it, the worker has the policy asked for
                assert now == policy


def test_local_complexity_is_logged_per_split_on_a_log_schedule(tmp_path, square_slice):
    import csv

    from splinecam_lightning.local import LocalConfig, local_complexity

    val = moons_loader(n=64, shuffle=False, seed=1)
    cb = SplineCamCallback(
        slices=[square_slice],
        log_spaced=4,
        dirpath=tmp_path / "sc",
        write_frames=False,
        max_overhead=None,
        local=LocalConfig(radius=0.3, count=8),
        module="net",
    )
    model = MoonsModule()
    trainer = make_trainer(max_steps=30, logger=False, callbacks=[cb], limit_val_batches=1)
    trainer.fit(model, moons_loader(), val)
    steps = cb.snapshot_steps
    assert steps[0] == 0 and steps[-1] == 30 and len(steps) >= 3
    last = cb.history[-1]["slices"]
    assert {"local/train", "local/val"} <= set(last)
    assert "sq" in last
    # the logged mean equals a direct batched call on the final weights and the same points
    pts = cb.state_dict()["local_points"]["val"]
    lc = local_complexity(model.net, pts, 0.3, generator=torch.Generator().manual_seed(cb.seed))
    assert last["local/val"]["num_regions"] == pytest.approx(float(lc.num_regions.double().mean()))
    rows = list(csv.DictReader(open(tmp_path / "sc" / "stats.csv")))
    assert {r["slice"] for r in rows} == {"sq", "local/train", "local/val"}
    assert (tmp_path / "sc" / "stats.png").exists()
