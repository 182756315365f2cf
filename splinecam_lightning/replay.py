"""Compute snapshots after training: deferred ones in a callback's ``dirpath``, or a folder of checkpoints.

``splinecam-lightning replay DIR`` runs :func:`replay` (or :func:`replay_checkpoints` with ``--module-class``).
Both produce what the callback would have produced during training: frames, ``stats.csv``, ``stats.png`` and one
video per slice, and can spread the snapshots over several worker processes.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from splinecam_lightning.archive import ColorRangeTracker
from splinecam_lightning.outputs import RunOutputs
from splinecam_lightning.worker import SnapshotResult, SnapshotSettings, SnapshotWorker, compute_snapshot, load_weights

__all__ = ["replay", "replay_checkpoints", "read_stats_csv"]


def read_stats_csv(path: Path) -> list[dict[str, Any]]:
    """History records from a ``stats.csv`` written by the callback (empty cells are missing statistics)."""
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            epoch = int(row.pop("epoch"))
            name = row.pop("slice")
            rec = by_step.setdefault(step, {"step": step, "epoch": epoch, "seconds": 0.0, "slices": {}})
            rec["slices"][name] = {k: float(v) for k, v in row.items() if v not in ("", None)}
    return [by_step[s] for s in sorted(by_step)]


def _run(
    model: Any,
    jobs: Sequence[tuple[int, int, Path | Callable[[], dict[str, torch.Tensor]]]],
    settings: SnapshotSettings,
    workers: int,
    progress: Callable[[int], None] | None,
) -> list[SnapshotResult]:
    """Compute ``(step, epoch, weights file or loader)`` jobs inline or on ``workers`` processes."""
    results: list[SnapshotResult] = []
    if workers <= 1 or not all(isinstance(w, Path) for _, _, w in jobs):
        colors = ColorRangeTracker(settings.color_scale)
        for step, epoch, weights in jobs:
            if callable(weights):
                load_weights(model, weights())
            else:
                load_weights(model, torch.load(weights, map_location="cpu", weights_only=True)["weights"])
            results.append(compute_snapshot(model, step, epoch, settings, colors))
            if progress:
                progress(1)
        return results
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = [SnapshotWorker(model, None, settings, slots=0, threads=threads, low_priority=False) for _ in range(workers)]
    try:
        for w in pool:
            w.start()
        for i, (step, epoch, path) in enumerate(jobs):
            pool[i % workers].submit_file(path, step, epoch)  # type: ignore[arg-type]
        for w in pool:
            while w.pending and w.alive:
                got = w.poll(timeout=None)
                results.extend(got)
                if progress:
                    progress(len(got))
            if w.error:
                raise RuntimeError(w.error)
    finally:
        for w in pool:
            w.close()
    return results


def _finish(dirpath: Path, settings: SnapshotSettings, results: list[SnapshotResult], fps: float) -> list[str]:
    """Merge results into ``stats.csv``, remake the plot and videos; returns error messages."""
    errors = [f"{what}: {type(e).__name__}: {e}" for r in results for what, e in r.errors]
    out = RunOutputs(dirpath, [], lambda what, e: errors.append(f"{what}: {e}"))
    history = {rec["step"]: rec for rec in read_stats_csv(dirpath / "stats.csv")}
    for r in results:
        if not r.per_slice:
            continue
        rec = history.setdefault(r.step, {"step": r.step, "epoch": r.epoch, "seconds": 0.0, "slices": {}})
        rec["slices"].update(r.per_slice)
        rec["worker_seconds"] = r.worker_seconds
        rec["seconds"] = rec.get("seconds", 0.0) + r.worker_seconds
    out.history = [history[s] for s in sorted(history)]
    final = {"color_by": settings.color_by, "color_scale": settings.color_scale, "size_px": settings.frame_size}
    if settings.fixed_color_range:
        final["color_range"] = settings.color_range
    names = [s.name for s in settings.slices]
    errors += [f"{w}: {e}" for w, e in out.finish(names, 0, fps, make_videos=True, final_render=final)]
    return errors


def replay(
    dirpath: str | os.PathLike[str],
    *,
    workers: int = 1,
    all_steps: bool = False,
    fps: float = 8,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Compute the snapshots a :class:`~splinecam_lightning.SplineCamCallback` saved under ``<dirpath>/snapshots/``.

    Args:
        dirpath: The callback's ``dirpath``.
        workers: Worker processes (each with ``cpu_count // workers`` torch threads).
        all_steps: Also recompute weight snapshots not listed as pending.
        fps: Frames per second of the remade videos.
        progress: Called with the number of snapshots finished.

    Returns:
        ``{"steps": [...computed], "errors": [...messages]}``.

    Raises:
        FileNotFoundError: ``dirpath`` has no ``snapshots/model.pt`` (nothing was deferred).
    """
    from splinecam_lightning.engine import PreparedModel
    from splinecam_lightning.tracing import classify_nodes

    dirpath = Path(dirpath)
    folder = dirpath / "snapshots"
    if not (folder / "model.pt").exists():
        raise FileNotFoundError(
            f"{folder / 'model.pt'} does not exist: no snapshot was deferred in {dirpath} (nothing to replay)"
        )
    blob = torch.load(folder / "model.pt", map_location="cpu", weights_only=False)
    gm = blob["graph_module"]
    model = PreparedModel(gm, classify_nodes(gm), torch.device("cpu"), blob["input_shape"])
    settings: SnapshotSettings = blob["settings"]
    settings.dirpath = str(dirpath)
    pending_file = folder / "pending.json"
    pending = json.loads(pending_file.read_text())["steps"] if pending_file.exists() else []
    files = {int(p.stem): p for p in folder.glob("[0-9]*.pt")}
    steps = sorted(files) if all_steps else [s for s in pending if s in files]
    jobs = []
    for s in steps:
        epoch = int(torch.load(files[s], map_location="cpu", weights_only=True).get("epoch", 0)) if workers <= 1 else 0
        jobs.append((s, epoch, files[s]))
    results = _run(model, jobs, settings, workers, progress)
    errors = _finish(dirpath, settings, results, fps)
    done = sorted(r.step for r in results if r.per_slice and not r.errors)
    left = [s for s in pending if s not in done]
    for s in done:
        files[s].unlink(missing_ok=True)
    if left:
        pending_file.write_text(json.dumps({"steps": left}))
    else:
        pending_file.unlink(missing_ok=True)
    return {"steps": done, "errors": errors}


