"""Smoke tests of the example scripts with their ``--quick`` settings: outputs exist and make sense."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import imageio.v2 as iio
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    """Import ``examples/<name>.py`` as a module (its folder goes on ``sys.path`` for ``_common``)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def _video_frames(path: Path) -> int:
    reader = iio.get_reader(path, format="FFMPEG")
    try:
        return sum(1 for _ in reader)
    finally:
        reader.close()


@pytest.mark.slow
def test_toy2d_quick_with_wandb(tmp_path):
    # One dataset: every dataset takes the same path (the demo covers the moons).
    res = _load("toy2d").main(["--quick", "--datasets", "circles", "--out", str(tmp_path), "--no-progress"])
    assert set(res) == {"circles"}
    for name, r in res.items():
        frames = sorted(Path(r["frames"]).glob("*.png"))
        assert len(frames) == r["snapshots"] == 3  # steps 0, 20, 40
        assert _video_frames(r["video"]) == 3
        assert Path(r["stats_plot"]).stat().st_size > 1000
        run = Path(r["wandb_run_dir"])
        assert run.is_dir() and list(run.glob("*.wandb")), name
        assert list((run / "files" / "media" / "videos").rglob("*.mp4")), name
        assert r["num_regions"] > 1
        assert 0.4 <= r["accuracy"] <= 1.0


def test_toy2d_datasets_are_binary_and_standardised():
    mod = _load("toy2d")
    for name in mod.DATASETS:
        x, y = mod.make_dataset(name, 200, 0)
        assert x.shape == (200, 2) and set(y.tolist()) == {0, 1}
        assert abs(x.mean()) < 1e-5 and abs(x.std(0) - 1).max() < 1e-4


@pytest.mark.slow
def test_digits_mlp_boundary_samples(tmp_path):
    res = _load("digits_mlp").main(["--quick", "--out", str(tmp_path), "--no-wandb", "--no-progress"])
    assert res["accuracy"] > 0.3  # 10 classes: chance is 0.1
    (row,) = res["slices"]
    assert len(set(row["classes"])) == 3
    assert Path(row["frame"]).is_file() and Path(row["samples_png"]).is_file()
    assert row["boundary_segments"] > 0
    # Samples lie on the boundary between the pair: the two logits tie and are the top two.
    assert row["tie_gap"] < 1e-3
    assert row["on_pair"] == 1.0
    assert json.loads((tmp_path / "summary.json").read_text())["slices"][0]["name"] == row["name"]
    frames = list((tmp_path / "splinecam" / row["name"]).glob("*.png"))
    assert len(frames) == 3  # steps 0, 30, 60
    assert (tmp_path / "splinecam" / f"{row['name']}.mp4").is_file()


@pytest.mark.slow
def test_digits_cnn_boundary_samples(tmp_path):
    res = _load("digits_cnn").main(["--quick", "--out", str(tmp_path), "--no-wandb", "--no-progress"])
    (row,) = res["slices"]
    assert row["num_regions"] > 1
    assert Path(row["samples_png"]).is_file()
    if row["boundary_segments"]:
        assert row["tie_gap"] < 1e-3 and row["on_pair"] == 1.0
    assert (tmp_path / "splinecam" / f"{row['name']}.mp4").is_file()


