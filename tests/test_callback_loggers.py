"""SplineCamCallback output to W&B (offline run read back from its .wandb file), CSV and TensorBoard."""

from __future__ import annotations

import csv
import json
import struct
import time
from collections import defaultdict
from pathlib import Path

import pytest
from callback_utils import SQUARE, MoonsModule, make_trainer, moons_loader
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from splinecam_lightning.callback import SplineCamCallback
from splinecam_lightning.slices import Slice

STATS = ("num_regions", "mean_area", "mean_eccentricity", "boundary_length")


# ---------------------------------------------------------------- .wandb reader
# The .wandb file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks
# of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last). Each
# reassembled record is a serialized wandb_internal_pb2.Record. (wandb >= 0.18 has no Python reader.)
_BLOCK = 32768


def read_wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic)
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        chunk = data[pos : pos + length]
        pos += length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
            pending = b""
        else:
            raise AssertionError(f"bad chunk type {kind} at {pos}")
    records = []
    for raw in out:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def _history_rows(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def test_wandb_offline_run_has_metrics_frames_table_and_videos(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    logger = WandbLogger(project="splinecam-test", save_dir=str(tmp_path), offline=True)
    cb = SplineCamCallback(
        max_overhead=None,  # finish every snapshot before fit returns
        slices=[Slice.from_vertices(SQUARE, name="sq")],
        every_n_train_steps=4,
        dirpath=tmp_path / "splinecam",
        frame_size=64,
        module="net",
    )
    trainer = make_trainer(max_steps=10, logger=logger, callbacks=[cb])
    trainer.fit(MoonsModule(), moons_loader())
    run = logger.experiment
    files_dir = Path(run.dir)
    sync_file = Path(run.settings.sync_file)
    run.finish()

    deadline = time.monotonic() + 60
    records = []
    while time.monotonic() < deadline:
        records = read_wandb_records(sync_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.2)
    assert any(r.WhichOneof("record_type") == "exit" for r in records), "run never wrote its exit record"

    rows = _history_rows(records)
    expected = [0, 4, 8, 10]
    for stat in STATS:
        for key in (f"splinecam/sq/{stat}", f"splinecam/mean/{stat}"):
            steps = [r["trainer/global_step"] for r in rows if key in r]
            assert steps == expected, (key, steps)
    steps = [r["trainer/global_step"] for r in rows if "splinecam/snapshot_seconds" in r]
    assert steps == expected
    frame_rows = [r for r in rows if "splinecam/frame/sq/path" in r or "splinecam/frame/sq" in r]
    assert sorted(r["trainer/global_step"] for r in frame_rows) == expected
    assert any("splinecam/video/sq/path" in r or "splinecam/video/sq" in r for r in rows)
    assert any(any(k.startswith("splinecam/stats_table") for k in r) for r in rows)

    media = files_dir / "media"
    images = list((media / "images").rglob("*.png"))
    assert len(images) >= len(expected)  # frames (+ the stats plot)
    videos = list((media / "videos").rglob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0
    assert list((media / "table").rglob("*.json"))


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
