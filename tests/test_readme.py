"""The README's Python snippets run as written (with a tiny model standing in for the reader's)."""

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_quickstart_and_engine_snippets():
    blocks = _python_blocks()
    assert len(blocks) >= 2
    assert "SplineCamCallback" in blocks[0] and len(blocks[0].strip().splitlines()) <= 12
    assert "compute_partition" in blocks[1]


def test_quickstart_runs(tmp_path, monkeypatch):
    import lightning.pytorch as L
    from torch.utils.data import DataLoader, TensorDataset

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.binary_cross_entropy_with_logits(self.net(x).squeeze(1), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    train_loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).float()), batch_size=16)
    code = _python_blocks()[0].replace("max_steps=2000", "max_steps=4, enable_progress_bar=False")
    code = code.replace("every_n_train_steps=100", "every_n_train_steps=2")
    ns = {"model": Model(), "train_loader": train_loader}
    exec(compile(code, "README quickstart", "exec"), ns)
    import wandb

    wandb.finish()
    frames = sorted((tmp_path / "splinecam" / "square").glob("*.png"))
    assert [f.stem for f in frames] == ["00000000", "00000002", "00000004"]
    assert (tmp_path / "splinecam" / "square.mp4").stat().st_size > 0


def test_engine_snippet_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 64, 3))
    g = torch.Generator().manual_seed(0)
    x_a, x_b, x_c = torch.randn(3, 64, generator=g)
    ns = {"model": model, "x_a": x_a, "x_b": x_b, "x_c": x_c}
    exec(compile(_python_blocks()[1], "README engine snippet", "exec"), ns)
    part = ns["part"]
    assert part.num_regions > 1 and ns["x_on_boundary"].shape == (64, 64)
