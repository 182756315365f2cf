"""``splinecam-lightning``: the command-line interface.

Subcommands:

* ``demo``: train a two-moons MLP with :class:`~splinecam_lightning.callback.SplineCamCallback`, log to W&B
  offline, write frames, one mp4 per slice and a statistics plot, and print where they are;
* ``partition``: one exact partition of a saved model on a 2D slice, written as a PNG and a JSON of statistics;
* ``render``: re-render the archived partitions of a run (``<dir>/<slice>/partitions/*.npz``) with one colour
  scale and any style, and stitch one video per slice;
* ``video``: encode a folder of frames as an mp4 (or a GIF).

Bad input (a missing file, a wrong shape, an unsupported layer, a degenerate slice) prints one line
``error: <cause>`` on stderr and exits with status 2; set ``SPLINECAM_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "build_parser", "load_model", "CLIError"]

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


class CLIError(Exception):
    """Bad command-line input: reported as one ``error:`` line and exit status 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are a single line too."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------------------------------------- progress
@contextlib.contextmanager
def _busy(desc: str, enabled: bool = True) -> Iterator[None]:
    """An indeterminate tqdm bar (elapsed time) while a single long call runs; only on a terminal."""
    from tqdm.auto import tqdm

    show = enabled and sys.stderr.isatty()
    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", disable=not show, leave=False)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.25):
            bar.refresh()

    th = threading.Thread(target=tick, daemon=True) if show else None
    if th is not None:
        th.start()
    try:
        yield
    finally:
        stop.set()
        if th is not None:
            th.join()
        bar.close()


# ---------------------------------------------------------------------------------------------- parsing
def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise CLIError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise CLIError(f"{what} must be positive integers, got {text!r}")
    return vals


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise CLIError(f"{what} must be finite numbers, got {text!r}")
    return vals


def _load_array(path: str, what: str) -> Any:
    """A tensor from a ``.npy`` / ``.npz`` / ``.pt`` file (float64)."""
    import numpy as np
    import torch

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{what} file {path} does not exist")
    try:
        if p.suffix in (".npy", ".npz"):
            arr = np.load(p, allow_pickle=False)
            if isinstance(arr, np.lib.npyio.NpzFile):
                if len(arr.files) != 1:
                    raise CLIError(f"{what} file {path} holds {len(arr.files)} arrays; give one")
                arr = arr[arr.files[0]]
            t = torch.as_tensor(np.asarray(arr, dtype=np.float64))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, (list, tuple)):
                obj = torch.stack([torch.as_tensor(o) for o in obj])
            if not isinstance(obj, torch.Tensor):
                raise CLIError(f"{what} file {path} holds a {type(obj).__name__}, not a tensor")
            t = obj
    except CLIError:
        raise
    except Exception as e:
        raise CLIError(f"cannot read {what} file {path}: {_one_line(e)}") from None
    return t.detach().to(torch.float64)


