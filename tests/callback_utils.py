"""Shared pieces of the SplineCamCallback tests and the DDP script: two-moons data and a tiny MLP."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from splinecam_lightning.demo import make_moons


def moons(n: int = 128, seed: int = 0, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved half circles (the demo's generator); labels are float 0/1 (for BCE)."""
    return make_moons(n, noise=noise, seed=seed)


#: A square of the moons' input plane that holds the data (plane coordinates are the inputs).
SQUARE = [[-1.5, -1.5], [2.5, -1.5], [2.5, 2.0], [-1.5, 2.0]]


def moons_loader(n: int = 128, batch_size: int = 16, shuffle: bool = True, seed: int = 0) -> DataLoader:
    x, y = moons(n, seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class MoonsModule(L.LightningModule):
    """2 -> width -> width -> 1 MLP, wrapped as ``self.net``.

    Args:
        width: Hidden width.
        act: Activation class (``nn.GELU`` makes an unsupported model).
        extras: Add BatchNorm1d and Dropout (eval semantics differ from training).
        fail_at_step: Raise ``RuntimeError`` in ``training_step`` at this global step.
        lr: Adam learning rate.
    """

    def __init__(
        self,
        width: int = 16,
        act: type[nn.Module] = nn.ReLU,
        extras: bool = False,
        fail_at_step: int | None = None,
        lr: float = 1e-2,
        depth: int = 2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = 2
        for _ in range(depth):
            layers.append(nn.Linear(d, width))
            if extras:
                layers.append(nn.BatchNorm1d(width))
            layers.append(act())
            if extras:
                layers.append(nn.Dropout(0.2))
            d = width
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)
        self.fail_at_step = fail_at_step
        self.lr = lr
        self.steps_run = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_at_step is not None and self.global_step >= self.fail_at_step:
            raise RuntimeError(f"boom at step {self.global_step}")
        self.steps_run += 1
        x, y = batch
        loss = nn.functional.binary_cross_entropy_with_logits(self(x).squeeze(1), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.binary_cross_entropy_with_logits(self(x).squeeze(1), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
}


def make_trainer(**kw: Any) -> L.Trainer:
    return L.Trainer(**{**TRAINER_DEFAULTS, **kw})


_FRAME = re.compile(r"^(\d{8})\.png$")


def frame_steps(folder: Path) -> list[int]:
    """Steps of the frames directly inside ``folder`` (sorted)."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _FRAME.match(p.name)))


def video_frames(path: Path) -> int:
    """Number of frames of an mp4 (decoded with imageio-ffmpeg)."""
    import imageio.v2 as iio

    reader = iio.get_reader(path, format="FFMPEG")
    try:
        return sum(1 for _ in reader)
    finally:
        reader.close()


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


def history_rows(records) -> list[dict]:
    """W&B history rows as dicts (nested keys joined by /)."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows
