"""Several fits and one folder: a later run never mixes in an earlier one's outputs or deferred work."""

from __future__ import annotations

import csv
import json
import warnings

import lightning.pytorch as L
import torch
from callback_utils import MoonsModule, frame_steps, make_trainer, moons_loader

from splinecam_lightning.callback import SplineCamCallback, SplineCamWarning
from splinecam_lightning.worker import save_weights


def _rows(out) -> list[tuple[int, int]]:
    with open(out / "stats.csv") as f:
        return [(int(r["step"]), int(float(r["num_regions"]))) for r in csv.DictReader(f) if r["slice"] == "sq"]


def test_an_earlier_runs_deferred_snapshots_are_set_aside(tmp_path, square_slice):
    out = tmp_path / "sc"

    def fit(width, **kw):
        L.seed_everything(0)
        cb = SplineCamCallback(slices=[square_slice], every_n_train_steps=5, dirpath=out, frame_size=128, **kw)
        make_trainer(max_steps=10, logger=False, callbacks=[cb]).fit(MoonsModule(width=width), moons_loader())
        return cb

    fit(8, background=False)
    # Leave deferred work behind as an interrupted run would: weights of steps 0, 5, 10 and pending.json.
    for s in (0, 5, 10):
        save_weights(out / "snapshots" / f"{s:08d}.pt", {"bogus": torch.zeros(1)}, s, 0)
    (out / "snapshots" / "pending.json").write_text(json.dumps({"steps": [0, 5, 10]}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = fit(12, background=False, max_overhead=None)
    assert second.snapshot_steps == [0, 5, 10]
    assert any("earlier fit's deferred" in str(w.message) for w in caught if w.category is SplineCamWarning)
    assert not list((out / "snapshots").glob("[0-9]*.pt")) and not (out / "snapshots" / "pending.json").exists()
    assert len(list((out / "snapshots" / "_superseded").glob("*/0*.pt"))) == 3  # moved, never deleted
    rows = _rows(out)
    assert [s for s, _ in rows] == [0, 5, 10]
    assert [r["slices"]["sq"]["num_regions"] for r in second.history] == [n for _, n in rows]


def test_a_callback_reused_with_a_new_trainer_starts_a_new_history(tmp_path, square_slice):
    out = tmp_path / "sc"
    cb = SplineCamCallback(slices=[square_slice], every_n_train_steps=5, dirpath=out, frame_size=128, background=False)
    model = MoonsModule()
    make_trainer(max_steps=10, logger=False, callbacks=[cb]).fit(model, moons_loader())
    assert cb.snapshot_steps == [0, 5, 10]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_steps=5, logger=False, callbacks=[cb]).fit(model, moons_loader())  # steps 0-5 again
    assert cb.snapshot_steps == [0, 5]  # taken, not silently skipped as done
    assert any("starting a new history" in str(w.message) for w in caught if w.category is SplineCamWarning)
    assert frame_steps(out / "sq") == [0, 5]
    assert len(list((out / "sq" / "_superseded").rglob("*.png"))) == 3  # the first fit's frames, kept
    assert [s for s, _ in _rows(out)] == [0, 5]


def test_fast_dev_run_leaves_an_earlier_run_alone(tmp_path, square_slice):
    out = tmp_path / "sc"

    def cb():
        return SplineCamCallback(
            slices=[square_slice], every_n_train_steps=5, dirpath=out, frame_size=128, background=False
        )

    make_trainer(max_steps=10, logger=False, callbacks=[cb()]).fit(MoonsModule(), moons_loader())
    before = (out / "stats.csv").read_bytes()
    smoke = cb()
    make_trainer(fast_dev_run=2, callbacks=[smoke]).fit(MoonsModule(), moons_loader())
    assert smoke.snapshot_steps == []
    assert frame_steps(out / "sq") == [0, 5, 10]
    assert (out / "stats.csv").read_bytes() == before
