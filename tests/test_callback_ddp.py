"""SplineCamCallback under DDP (2 CPU processes, gloo): no deadlock, no duplicate logging or frames."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from callback_utils import MoonsModule, frame_steps, video_frames

SCRIPT = Path(__file__).resolve().parent / "ddp_script.py"


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    expected = [0, 3, 6, 7]
    done = [line for line in proc.stdout.splitlines() if line.startswith("RANK")]
    assert len(done) == 2, log[-4000:]
    # every rank chose the same slices; rank 1 computed its share (the local square), rank 0 gathered and logged all
    names = done[0].rpartition("slices=")[2].split(",")
    assert len(names) == 2 and names[0].startswith("plane_") and names[1].startswith("local_"), done
    assert f"RANK 0 DONE steps={expected} slices={','.join(names)}" in done
    assert f"RANK 1 DONE steps=[] slices={','.join(names)}" in done

    with open(tmp_path / "logs" / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows if r.get(f"splinecam/{names[0]}/num_regions")]
    assert steps == expected, steps
    assert not [s for s, n in Counter(steps).items() if n > 1]
    out = tmp_path / "splinecam"
    for name in names:
        assert frame_steps(out / name) == expected
        assert video_frames(out / f"{name}.mp4") == len(expected)
    lines = (out / "stats.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * len(expected)
    # the statistics gathered from both ranks equal a one-process computation on the final weights
    import torch

    from splinecam_lightning.engine import compute_partition
    from splinecam_lightning.slices import Slice

    final = torch.load(tmp_path / "final.pt", weights_only=False)
    net = MoonsModule().net
    net.load_state_dict(final["net"])
    last = {r["slice"]: r for r in csv.DictReader(open(out / "stats.csv")) if int(r["step"]) == expected[-1]}
    for sd in final["slices"]:
        part = compute_partition(net, Slice.from_state_dict(sd))
        assert int(float(last[sd["name"]]["num_regions"])) == part.num_regions
        assert float(last[sd["name"]]["boundary_length"]) == pytest.approx(part.stats()["boundary_length"], rel=1e-9)
