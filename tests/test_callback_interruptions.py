"""Interruptions: Ctrl-C, a worker process that dies, and checkpoints taken while snapshots are running."""

from __future__ import annotations

import json
import os
import signal
import threading
import warnings

import pytest
import torch
from callback_utils import SQUARE, MoonsModule, make_trainer, moons_loader

from splinecam_lightning.callback import SplineCamCallback, SplineCamWarning
from splinecam_lightning.cli import main as cli_main
from splinecam_lightning.slices import Slice


def _callback(tmp_path, **kw) -> SplineCamCallback:
    # Every step a snapshot: the worker is still starting (a fresh interpreter importing torch) for the first
    # steps, so snapshots are queued or running when the interruption comes.
    square = Slice.from_vertices(SQUARE, name="sq")
    args = {"slices": [square], "every_n_train_steps": 1, "dirpath": tmp_path / "sc", "frame_size": 64}
    return SplineCamCallback(**{**args, **kw})


def _accounted(cb: SplineCamCallback) -> set[int]:
    return set(cb.snapshot_steps) | set(cb.pending_steps) | set(cb.skipped_steps)


class _InterruptAt(MoonsModule):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.stop_at = step

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step >= self.stop_at:
            raise KeyboardInterrupt


def test_keyboard_interrupt_saves_the_backlog_without_computing_it(tmp_path):
    # max_overhead=None would finish everything at the end of fit; after Ctrl-C nothing more is computed.
    cb = _callback(tmp_path, max_overhead=None, max_queue=8)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(SystemExit):  # Lightning's graceful shutdown exits after on_exception
                make_trainer(max_steps=50, logger=False, callbacks=[cb]).fit(_InterruptAt(4), moons_loader())
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT from then on
    taken = set(range(5))
    assert _accounted(cb) == taken  # nothing lost
    assert cb.pending_steps  # the worker was still importing torch: left for replay, not computed now
    folder = tmp_path / "sc" / "snapshots"
    assert json.loads((folder / "pending.json").read_text())["steps"] == cb.pending_steps
    assert all((folder / f"{s:08d}.pt").exists() for s in cb.pending_steps)
    assert any("interrupted" in str(w.message) for w in caught if w.category is SplineCamWarning)
    assert cli_main(["replay", str(tmp_path / "sc")]) == 0
    rows = (tmp_path / "sc" / "stats.csv").read_text().splitlines()[1:]
    assert sorted({int(r.split(",")[0]) for r in rows}) == sorted(taken)
    assert (tmp_path / "sc" / "sq.mp4").exists()


class _CtrlCAtTheEnd(MoonsModule):
    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step == self.trainer.max_steps:  # Ctrl-C 1 s into the end-of-fit wait for the backlog
            threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()


def test_ctrl_c_while_the_end_of_fit_waits_saves_the_backlog(tmp_path):
    cb = _callback(tmp_path, max_overhead=None, max_queue=3)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            make_trainer(max_steps=12, logger=False, callbacks=[cb]).fit(_CtrlCAtTheEnd(), moons_loader())
    finally:
        signal.signal(signal.SIGINT, handler)
    assert _accounted(cb) == set(range(13))
    assert cb.pending_steps  # the worker was still starting: the slots and the queue are saved, not lost
    folder = tmp_path / "sc" / "snapshots"
    assert json.loads((folder / "pending.json").read_text())["steps"] == cb.pending_steps
    assert all((folder / f"{s:08d}.pt").exists() for s in cb.pending_steps)


class _KillWorkerAt(MoonsModule):
    def __init__(self, cb: SplineCamCallback, step: int) -> None:
        super().__init__()
        self.cb, self.kill_at = cb, step

    def on_train_batch_end(self, outputs, batch, batch_idx):
        worker = self.cb._worker
        if self.global_step == self.kill_at and worker is not None:
            os.kill(worker._proc.pid, signal.SIGKILL)
            worker._proc.wait()


@pytest.mark.parametrize("max_overhead", [None, 0.0])
def test_a_dead_worker_loses_no_snapshot(tmp_path, max_overhead):
    cb = _callback(tmp_path, max_overhead=max_overhead, max_queue=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_steps=8, logger=False, callbacks=[cb]).fit(_KillWorkerAt(cb, 2), moons_loader())
    assert _accounted(cb) == set(range(9))
    assert not cb.skipped_steps  # on_backlog="defer": deferred, not dropped
    messages = [str(w.message) for w in caught if w.category is SplineCamWarning]
    assert sum("its snapshots and later ones" in m for m in messages) == 1, messages  # warned once
    # Never redone on the training thread (what killed the worker could kill training): left for replay.
    assert cb.pending_steps
    assert cli_main(["replay", str(tmp_path / "sc")]) == 0
    rows = (tmp_path / "sc" / "stats.csv").read_text().splitlines()[1:]
    assert sorted({int(r.split(",")[0]) for r in rows}) == list(range(9))


def test_a_checkpoint_does_not_wait_beyond_the_budget(tmp_path):
    # Every step a checkpoint; the worker cannot keep up (it is still starting): with max_overhead=0 the state
    # lists the running snapshots as deferred, with their weights on disk, instead of waiting for them.
    cb = _callback(tmp_path, max_overhead=0.0, max_queue=4)
    trainer = make_trainer(max_steps=3, logger=False, callbacks=[cb])
    states = []

    class Probe(MoonsModule):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            states.append(cb.state_dict())

    trainer.fit(Probe(), moons_loader())
    first = states[0]
    in_flight = set(first["deferred"]) - {h["step"] for h in first["history"]}
    assert in_flight, first["deferred"]  # step 0 (at least) was still running and was not waited for
    for step in in_flight:
        blob = torch.load(tmp_path / "sc" / "snapshots" / f"{step:08d}.pt", weights_only=True)
        assert blob["step"] == step
    assert _accounted(cb) == {0, 1, 2, 3}
    # The files a checkpoint listed stay (a run resumed from it computes them), and so do replay's.
    left = {int(p.stem) for p in (tmp_path / "sc" / "snapshots").glob("0*.pt")}
    listed = set().union(*(s["deferred"] for s in states))
    assert left == listed | set(cb.pending_steps)
