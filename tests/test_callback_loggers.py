"""SplineCamCallback output to CSV and TensorBoard (the W&B run is read back in test_cli.py's demo test)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest
from callback_utils import SQUARE, MoonsModule, make_trainer, moons_loader
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from splinecam_lightning.callback import SplineCamCallback
from splinecam_lightning.slices import Slice

STATS = ("num_regions", "mean_area", "mean_eccentricity", "boundary_length")


def test_csv_and_tensorboard_loggers_together_get_scalars_and_images(tmp_path):
    """Two loggers on one Trainer: both get every scalar at its snapshot step; TensorBoard also gets frames."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    csv_logger = CSVLogger(tmp_path / "logs", name="run")
    tb_logger = TensorBoardLogger(tmp_path / "tb", name="run")
    cb = SplineCamCallback(
        max_overhead=None,  # finish every snapshot before fit returns
        slices=[Slice.from_vertices(SQUARE, name="sq"), Slice.from_vertices(SQUARE, name="sq2")],
        every_n_train_steps=5,
        dirpath=tmp_path / "splinecam",
        frame_size=64,
    )
    # a validation loop with sanity check: the sanity check must not trigger snapshots
    trainer = make_trainer(
        max_steps=12, logger=[csv_logger, tb_logger], callbacks=[cb], num_sanity_val_steps=2, val_check_interval=6
    )
    trainer.fit(MoonsModule(), moons_loader(), moons_loader(shuffle=False))
    expected = [0, 5, 10, 12]

    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    by_key = defaultdict(list)
    for r in rows:
        for k, v in r.items():
            if k.startswith("splinecam/") and v != "":
                by_key[k].append(int(r["step"]))
    for name in ("sq", "sq2", "mean"):
        for stat in STATS:
            assert by_key[f"splinecam/{name}/{stat}"] == expected, (name, stat)
    assert by_key["splinecam/snapshot_seconds"] == expected
    assert by_key["splinecam/sq/seconds"] == expected
    # identical slices -> identical statistics, and the mean equals them
    for r in rows:
        if r.get("splinecam/sq/num_regions"):
            assert r["splinecam/sq/num_regions"] == r["splinecam/sq2/num_regions"] == r["splinecam/mean/num_regions"]

    acc = EventAccumulator(tb_logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    for name in ("sq", "sq2", "mean"):
        assert [e.step for e in acc.Scalars(f"splinecam/{name}/num_regions")] == expected, name
    assert [e.step for e in acc.Images("splinecam/frame/sq")] == expected
    assert acc.Images("splinecam/frame/sq")[0].width == 64
    assert "splinecam/stats_plot" in acc.Tags()["images"]
