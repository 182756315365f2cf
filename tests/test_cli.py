"""The ``splinecam-lightning`` CLI: demo, partition, video, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as iio
import numpy as np
import pytest
import torch
from callback_utils import history_rows, read_wandb_records
from torch import nn

from splinecam_lightning import Slice, compute_partition
from splinecam_lightning.cli import main


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("SPLINECAM_DEBUG", raising=False)


def _mlp(seed: int = 0, in_dim: int = 2, out_dim: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_dim, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, out_dim))


def _cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32, 3))


def _run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("SPLINECAM_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "splinecam_lightning", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ------------------------------------------------------------------------------------------------ demo
@pytest.mark.slow
def test_demo_quick_subprocess(tmp_path):
    """The main job end to end, as a user runs it: frames, mp4s, stats plot, offline W&B run, printed paths."""
    out = tmp_path / "out"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir")}
    proc = _run_cli("demo", "--quick", "--out", str(out), "--no-progress", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr

    root = out / "splinecam"
    for name in ("moons", "zoom"):
        frames = sorted((root / name).glob("*.png"))
        # 60 steps, every 20: steps 0, 20, 40, 60.
        assert [f.name for f in frames] == [f"{s:08d}.png" for s in (0, 20, 40, 60)]
        video = root / f"{name}.mp4"
        reader = iio.get_reader(video, format="FFMPEG")
        try:
            n = sum(1 for _ in reader)
            first = reader.get_data(0)
        finally:
            reader.close()
        assert n == len(frames)
        assert first.shape[0] % 16 == 0 and first.shape[1] % 16 == 0 and first.std() > 1
    assert (root / "stats.png").stat().st_size > 1000
    assert (out / "demo.ckpt").is_file()

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    sync_files = list(runs[0].glob("*.wandb"))
    assert sync_files, "offline run has no .wandb file"

    # The W&B run, read back from its .wandb file: every statistic, frame and the table at its true step.
    records = read_wandb_records(sync_files[0])
    assert any(r.WhichOneof("record_type") == "exit" for r in records), "run never wrote its exit record"
    rows = history_rows(records)
    expected = [0, 20, 40, 60]
    for stat in ("num_regions", "mean_area", "mean_eccentricity", "boundary_length"):
        for key in (f"splinecam/moons/{stat}", f"splinecam/zoom/{stat}", f"splinecam/mean/{stat}"):
            steps = [r["trainer/global_step"] for r in rows if key in r]
            assert steps == expected, (key, steps)
    assert [r["trainer/global_step"] for r in rows if "splinecam/snapshot_seconds" in r] == expected
    for name in ("moons", "zoom"):
        frame_rows = [r for r in rows if f"splinecam/frame/{name}/path" in r or f"splinecam/frame/{name}" in r]
        assert sorted(r["trainer/global_step"] for r in frame_rows) == expected, name
        assert any(f"splinecam/video/{name}/path" in r or f"splinecam/video/{name}" in r for r in rows), name
    assert any(any(k.startswith("splinecam/stats_table") for k in r) for r in rows)
    media = runs[0] / "files" / "media"
    assert len(list((media / "images").rglob("*.png"))) >= 2 * len(expected)  # frames (+ the stats plot)
    assert len(list((media / "videos").rglob("*.mp4"))) == 2
    assert list((media / "table").rglob("*.json"))

    # It prints where everything is, and how to upload the run.
    for expected in ("moons.mp4", "zoom.mp4", "stats.png", str(runs[0]), f"wandb sync {runs[0]}"):
        assert expected in proc.stdout, expected


def test_demo_in_process_no_wandb_then_partition_checkpoint(tmp_path, wandb_env, capsys):
    """``demo --no-wandb`` in-process: CSV only; its checkpoint then feeds ``partition --module-class``."""
    out = tmp_path / "o"
    rc = main(["demo", "--quick", "--steps", "20", "--every", "10", "--out", str(out), "--no-wandb", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wandb sync" not in printed and not (out / "wandb").exists()
    metrics = next((out / "csv_logs").rglob("metrics.csv")).read_text()
    assert "splinecam/moons/num_regions" in metrics
    assert sorted(p.name for p in (out / "splinecam" / "moons").glob("*.png")) == [
        "00000000.png",
        "00000010.png",
        "00000020.png",
    ]

    png, js = tmp_path / "ckpt.png", tmp_path / "ckpt.json"
    rc = main([
        "partition", str(out / "demo.ckpt"), "--module-class", "splinecam_lightning.demo:MoonsClassifier",
        "--submodule", "net", "--box", "-1.6,2.6,-1.1,1.6", "--out-png", str(png), "--out-json", str(js),
        "--size", "128",
    ])  # fmt: skip
    assert rc == 0
    stats = json.loads(js.read_text())
    # The final frame of the demo shows the same model on the same domain.
    from splinecam_lightning.demo import MoonsClassifier, demo_slices

    model = MoonsClassifier.load_from_checkpoint(out / "demo.ckpt", map_location="cpu")
    direct = compute_partition(model.net, demo_slices()[0])
    assert stats["num_regions"] == direct.num_regions


# ------------------------------------------------------------------------------------------------ partition
def test_partition_torch_save_matches_engine(tmp_path, capsys):
    net = _mlp()
    path = tmp_path / "mlp.pt"
    torch.save(net, path)
    png, js = tmp_path / "p.png", tmp_path / "p.json"
    rc = main(["partition", str(path), "--box", "-2,2,-1.5,1.5", "--out-png", str(png), "--out-json", str(js),
               "--size", "128"])  # fmt: skip
    assert rc == 0
    direct = compute_partition(net, Slice.from_vertices([[-2, -1.5], [2, -1.5], [2, 1.5], [-2, 1.5]]))
    info = json.loads(js.read_text())
    assert info["num_regions"] == direct.num_regions > 10
    assert info["stats"]["num_regions"] == direct.num_regions
    assert info["stats"]["boundary_length"] == pytest.approx(direct.stats()["boundary_length"])
    img = iio.imread(png)
    # The frame follows the 4 x 3 box (plus the title band) instead of letterboxing it into a square.
    from splinecam_lightning.render import frame_shape

    assert img.shape[:2] == frame_shape(direct, 128, title=True) == (112, 128) and img.std() > 1
    assert f"{direct.num_regions} regions" in capsys.readouterr().out


def test_partition_torchscript_and_points_file(tmp_path):
    """A scripted CNN and a .npy of three (1, 8, 8) points: input shape inferred, same count as the engine."""
    net = _cnn()
    ts = tmp_path / "cnn_script.pt"
    torch.jit.save(torch.jit.script(net), ts)
    rng = np.random.default_rng(0)
    pts = rng.random((3, 1, 8, 8))
    np.save(tmp_path / "pts.npy", pts)
    js = tmp_path / "c.json"
    rc = main(["partition", str(ts), "--points", str(tmp_path / "pts.npy"), "--margin", "0", "--class-pair", "0,2",
               "--out-png", str(tmp_path / "c.png"), "--out-json", str(js), "--size", "64"])  # fmt: skip
    assert rc == 0
    info = json.loads(js.read_text())
    flat = torch.tensor(pts.reshape(3, -1))
    direct = compute_partition(net, Slice.through_points(*flat, margin=0.0), input_shape=(1, 8, 8), class_pair=(0, 2))
    assert info["input_shape"] == [1, 8, 8]
    assert info["num_regions"] == direct.num_regions
    assert info["class_pair"] == [0, 2]
    assert info["boundary_segments"] == direct.boundary.shape[0]


def test_partition_square_in_high_dimension(tmp_path):
    net = _mlp(in_dim=6)
    path = tmp_path / "m6.pt"
    torch.save(net, path)
    js = tmp_path / "s.json"
    rc = main(["partition", str(path), "--square", "0,0,0,0,0,0:0.7", "--seed", "3", "--out-png",
               str(tmp_path / "s.png"), "--out-json", str(js), "--size", "64"])  # fmt: skip
    assert rc == 0
    sl = Slice.around(torch.zeros(6), 0.7, generator=torch.Generator().manual_seed(3))
    assert json.loads(js.read_text())["num_regions"] == compute_partition(net, sl).num_regions


# ------------------------------------------------------------------------------------------------ video
def test_video_command(tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(5):
        img = np.full((64, 64, 3), 40 * i, dtype=np.uint8)
        iio.imwrite(frames / f"{i:03d}.png", img)
    out = tmp_path / "v.mp4"
    assert main(["video", str(frames), "--out", str(out), "--fps", "4", "--no-progress"]) == 0
    reader = iio.get_reader(out, format="FFMPEG")
    try:
        data = [f for f in reader]
    finally:
        reader.close()
    assert len(data) == 5
    assert data[-1].mean() > data[0].mean() + 100  # frame order kept
    assert str(out) in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ errors
@pytest.fixture
def bad_inputs(tmp_path):
    torch.save(_mlp(), tmp_path / "mlp.pt")
    torch.save(_mlp().state_dict(), tmp_path / "sd.pt")
    torch.save(nn.Sequential(nn.Linear(2, 4), nn.GELU(), nn.Linear(4, 1)), tmp_path / "gelu.pt")
    torch.save(_cnn(), tmp_path / "cnn.pt")
    torch.jit.save(torch.jit.trace(_cnn(), torch.zeros(1, 1, 8, 8)), tmp_path / "traced.pt")
    np.save(tmp_path / "two.npy", np.zeros((2, 64)))
    np.save(tmp_path / "collinear.npy", np.stack([np.zeros(64), np.ones(64), 2 * np.ones(64)]))
    np.save(tmp_path / "pts64.npy", np.random.default_rng(0).random((3, 64)))
    (tmp_path / "garbage.pt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "frames").mkdir()
    iio.imwrite(tmp_path / "frames" / "0.png", np.zeros((16, 16, 3), dtype=np.uint8))
    return tmp_path


BAD_CASES = {
    "missing model": (["partition", "nope.pt", "--box", "0,1,0,1"], "does not exist"),
    "garbage file": (["partition", "garbage.pt", "--box", "0,1,0,1"], "cannot load"),
    "state dict": (["partition", "sd.pt", "--box", "0,1,0,1"], "state_dict"),
    "unsupported layer": (["partition", "gelu.pt", "--box", "0,1,0,1"], "GELU"),
    "wrong input shape": (["partition", "cnn.pt", "--points", "pts64.npy", "--input-shape", "3,8,8"], "elements"),
    "flat input to a CNN": (["partition", "cnn.pt", "--points", "pts64.npy"], "input"),
    "two points": (["partition", "cnn.pt", "--points", "two.npy", "--input-shape", "1,8,8"], "3 points"),
    "collinear points": (["partition", "cnn.pt", "--points", "collinear.npy", "--input-shape", "1,8,8"], "collinear"),
    "empty box": (["partition", "mlp.pt", "--box", "0,0,0,1"], "XMIN < XMAX"),
    "no slice": (["partition", "mlp.pt"], "exactly one slice"),
    "too many regions": (["partition", "mlp.pt", "--box", "-3,3,-3,3", "--max-regions", "2"], "max"),
    "traced conv": (["partition", "traced.pt", "--points", "pts64.npy", "--input-shape", "1,8,8"], "TorchScript"),
    "bad module class": (["partition", "mlp.pt", "--box", "0,1,0,1", "--module-class", "no_such_pkg:X"], "import"),
    "unknown option": (["partition", "mlp.pt", "--bogus"], "unrecognized"),
    "missing frames": (["video", "no_frames_here"], "does not exist"),
    "no frames": (["video", "empty"], "no frames"),
    "bad frame size": (["demo", "--quick", "--frame-size", "100"], "multiple of 16"),
    "thin box": (["partition", "mlp.pt", "--box", "0,1e-20,0,1"], "--box 0,1e-20,0,1: box is too thin"),
    "box below float resolution": (["partition", "mlp.pt", "--box", "1e6,1000000.0000001,0,1e-7"], "too small"),
    "class pair past the outputs": (
        ["partition", "cnn.pt", "--points", "pts64.npy", "--input-shape", "1,8,8", "--class-pair", "0,12"],
        "the model has 3 outputs, so classes are 0..2",
    ),
    "class pair on one output": (["partition", "mlp.pt", "--box", "0,1,0,1", "--class-pair", "0,1"], "several outputs"),
    "flag names in messages": (["partition", "cnn.pt", "--points", "pts64.npy"], "pass --input-shape"),
    "bad device": (["partition", "mlp.pt", "--box", "0,1,0,1", "--device", "toaster"], "not a device name"),
    "video to another format": (["video", "frames", "--out", "x.avi"], "use .mp4"),
    "render without archive": (["render", "empty"], "no partition archive"),
    "render bad colour range": (["render", "empty", "--color-range", "0,1"], "VMIN > 0"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_one_line_error(case, bad_inputs, capsys, monkeypatch):
    args, needle = BAD_CASES[case]
    monkeypatch.chdir(bad_inputs)
    monkeypatch.delenv("SPLINECAM_DEBUG", raising=False)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert needle.lower() in lines[0].lower()
    assert "Traceback" not in err


def test_bad_input_subprocess_has_no_traceback(bad_inputs):
    proc = _run_cli("partition", "gelu.pt", "--box", "0,1,0,1", cwd=bad_inputs)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: unsupported model")


def test_cuda_without_cuda_is_one_line(bad_inputs, capsys, monkeypatch):
    monkeypatch.chdir(bad_inputs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["partition", "mlp.pt", "--box", "0,1,0,1", "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: --device cuda: CUDA is not available") and "--device" in err


def test_video_gif_is_a_real_gif(tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        iio.imwrite(frames / f"{i:03d}.png", np.full((40, 60, 3), 80 * i, dtype=np.uint8))
    out = tmp_path / "x.gif"
    assert main(["video", str(frames), "--out", str(out), "--fps", "5", "--no-progress"]) == 0
    assert out.read_bytes()[:6] == b"GIF89a"
    import imageio.v3 as iio3

    gif = iio3.imread(out, index=None)
    assert gif.shape[:3] == (3, 48, 64)  # padded to multiples of 16, like the mp4
    assert iio3.immeta(out)["duration"] == 200


def test_help_for_every_command(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    for cmd in ("demo", "partition", "render", "video"):
        assert cmd in top
        assert main([cmd, "--help"]) == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: splinecam-lightning " + cmd)
    assert main([]) == 2  # no command: help and a usage error
    main(["demo", "--help"])
    demo_help = capsys.readouterr().out
    assert "about a minute" not in demo_help and "(default:" not in demo_help  # no doubled defaults


def test_the_command_keeps_freed_memory_for_reuse(monkeypatch, capsys):
    """``splinecam-lightning`` (cli.run) is a process of its own: like the snapshot worker it keeps freed memory
    for the next partition (``replay`` computes one after another); ``main``, called from Python, does not."""
    from splinecam_lightning import cli, memory

    calls = []
    monkeypatch.setattr(memory, "reuse_freed_memory", lambda: calls.append(1) or True)
    assert main(["--version"]) == 0
    assert not calls
    monkeypatch.setattr(sys, "argv", ["splinecam-lightning", "--version"])
    with pytest.raises(SystemExit) as exit_:
        cli.run()
    assert exit_.value.code == 0 and calls == [1]
    assert capsys.readouterr().out.strip()
