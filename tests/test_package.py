"""Package boundaries: the pure core never imports Lightning; typed package; lazy edge exports."""

import ast
import subprocess
import sys
from pathlib import Path

import splinecam_lightning

PKG = Path(splinecam_lightning.__file__).parent
# The core layer of docs/architecture.md (plus the worker, which the Lightning glue uses but never needs Lightning).
CORE = [
    "errors",
    "slices",
    "layers",
    "ops",
    "tracing",
    "engine",
    "refine",
    "geometry",
    "memory",
    "partition",
    "stats",
    "boundary",
    "graph",
    "local",
    "scheduling",
    "worker",
]


def test_core_modules_do_not_import_lightning():
    for name in CORE:
        tree = ast.parse((PKG / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for m in mods:
                assert not m.startswith(("lightning", "pytorch_lightning")), f"{name}.py imports {m}"


def test_using_the_engine_loads_no_lightning():
    code = (
        "import sys, torch\n"
        "from splinecam_lightning import Slice, compute_partition\n"
        "net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))\n"
        "p = compute_partition(net, Slice.from_vertices([[-1, -1], [1, -1], [1, 1], [-1, 1]]))\n"
        "p.stats()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]\n"
        "assert not bad, bad\n"
        "print(p.num_regions)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 1


def test_py_typed_and_lazy_exports():
    assert (PKG / "py.typed").exists()
    from splinecam_lightning import SplineCamCallback, make_video, save_frame

    assert SplineCamCallback.__module__ == "splinecam_lightning.callback"
    assert callable(make_video) and callable(save_frame)
    assert set(splinecam_lightning.__all__) >= {"Slice", "Partition", "compute_partition", "sample_boundary"}