# ---------------------------------------------------------------------------------------------- models
def _import_object(spec: str) -> Any:
    """``package.module:Attr`` (or ``package.module.Attr``) -> the object."""
    mod_name, sep, attr = spec.partition(":")
    if not sep:
        mod_name, _, attr = spec.rpartition(".")
    if not mod_name or not attr:
        raise CLIError(f"--module-class must look like 'package.module:ClassName', got {spec!r}")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise CLIError(f"cannot import module {mod_name!r} for --module-class: {_one_line(e)}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``constants.pkl`` (plain ``torch.save`` files have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())


# Eager classes a scripted module can be rebuilt from (torch.fx cannot trace ScriptModules).
_SCRIPT_LAYERS = (
    "Linear Conv1d Conv2d ReLU LeakyReLU ReLU6 Hardtanh PReLU Identity Dropout Dropout1d Dropout2d Flatten "
    "MaxPool1d MaxPool2d AvgPool1d AvgPool2d AdaptiveAvgPool2d BatchNorm1d BatchNorm2d Unflatten"
).split()


def _unscript(m: Any, path: str = "") -> Any:
    """Rebuild an eager ``nn.Module`` from a scripted one made of standard layers, weights included."""
    import inspect

    import torch.nn as nn

    name = getattr(m, "original_name", type(m).__name__)
    where = f" at '{path}'" if path else ""
    if name == "Sequential":
        children = [_unscript(c, f"{path}.{n}" if path else n) for n, c in m.named_children()]
        return nn.Sequential(*children)
    if name not in _SCRIPT_LAYERS:
        raise CLIError(
            f"the TorchScript model has a custom module '{name}'{where}; torch.fx cannot trace TorchScript, "
            "so save the model with torch.save(model) or as a Lightning checkpoint instead"
        )
    cls = getattr(nn, name)
    kwargs: dict[str, Any] = {}
    if name == "Linear":
        out_f, in_f = m.weight.shape
        kwargs = {"in_features": int(in_f), "out_features": int(out_f), "bias": m.bias is not None}
    else:
        for pname, p in inspect.signature(cls.__init__).parameters.items():
            if pname in ("self", "device", "dtype") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if pname == "bias":
                kwargs["bias"] = getattr(m, "bias", None) is not None
                continue
            if pname == "num_parameters":  # PReLU
                kwargs[pname] = int(m.weight.numel())
                continue
            if pname == "init":
                continue
            try:
                val = getattr(m, pname)
            except (AttributeError, RuntimeError):
                if p.default is inspect.Parameter.empty:
                    raise CLIError(
                        f"cannot rebuild TorchScript layer {name}{where}: its setting '{pname}' is not stored "
                        "(traced with torch.jit.trace?); save the model with torch.save(model) instead"
                    ) from None
                continue
            kwargs[pname] = val
    eager = cls(**kwargs)
    eager.load_state_dict(m.state_dict())
    eager.train(m.training)
    return eager


def load_model(path: str | os.PathLike[str], module_class: str | None = None, submodule: str | None = None) -> Any:
    """Load a model for partitioning from a Lightning checkpoint, a TorchScript file or a ``torch.save`` file.

    Args:
        path: The model file.
        module_class: ``package.module:Class`` of the LightningModule a checkpoint belongs to; the model is
            then ``Class.load_from_checkpoint(path)``.
        submodule: Attribute path of the network inside the loaded module (e.g. ``"net"``).

    Returns:
        The ``nn.Module`` in eval mode on the CPU.

    Raises:
        CLIError: The file is missing or holds no usable model.
    """
    import operator

    import torch
    import torch.nn as nn

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"model file {p} does not exist")
    model: Any
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if module_class is not None:
            cls = _import_object(module_class)
            loader = getattr(cls, "load_from_checkpoint", None)
            if loader is None:
                raise CLIError(f"{module_class} has no load_from_checkpoint: is it a LightningModule?")
            try:
                model = loader(str(p), map_location="cpu")
            except Exception as e:
                raise CLIError(f"cannot load checkpoint {p} into {module_class}: {_one_line(e)}") from None
        elif _is_torchscript(p):
            try:
                scripted = torch.jit.load(str(p), map_location="cpu")
            except Exception as e:
                raise CLIError(f"cannot load TorchScript file {p}: {_one_line(e)}") from None
            model = _unscript(scripted)
        else:
            try:
                model = torch.load(p, map_location="cpu", weights_only=False)
            except Exception as e:
                raise CLIError(f"cannot load {p} with torch.load: {_one_line(e)}") from None
            if isinstance(model, dict):
                if "state_dict" in model and ("pytorch-lightning_version" in model or "epoch" in model):
                    raise CLIError(
                        f"{p} is a Lightning checkpoint: pass --module-class package.module:YourLightningModule"
                    )
                raise CLIError(
                    f"{p} holds a dict (a state_dict?), not a model: save the whole module with "
                    "torch.save(model, path), or pass a Lightning checkpoint with --module-class"
                )
    if submodule:
        try:
            model = operator.attrgetter(submodule)(model)
        except AttributeError:
            raise CLIError(f"the loaded {type(model).__name__} has no submodule {submodule!r}") from None
    if isinstance(model, torch.jit.ScriptModule):
        model = _unscript(model)
    if not isinstance(model, nn.Module):
        raise CLIError(f"{p} holds a {type(model).__name__}, not a torch.nn.Module")
    return model.to("cpu").eval()