def test_digits_cnn_shape():
    mod = _load("digits_cnn")
    assert mod.make_cnn((2, 3))(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


@pytest.mark.slow
def test_inr_image_quick(tmp_path):
    mod = _load("inr_image")
    res = mod.main(["--quick", "--out", str(tmp_path), "--no-wandb", "--no-progress"])
    assert len(list(Path(res["frames"]).glob("*.png"))) == res["snapshots"] == 3
    assert _video_frames(res["video"]) == 3
    assert Path(res["reconstruction"]).stat().st_size > 1000
    assert res["psnr"] > 8  # better than a constant guess at the wrong grey
    assert res["num_regions"] > 1
    img = mod.load_image(16)
    assert img.shape == (16, 16) and 0 <= img.min() < img.max() <= 1


def test_inr_level_shift_moves_the_zero_level_set():
    mod = _load("inr_image")
    shift = mod.LevelShift(0.25)
    assert torch.allclose(shift(torch.tensor([[0.25], [1.0]])), torch.tensor([[0.0], [0.75]]))
    assert not any(p.requires_grad for p in shift.parameters())


@pytest.mark.slow
def test_random_nets_quick_matches_arrangement_formula(tmp_path, capsys):
    res = _load("random_nets").main(["--quick", "--out", str(tmp_path)])
    assert "exact counts equal to 1 + k + I: 6/6" in capsys.readouterr().out
    assert res["rows"] and not res["mismatches"]
    for r in res["rows"]:
        assert r["regions"] <= r["bound"]
    assert Path(res["plot"]).stat().st_size > 5000
    assert res["mlp_regions"] > 10 and res["cnn_regions"] > 1
    assert Path(res["mlp_png"]).is_file() and Path(res["cnn_png"]).is_file()


def test_random_nets_arrangement_count_by_hand():
    mod = _load("random_nets")
    # x = 0 and y = 0 cross [-1, 1]^2 and meet inside: 4 regions; x = 5 misses the square.
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    b = torch.tensor([0.0, 0.0, -5.0])
    assert mod.arrangement_count(W, b, 1.0) == (4, 2, 1)


@pytest.mark.parametrize("name", ["toy2d", "digits_mlp", "digits_cnn", "inr_image", "random_nets"])
def test_example_help(name, capsys):
    mod = _load(name)
    parse = getattr(mod, "parse_args", None) or (lambda argv: mod.main(argv))
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--out" in out


@pytest.mark.slow
def test_example_runs_as_a_script(tmp_path):
    """``python examples/random_nets.py`` works from any folder: it finds ``_common`` next to it (its results are
    checked in-process by test_random_nets_quick_matches_arrangement_formula)."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "random_nets.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--quick" in proc.stdout


def test_digits_local_complexity_quick(tmp_path):
    from splinecam_lightning import log_spaced_steps

    res = _load("digits_local_complexity").main(["--quick", "--out", str(tmp_path), "--no-progress", "--no-wandb"])
    assert res["snapshot_steps"] == log_spaced_steps(40, 4) and len(res["snapshot_steps"]) >= 3
    assert Path(res["plot"]).stat().st_size > 1000
    for h in res["history"]:
        for split in ("train", "val"):
            s = h[split]
            assert s["num_regions"] >= 1
            # Pointwise sampled <= exact units, so the means are ordered too.
            assert s["sampled_units"] <= s["crossing_units"] + 1e-12
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 40


def test_architecture_comparison_quick(tmp_path):
    import math

    from splinecam_lightning import compute_partition

    res = _load("architecture_comparison").main(["--quick", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "summary.json").read_text())
    assert set(data["architectures"]) == {"mlp", "cnn", "resnet"}
    for name, row in data["architectures"].items():
        regions = row["per_point"]["num_regions"]
        assert len(regions) == data["points"] and all(math.isfinite(r) and r >= 1 for r in regions), name
        assert row["num_regions"]["mean"] >= 1 and math.isfinite(row["mean_area"]["mean"]), name
        assert row["mean_area"]["mean"] > 0 and row["mean_eccentricity"]["mean"] >= 1 - 1e-9, name
    assert Path(data["plot"]).is_file() and Path(data["plot"]).stat().st_size > 5000
    # Exactness spot check: a batched local statistic equals the single-slice partition of the same square.
    lc, net = res["local"]["resnet"], res["models"]["resnet"]
    i = len(lc) - 1
    part = compute_partition(net, lc.slices[i], input_shape=(1, 8, 8))
    assert part.stats()["num_regions"] == lc.num_regions[i] > 1
    assert abs(float(part.areas.sum()) - float(lc.slices[i].area)) < 1e-9 * float(lc.slices[i].area)
