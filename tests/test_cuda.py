"""CUDA: the engine runs where the model's parameters are. Skipped on machines without a GPU."""

import pytest
import torch
from torch import nn

from splinecam_lightning import Slice, compute_partition

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SQ = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        nn.LeakyReLU(0.1),
        nn.Linear(16, 3),
    )


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_cuda_matches_cpu(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        sl, shape = Slice.from_vertices(2 * SQ), None
    else:
        net = _cnn()
        g = torch.Generator().manual_seed(0)
        sl, shape = Slice.through_points(*torch.randn(3, 64, generator=g)), (1, 8, 8)
    cpu = compute_partition(net, sl, input_shape=shape)
    net_gpu = net.cuda().half()
    gpu = compute_partition(net_gpu, sl, input_shape=shape)
    # The user's model stays on the GPU in half precision; results come back on the CPU in float64.
    assert next(net_gpu.parameters()).device.type == "cuda"
    assert next(net_gpu.parameters()).dtype == torch.float16
    assert gpu.vertices.device.type == "cpu" and gpu.vertices.dtype == torch.float64
    assert abs(float(gpu.areas.sum()) - sl.area) / sl.area < 1e-9
    # Half-precision weights differ from the float32 ones, so compare against a CPU run of the same weights.
    ref = compute_partition(net_gpu.float().cpu(), sl, input_shape=shape)
    assert gpu.num_regions == ref.num_regions
    assert torch.allclose(gpu.areas.sort().values, ref.areas.sort().values, rtol=1e-9, atol=1e-12)
    assert cpu.num_regions > 1


def test_explicit_device_argument():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    p_cpu = compute_partition(net, Slice.from_vertices(SQ))
    p_gpu = compute_partition(net, Slice.from_vertices(SQ), device="cuda")
    assert p_gpu.num_regions == p_cpu.num_regions
    assert next(net.parameters()).device.type == "cpu"


def test_callback_worker_computes_on_the_gpu(tmp_path):
    import lightning.pytorch as L
    from callback_utils import MoonsModule, moons_loader

    from splinecam_lightning.callback import SplineCamCallback

    model = MoonsModule()
    sl = Slice.from_vertices(2 * SQ, name="sq")
    cb = SplineCamCallback(
        slices=[sl], every_n_train_steps=2, dirpath=tmp_path / "sc", frame_size=64, module="net", max_overhead=None
    )
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[cb],
    )
    trainer.fit(model, moons_loader())
    assert cb.snapshot_steps == [0, 2, 4]
    assert next(model.parameters()).device.type == "cuda"
    ref = compute_partition(model.net.cpu(), sl)
    assert int(cb.history[-1]["slices"]["sq"]["num_regions"]) == ref.num_regions