# ---------------------------------------------------------------------------------------------- slices
def _make_slice(args: argparse.Namespace, input_shape: tuple[int, ...] | None) -> tuple[Any, tuple[int, ...] | None]:
    """The slice from ``--points`` / ``--square`` / ``--box``, and the (possibly inferred) input shape."""
    import torch

    from splinecam_lightning.slices import Slice

    given = [n for n in ("points", "square", "box") if getattr(args, n) is not None]
    if len(given) != 1:
        raise CLIError(
            "give exactly one slice: --points FILE, --square CENTER:RADIUS or --box XMIN,XMAX,YMIN,YMAX"
            + (f" (got {', '.join('--' + g for g in given)})" if given else "")
        )
    if args.points is not None:
        pts = _load_array(args.points, "--points")
        if pts.ndim < 2 or pts.shape[0] != 3:
            raise CLIError(
                f"--points must hold exactly 3 points, shape (3, D) or (3, *input_shape); got {tuple(pts.shape)}"
            )
        if input_shape is None and pts.ndim > 2:
            input_shape = tuple(int(s) for s in pts.shape[1:])
        flat = pts.reshape(3, -1)
        return Slice.through_points(flat[0], flat[1], flat[2], margin=args.margin, name=args.name), input_shape
    if args.square is not None:
        center_s, sep, radius_s = args.square.rpartition(":")
        if not sep or not center_s:
            raise CLIError(f"--square must look like CX,CY:RADIUS or FILE.npy:RADIUS, got {args.square!r}")
        try:
            radius = float(radius_s)
        except ValueError:
            raise CLIError(f"--square radius must be a number, got {radius_s!r}") from None
        if not (radius > 0 and math.isfinite(radius)):
            raise CLIError(f"--square radius must be positive, got {radius_s}")
        if Path(center_s).suffix in (".npy", ".npz", ".pt", ".pth"):
            center = _load_array(center_s, "--square centre")
            if input_shape is None and center.ndim > 1:
                input_shape = tuple(int(s) for s in center.shape)
            center = center.reshape(-1)
        else:
            center = torch.tensor(_floats(center_s, "--square centre"), dtype=torch.float64)
        if center.numel() < 2:
            raise CLIError("--square needs a centre with at least 2 coordinates")
        if center.numel() == 2:
            return Slice.square(center, radius, name=args.name), input_shape
        gen = torch.Generator().manual_seed(args.seed)
        return Slice.around(center, radius, generator=gen, name=args.name), input_shape
    box = _floats(args.box, "--box")
    if len(box) != 4:
        raise CLIError(f"--box must be XMIN,XMAX,YMIN,YMAX (4 numbers), got {len(box)}")
    try:
        return Slice.box(*box, name=args.name), input_shape
    except ValueError as e:
        raise CLIError(f"--box {args.box}: {e}") from None


# ---------------------------------------------------------------------------------------------- commands
def _cmd_demo(args: argparse.Namespace) -> int:
    from splinecam_lightning.demo import run_demo

    if args.frame_size is not None:
        _frame_size(args.frame_size, "--frame-size")
    t0 = time.perf_counter()
    res = run_demo(
        steps=args.steps,
        width=args.width,
        depth=args.depth,
        every=args.every,
        out=args.out,
        seed=args.seed,
        quick=args.quick,
        wandb=not args.no_wandb,
        wandb_online=args.wandb_online,
        frame_size=args.frame_size,
        progress=not args.no_progress,
    )
    cfg = res["config"]
    n_snap = len(res["history"])
    print(
        f"\nSplineCam demo done in {time.perf_counter() - t0:.0f} s: {cfg['steps']} steps, "
        f"MLP 2 -> {cfg['width']} x {cfg['depth']} -> 1, final loss {res['final_loss']:.4f}, {n_snap} snapshots"
    )
    rows: list[tuple[str, str]] = []
    for name, folder in res["frames"].items():
        n = len(list(Path(folder).glob("*.png"))) if Path(folder).is_dir() else 0
        rows.append((f"frames ({name})", f"{folder}/  ({n} PNGs)"))
    for name, v in res["videos"].items():
        rows.append((f"video ({name})", str(v)))
    if res["stats_plot"]:
        rows.append(("stats plot", str(res["stats_plot"])))
    if res["stats_csv"]:
        rows.append(("stats table", str(res["stats_csv"])))
    rows.append(("metrics CSV", str(res["csv_metrics"])))
    rows.append(("checkpoint", str(res["checkpoint"])))
    if res["wandb_run_dir"] is not None:
        rows.append(("W&B run", str(res["wandb_run_dir"])))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if res["wandb_run_dir"] is not None and not args.wandb_online:
        print(f"\nUpload the offline W&B run later with:\n  wandb sync {res['wandb_run_dir']}")
    print(
        "\nPartition the trained model on any other slice with:\n"
        f"  splinecam-lightning partition {res['checkpoint']} --module-class splinecam_lightning.demo:MoonsClassifier"
        f" --submodule net --box -1.6,2.6,-1.1,1.6 --out-png {Path(res['out']) / 'partition.png'}"
    )
    return 0