def replay_checkpoints(
    ckpt_dir: str | os.PathLike[str],
    module_class: str,
    dirpath: str | os.PathLike[str],
    *,
    submodule: str | None = None,
    slices: Sequence[Any] | None = None,
    input_shape: Sequence[int] | None = None,
    output: int | str | None = None,
    settings: dict[str, Any] | None = None,
    fps: float = 8,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Frames, statistics and videos from a folder of ordinary Lightning checkpoints (``*.ckpt``).

    The slices come from ``slices``, or from the SplineCamCallback state saved in the checkpoints; so do
    ``input_shape``, ``submodule`` (the callback's ``module`` when it was an attribute path) and ``output`` when not
    given.

    Raises:
        ValueError: No checkpoint in ``ckpt_dir``, or no slices given and none saved in the checkpoints.
    """
    from splinecam_lightning.cli import load_model
    from splinecam_lightning.engine import prepare_model
    from splinecam_lightning.slices import Slice
    from splinecam_lightning.worker import WeightLayout

    ckpts = sorted(Path(ckpt_dir).glob("*.ckpt"))
    if not ckpts:
        raise ValueError(f"no *.ckpt file in {ckpt_dir}")
    metas = []
    for p in ckpts:
        ck = torch.load(p, map_location="cpu", weights_only=False)
        metas.append((int(ck.get("global_step", 0)), int(ck.get("epoch", 0)), p, ck))
    metas.sort(key=lambda m: m[0])
    saved = next(
        (
            state
            for *_, ck in metas
            for key, state in (ck.get("callbacks") or {}).items()
            if "SplineCamCallback" in str(key) and state.get("slices")
        ),
        {},
    )
    if slices is None and saved:
        slices = [Slice.from_state_dict(dict(s)) for s in saved["slices"]]
    input_shape = input_shape if input_shape is not None else saved.get("input_shape")
    submodule = submodule if submodule is not None else saved.get("module")
    output = output if output is not None else saved.get("output")
    if not slices:
        raise ValueError("no slices given and no SplineCamCallback state with slices in the checkpoints")

    def net(p: Path) -> Any:
        return load_model(str(p), module_class, submodule)

    first = net(metas[0][2])
    model = prepare_model(first, input_shape=input_shape, output=output)
    layout = WeightLayout(first, model.graph_module)
    cfg = SnapshotSettings(slices=list(slices), dirpath=str(dirpath), **(settings or {}))
    jobs = []
    for step, epoch, p, _ in metas:

        def loader(p: Path = p) -> dict[str, torch.Tensor]:
            return layout.read(net(p))

        jobs.append((step, epoch, loader))
    results = _run(model, jobs, cfg, 1, progress)
    errors = _finish(Path(dirpath), cfg, results, fps)
    return {"steps": sorted(r.step for r in results if r.per_slice), "errors": errors}