def _frame_size(size: int, flag: str) -> int:
    from splinecam_lightning.render import check_frame_size

    try:
        return check_frame_size(size, flag)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _check_device(name: str | None) -> Any:
    """``--device`` as a ``torch.device``, refusing devices this torch cannot use (rather than failing later)."""
    if name is None:
        return None
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a device name (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise CLIError(f"--device {name}: CUDA is not available ({why}); leave out --device to use the CPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CLIError(f"--device {name}: MPS is not available on this machine; leave out --device to use the CPU")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"--device {name}: only cpu, cuda and mps are supported")
    return dev


def _check_class_pair(prep: Any, sl: Any, input_shape: tuple[int, ...] | None, pair: tuple[int, int]) -> None:
    """``--class-pair`` against the model's number of outputs (one forward pass at the slice's origin)."""
    import torch

    shape = input_shape if input_shape is not None else prep.input_shape or (sl.input_dim,)
    try:
        with torch.no_grad():
            y = prep.graph_module(sl.origin.reshape(1, *shape).to(prep.device, torch.float64))
    except Exception:
        return  # a shape problem: compute_partition reports it with its own message
    n_out = int(y.reshape(1, -1).shape[1])
    if n_out < 2:
        raise CLIError(f"--class-pair needs a model with several outputs; this one has {n_out}")
    if max(pair) >= n_out:
        raise CLIError(
            f"--class-pair {pair[0]},{pair[1]}: the model has {n_out} outputs, so classes are 0..{n_out - 1}"
        )


_OUTPUT_HELP = "index or key of the value to partition when the network's forward returns several"


def _output(text: str | None) -> int | str | None:
    """``--output``: an index when it reads as an integer, else a key."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _cmd_partition(args: argparse.Namespace) -> int:
    from splinecam_lightning.engine import compute_partition, prepare_model
    from splinecam_lightning.render import save_frame

    input_shape = _ints(args.input_shape, "--input-shape") if args.input_shape else None
    class_pair = None
    if args.class_pair:
        try:
            cp = tuple(int(v) for v in args.class_pair.split(","))
        except ValueError:
            cp = ()
        if len(cp) != 2 or min(cp) < 0 or cp[0] == cp[1]:
            raise CLIError(f"--class-pair must be two different class indices I,J, got {args.class_pair!r}")
        class_pair = (cp[0], cp[1])
    _frame_size(args.size, "--size")
    device = _check_device(args.device)

    from tqdm.auto import tqdm

    show = not args.no_progress and sys.stderr.isatty()
    with tqdm(total=4, desc="partition", unit="stage", disable=not show, leave=False) as bar:
        bar.set_postfix_str("loading model")
        model = load_model(args.model, args.module_class, args.submodule)
        bar.update()
        sl, input_shape = _make_slice(args, input_shape)
        if input_shape is not None and math.prod(input_shape) != sl.input_dim:
            raise CLIError(
                f"--input-shape {','.join(map(str, input_shape))} has {math.prod(input_shape)} elements but the "
                f"slice lives in {sl.input_dim} dimensions"
            )
        bar.set_postfix_str("exact partition")
        bar.update()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prep = prepare_model(model, input_shape=input_shape, device=device, output=_output(args.output))
            if class_pair is not None:
                _check_class_pair(prep, sl, input_shape, class_pair)
            part = compute_partition(
                prep, sl, input_shape=input_shape, max_regions=args.max_regions, class_pair=class_pair
            )
        bar.set_postfix_str("rendering")
        bar.update()
        stats = part.stats()
        title = args.title if args.title is not None else f"{Path(args.model).name} | {part.num_regions} regions"
        out_png = Path(args.out_png)
        save_frame(
            part,
            out_png,
            color_by=args.color_by,
            size_px=args.size,
            title=title or None,
            color_scale=args.color_scale,
            show_axes=not args.no_axes,
        )
        bar.update()

    info = {
        "model": str(Path(args.model).resolve()),
        "module_class": args.module_class,
        "submodule": args.submodule,
        "output": _output(args.output),
        "input_shape": list(input_shape) if input_shape is not None else [sl.input_dim],
        "class_pair": list(class_pair) if class_pair is not None else None,
        "num_regions": part.num_regions,
        "seconds": float(part.seconds),
        "stats": {k: float(v) for k, v in stats.items()},
        "slice": {
            "name": sl.name,
            "input_dim": sl.input_dim,
            "area": sl.area,
            "domain": sl.domain.tolist(),
            "anchors": sl.anchors.tolist(),
            "origin": sl.origin.tolist() if sl.input_dim <= 64 else None,
        },
        "boundary_segments": int(part.boundary.shape[0]),
        "png": str(out_png.resolve()),
    }
    out_json = Path(args.out_json) if args.out_json else out_png.with_suffix(".json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
    print(
        f"{part.num_regions} regions, decision boundary length {stats.get('boundary_length', float('nan')):.4g} "
        f"({part.seconds:.2f} s)"
    )
    print(f"  image: {out_png}")
    print(f"  stats: {out_json}")
    return 0


def _cmd_video(args: argparse.Namespace) -> int:
    from splinecam_lightning.video import make_video

    frames = Path(args.frames_dir)
    if not frames.is_dir():
        raise CLIError(f"frames folder {frames} does not exist")
    if not (args.fps > 0 and math.isfinite(args.fps)):
        raise CLIError(f"--fps must be a positive number, got {args.fps}")
    n = len([p for p in frames.glob(args.pattern) if p.is_file() and not p.name.startswith(".")])
    if n == 0:
        raise CLIError(f"no frames matching {args.pattern!r} in {frames}")
    if args.out is not None:
        from splinecam_lightning.video import GIF_SUFFIX, VIDEO_SUFFIXES

        if Path(args.out).suffix.lower() not in (*VIDEO_SUFFIXES, GIF_SUFFIX):
            raise CLIError(
                f"--out {args.out}: the suffix picks the format; use .mp4 (H.264; also .m4v .mov .mkv) or .gif"
            )
    with _busy(f"encoding {n} frames", enabled=not args.no_progress):
        out = make_video(frames, args.out, fps=args.fps, pattern=args.pattern)
    print(f"wrote {out} ({n} frames at {args.fps:g} fps)")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from splinecam_lightning.replay import replay, replay_checkpoints

    folder = Path(args.dir)
    if not folder.is_dir():
        raise CLIError(f"folder {folder} does not exist")
    if args.workers < 1:
        raise CLIError(f"--workers must be >= 1, got {args.workers}")
    with _busy("computing snapshots", enabled=not args.no_progress):
        if args.module_class is not None:
            out_dir = Path(args.out) if args.out else folder / "splinecam"
            shape = _ints(args.input_shape, "--input-shape") if args.input_shape else None
            res = replay_checkpoints(
                folder,
                args.module_class,
                out_dir,
                submodule=args.submodule,
                input_shape=shape,
                output=_output(args.output),
                fps=args.fps,
            )
        else:
            out_dir = folder
            res = replay(folder, workers=args.workers, all_steps=args.all, fps=args.fps)
    for msg in res["errors"]:
        print(f"warning: {msg}", file=sys.stderr)
    print(f"computed {len(res['steps'])} snapshot(s) {res['steps'][:10]}{' ...' if len(res['steps']) > 10 else ''}")
    print(f"  stats, videos and frames in {out_dir}")
    return 0


def _load_data(path: str) -> tuple[Any, Any]:
    """``--data``: a ``.npy`` of ``(N, D)`` points, or a ``.npz`` with ``x`` (and optional ``y`` labels)."""
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--data file {path} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            if isinstance(z, np.lib.npyio.NpzFile):
                if "x" not in z.files:
                    raise CLIError(f"--data file {path} has no array 'x' (it has: {', '.join(z.files)})")
                return np.asarray(z["x"], dtype=np.float64), (np.asarray(z["y"]) if "y" in z.files else None)
            return np.asarray(z, dtype=np.float64), None
    except CLIError:
        raise
    except Exception as e:
        raise CLIError(f"cannot read --data file {path}: {_one_line(e)}") from None


def _cmd_render(args: argparse.Namespace) -> int:
    from splinecam_lightning.archive import archived_partitions, render_run

    run = Path(args.dir)
    if not run.is_dir():
        raise CLIError(f"run folder {run} does not exist")
    _frame_size(args.size, "--size")
    if not (args.fps > 0 and math.isfinite(args.fps)):
        raise CLIError(f"--fps must be a positive number, got {args.fps}")
    color_range = None
    if args.color_range is not None:
        color_range = _floats(args.color_range, "--color-range")
        if len(color_range) != 2 or not color_range[0] < color_range[1]:
            raise CLIError(f"--color-range must be VMIN,VMAX with VMIN < VMAX, got {args.color_range!r}")
        if args.color_scale == "log" and color_range[0] <= 0:
            raise CLIError(f"--color-range on the log scale needs VMIN > 0, got {args.color_range!r}")
    slices = [s for s in args.slices.split(",") if s] if args.slices else None
    try:
        runs = archived_partitions(run, slices)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if not runs:
        raise CLIError(
            f"no partition archive under {run}: expected {run}/<slice>/partitions/<step>.npz, as written by "
            "SplineCamCallback (or Partition.save)"
        )
    data, labels = _load_data(args.data) if args.data else (None, None)
    total = sum(len(v) for v in runs.values())

    from tqdm.auto import tqdm

    show = not args.no_progress and sys.stderr.isatty()
    with tqdm(total=total, desc="rendering", unit="frame", disable=not show, leave=False) as bar:
        out = render_run(
            run,
            out=args.out,
            slices=list(runs),
            color_by=args.color_by,
            color_scale=args.color_scale,
            color_range=color_range,
            size_px=args.size,
            show_axes=not args.no_axes,
            show_legend=not args.no_legend,
            show_edges=not args.no_edges,
            titles=not args.no_titles,
            data=data,
            data_labels=labels,
            fps=args.fps,
            make_videos=not args.no_video,
            progress=lambda name, i, n: bar.update(),
        )
    what = "frames" if args.no_video else "video"
    for name, path in out.items():
        print(f"{name}: {len(runs[name])} frames -> {what} {path}")
    return 0


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``splinecam-lightning``."""
    from splinecam_lightning import __version__

    p = _Parser(
        prog="splinecam-lightning",
        description="Exact linear-region partitions of piecewise-linear networks, watched while they train.",
        epilog="Run 'splinecam-lightning COMMAND --help' for the options of a command. "
        "Set SPLINECAM_DEBUG=1 to see tracebacks.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser(
        "demo",
        help="train a two-moons MLP with the SplineCam callback (W&B offline) and write frames, videos, a plot",
        description="Train a two-moons ReLU MLP with SplineCamCallback attached. Logs to Weights & Biases in "
        "offline mode by default (no account needed) and to CSV; writes one frame per slice per snapshot, one "
        "mp4 per slice, a statistics plot and a checkpoint under --out, then prints where they are. "
        "At the defaults (2000 steps, width 32, depth 4, a snapshot every 100 steps) it takes under a "
        "minute on 2 CPU cores; --quick takes a few seconds.",
    )
    d.add_argument("--steps", type=int, default=None, help="optimizer steps [2000; --quick: 60]")
    d.add_argument("--width", type=int, default=None, help="hidden width of the MLP [32; --quick: 8]")
    d.add_argument("--depth", type=int, default=None, help="number of hidden layers [4; --quick: 2]")
    d.add_argument("--every", type=int, default=None, help="snapshot every N steps [100; --quick: 20]")
    d.add_argument("--frame-size", type=int, default=None, help="frame size in pixels, multiple of 16 [512; 128]")
    d.add_argument("--out", default="splinecam_out", help="output folder [splinecam_out]")
    d.add_argument("--seed", type=int, default=0, help="seed of data, weights and slices [0]")
    d.add_argument("--quick", action="store_true", help="tiny settings for smoke tests (explicit options win)")
    g = d.add_mutually_exclusive_group()
    g.add_argument("--no-wandb", action="store_true", help="log to CSV only, no W&B run")
    g.add_argument("--wandb-online", action="store_true", help="stream to the W&B server instead of offline")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_demo)

    pa = sub.add_parser(
        "partition",
        help="exact partition of a saved model on a 2D slice -> PNG + JSON of statistics",
        description=_paragraphs(
            "Compute the exact linear-region partition of a saved model on one 2D slice of its input space, and "
            "write it as a PNG plus a JSON of statistics.",
            "MODEL is one of: a Lightning checkpoint (with --module-class package.module:Class, loaded with "
            "Class.load_from_checkpoint); a TorchScript file (torch.jit.save; only scripted models built from "
            "standard layers, since torch.fx cannot trace TorchScript); or a whole module saved with "
            "torch.save(model, path) (loaded with weights_only=False: only load files you trust).",
            "The slice is exactly one of: --points FILE (.npy/.npz/.pt holding 3 input points, shape (3, D) or "
            "(3, *input_shape): the plane through them, with --margin around them); --square CENTER:RADIUS "
            "(CENTER is 'CX,CY' for a 2D-input model: the axis-aligned square; or D comma-separated numbers or a "
            ".npy/.pt file for a D-dimensional input: a randomly oriented square, seeded by --seed); "
            "--box XMIN,XMAX,YMIN,YMAX (2D-input models).",
            "Examples:\n"
            "  splinecam-lightning partition model.pt --box -2,2,-2,2\n"
            "  splinecam-lightning partition cnn.pt --input-shape 1,8,8 --points three_digits.npy --class-pair 0,1\n"
            "  splinecam-lightning partition demo.ckpt --module-class splinecam_lightning.demo:MoonsClassifier "
            "--submodule net --square 0.5,0.25:0.5",
        ),
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=100),
    )
    pa.add_argument("model", metavar="MODEL", help="checkpoint, TorchScript or torch.save file")
    pa.add_argument("--module-class", metavar="PKG.MOD:CLASS", help="LightningModule class of a checkpoint")
    pa.add_argument("--submodule", metavar="ATTR", help="network inside the loaded module, e.g. 'net'")
    pa.add_argument("--input-shape", metavar="C,H,W", help="per-sample input shape, e.g. 3,16,16 [flat]")
    pa.add_argument("--output", metavar="I|KEY", help=_OUTPUT_HELP)
    pa.add_argument("--points", metavar="FILE", help="file with 3 points spanning the slice")
    pa.add_argument("--square", metavar="CENTER:RADIUS", help="square of half-width RADIUS around CENTER")
    pa.add_argument("--box", metavar="XMIN,XMAX,YMIN,YMAX", help="rectangle, for 2D-input models")
    pa.add_argument("--margin", type=float, default=0.2, help="margin around --points (fraction) [0.2]")
    pa.add_argument("--name", default="slice", help="slice name [slice]")
    pa.add_argument("--seed", type=int, default=0, help="seed of the --square orientation [0]")
    pa.add_argument("--class-pair", metavar="I,J", help="only the decision boundary between classes I and J")
    pa.add_argument("--max-regions", type=int, default=1_000_000, help="fail above this many regions [1e6]")
    pa.add_argument("--device", default=None, help="device for the computation, e.g. cuda [the model's]")
    pa.add_argument("--color-by", choices=("slope", "random", "class"), default="slope", help="region colours")
    pa.add_argument("--size", type=int, default=512, help="longer image side in pixels, multiple of 16 [512]")
    pa.add_argument("--no-axes", action="store_true", help="no axes")
    pa.add_argument("--color-scale", choices=("log", "linear"), default="log", help="slope colour scale [log]")
    pa.add_argument("--title", default=None, help="image title ['' for none]")
    pa.add_argument("--out-png", default="partition.png", help="output image [partition.png]")
    pa.add_argument("--out-json", default=None, help="output statistics [the PNG path with .json]")
    pa.add_argument("--no-progress", action="store_true", help="no progress bar")
    pa.set_defaults(func=_cmd_partition)

    r = sub.add_parser(
        "render",
        help="re-render a run's archived partitions with one colour scale and make one video per slice",
        description=_paragraphs(
            "Re-render every archived partition of a run (DIR/<slice>/partitions/<step>.npz, written by "
            "SplineCamCallback or Partition.save) and stitch one video per slice. Frames go to "
            "OUT/<slice>/rendered/<step>.png and videos to OUT/<slice>.mp4 (OUT defaults to DIR).",
            "The slope colour scale is fitted to the whole run (robust percentiles of area-weighted slope norms "
            "over all snapshots and slices), so late frames do not saturate; --color-range fixes it instead.",
            "Examples:\n"
            "  splinecam-lightning render splinecam_out/splinecam\n"
            "  splinecam-lightning render runs/a --color-by class --no-axes --size 768 --fps 12",
        ),
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=100),
    )
    r.add_argument("dir", metavar="DIR", help="run folder (the callback's dirpath)")
    r.add_argument("--out", default=None, help="output folder [DIR]")
    r.add_argument("--slices", metavar="A,B", default=None, help="only these slices [all]")
    r.add_argument("--color-by", choices=("slope", "class", "random"), default="slope", help="region colours [slope]")
    r.add_argument("--color-scale", choices=("log", "linear"), default="log", help="slope colour scale [log]")
    r.add_argument("--color-range", metavar="VMIN,VMAX", default=None, help="fixed slope range [fitted to the run]")
    r.add_argument("--size", type=int, default=512, help="longer frame side in pixels, multiple of 16 [512]")
    r.add_argument("--fps", type=float, default=8, help="frames per second of the videos [8]")
    r.add_argument("--no-axes", action="store_true", help="no axes (e.g. for videos)")
    r.add_argument("--no-legend", action="store_true", help="no colour bar / class legend")
    r.add_argument("--no-edges", action="store_true", help="no region edges")
    r.add_argument("--no-titles", action="store_true", help="no 'slice | step | regions' titles")
    r.add_argument("--data", metavar="FILE", default=None, help="overlay training data: .npy (N,D) or .npz with x[,y]")
    r.add_argument("--no-video", action="store_true", help="frames only")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_render)

    v = sub.add_parser(
        "video",
        help="encode a folder of frames as an H.264 mp4 (or a GIF)",
        description="Encode the PNG frames of FRAMES_DIR (in natural file-name order) as an H.264/yuv420p mp4, "
        "or as an animated GIF when --out ends in .gif.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    v.add_argument("frames_dir", metavar="FRAMES_DIR", help="folder of frames, e.g. splinecam_out/splinecam/moons")
    v.add_argument("--out", default=None, help="output .mp4 or .gif (default: FRAMES_DIR.mp4 next to the folder)")
    v.add_argument("--fps", type=float, default=8, help="frames per second")
    v.add_argument("--pattern", default="*.png", help="glob selecting the frames")
    v.add_argument("--no-progress", action="store_true", help="no progress indicator")
    v.set_defaults(func=_cmd_video)

    r = sub.add_parser(
        "replay",
        help="compute deferred snapshots (or a folder of checkpoints) after training",
        description="Compute the snapshots a SplineCamCallback deferred to DIR/snapshots/ (frames, stats.csv, "
        "videos), or, with --module-class, the snapshots of every Lightning checkpoint (*.ckpt) in DIR.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    r.add_argument("dir", metavar="DIR", help="the callback's dirpath, or a folder of *.ckpt files")
    r.add_argument("--workers", type=int, default=1, help="worker processes")
    r.add_argument("--all", action="store_true", help="recompute every saved weight snapshot, not only pending ones")
    r.add_argument("--module-class", default=None, help="package.module:Class of the checkpoints' LightningModule")
    r.add_argument(
        "--submodule", default=None, help="attribute path of the network inside the LightningModule [saved state]"
    )
    r.add_argument("--input-shape", default=None, help="per-sample input shape, e.g. 1,8,8 [saved state]")
    r.add_argument("--output", default=None, metavar="I|KEY", help=_OUTPUT_HELP + " [saved state]")
    r.add_argument("--out", default=None, help="output folder for checkpoints (default DIR/splinecam)")
    r.add_argument("--fps", type=float, default=8, help="frames per second of the videos")
    r.add_argument("--no-progress", action="store_true", help="no progress indicator")
    r.set_defaults(func=_cmd_replay)
    return p


# ---------------------------------------------------------------------------------------------- main
def _paragraphs(*paras: str, width: int = 96) -> str:
    """Wrap each paragraph (lines starting with two spaces are kept as they are)."""
    import textwrap

    out = []
    for para in paras:
        lines = para.split("\n")
        out.append("\n".join(ln if ln.startswith("  ") else textwrap.fill(ln, width) for ln in lines))
    return "\n\n".join(out)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return msg or type(e).__name__


# Library messages name keyword arguments; on the command line the user knows the flags.
_FLAG_NAMES = (
    ("pass input_shape=", "pass --input-shape"),
    ("input_shape=", "--input-shape "),
    ("max_regions=", "--max-regions "),
    ("class_pair=", "--class-pair "),
    ("module=", "--submodule "),
    ("output=", "--output "),
)


def _flag_names(msg: str) -> str:
    for kw, flag in _FLAG_NAMES:
        msg = msg.replace(kw, flag)
    return msg.replace("  ", " ")


def _report(e: BaseException) -> str:
    """The one-line cause of an error."""
    from splinecam_lightning.errors import TooManyRegionsError, UnsupportedModelError

    msg = _flag_names(_one_line(e))
    if isinstance(e, UnsupportedModelError):
        return f"unsupported model: {msg}"
    if isinstance(e, TooManyRegionsError):
        return f"{msg} (see --max-regions)"
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"no such file: {e.filename}"
    if isinstance(e, (CLIError, ValueError)):
        return msg
    return f"{type(e).__name__}: {msg}"


_VALUE_OPTIONS = ("--box", "--square", "--points", "--class-pair", "--color-range")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--box -2,2,-2,2`` -> ``--box=-2,2,-2,2``: argparse would read a leading ``-`` as an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if a in _VALUE_OPTIONS and nxt[:1] == "-" and nxt[1:2] in tuple("0123456789."):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: Arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 on bad input, 1 on any other failure.
    """
    parser = build_parser()
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else EXIT_BAD_INPUT)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    if os.environ.get("SPLINECAM_DEBUG"):
        return int(args.func(args))
    from splinecam_lightning.errors import SplineCamError

    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (CLIError, SplineCamError, ValueError, OSError) as e:
        print(f"error: {_report(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        print(f"error: {_report(e)}", file=sys.stderr)
        return EXIT_FAILURE


def run() -> None:
    """The ``splinecam-lightning`` command: :func:`main` in a process of its own, which therefore keeps freed
    memory for reuse (:func:`~splinecam_lightning.memory.reuse_freed_memory`) as the snapshot worker does:
    ``replay`` computes one partition after another."""
    from splinecam_lightning import memory

    memory.reuse_freed_memory()
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
