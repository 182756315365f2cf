"""Networks whose forward returns several values (``return logits, features``): ``output=`` chooses one."""

from __future__ import annotations

import collections
import json
import warnings

import oracles
import pytest
import torch
from callback_utils import SQUARE, MoonsModule, make_trainer, moons_loader
from torch import nn

from splinecam_lightning import Slice, compute_partition, local_complexity, prepare_model
from splinecam_lightning.callback import SplineCamCallback, SplineCamWarning
from splinecam_lightning.cli import main
from splinecam_lightning.engine import UnsupportedModelError
from splinecam_lightning.errors import OutputChoiceError

BOX = Slice.box(-2, 2, -1.5, 1.5)
Pair = collections.namedtuple("Pair", ["logits", "features"])


class TwoHeads(nn.Module):
    """A ReLU trunk with a linear head and a head that is not piecewise linear (``sin``), returned as ``kind``."""

    def __init__(self, kind: str = "tuple", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Linear(2, 12)
        self.head = nn.Linear(12, 3)
        self.other = nn.Linear(12, 5)
        self.kind = kind

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.trunk(x))
        logits, feats = self.head(h), torch.sin(self.other(h))
        if self.kind == "dict":
            return {"logits": logits, "features": feats}
        if self.kind == "namedtuple":
            return Pair(logits, feats)
        if self.kind == "list":
            return [feats, logits]
        return logits, feats


class Chosen(nn.Module):
    """The reference: the same trunk and head, returning the logits alone."""

    def __init__(self, net: TwoHeads) -> None:
        super().__init__()
        self.trunk, self.head = net.trunk, net.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.trunk(x)))


@pytest.mark.parametrize(
    "kind, output",
    [("tuple", 0), ("tuple", -2), ("dict", "logits"), ("namedtuple", "logits"), ("namedtuple", 0), ("list", 1)],
)
def test_chosen_output_is_partitioned_exactly(kind, output):
    net = TwoHeads(kind)
    part = compute_partition(net, BOX, output=output)
    ref = compute_partition(Chosen(net), BOX)
    assert part.output_dim == 3
    assert part.num_regions == ref.num_regions > 10
    assert torch.allclose(part.areas.sort().values, ref.areas.sort().values, rtol=0, atol=1e-12)
    m64 = oracles.f64_copy(Chosen(net))
    oracles.check_tiling(part, BOX)
    oracles.check_interior_forward(part, m64, BOX)
    oracles.check_vertex_forward(part, m64, BOX)


def test_other_outputs_are_not_computed():
    """The sin head is neither traced into the snapshot nor classified; choosing it names the sin."""
    prep = prepare_model(TwoHeads(), output=0)
    assert "other" not in dict(prep.graph_module.named_modules())
    assert "other.weight" not in prep.graph_module.state_dict()
    assert prep.output == 0
    with pytest.raises(UnsupportedModelError, match="function sin"):
        prepare_model(TwoHeads(), output=1)


@pytest.mark.parametrize(
    "kind, hint",
    [
        ("tuple", r"returns a tuple of 2 values; pass output= .*output=0"),
        ("dict", r"returns a dict with keys 'logits', 'features'; pass output= .*output='logits'"),
        ("namedtuple", r"returns a Pair with fields logits, features"),
    ],
)
def test_several_outputs_without_a_choice_are_refused_before_computing(kind, hint):
    with pytest.raises(UnsupportedModelError, match=hint):
        prepare_model(TwoHeads(kind))


def test_bad_choices_name_the_outputs():
    for bad in ("index", "_fields", "count"):  # a namedtuple's methods and attributes are not outputs
        with pytest.raises(OutputChoiceError, match=f"output='{bad}' is not one of the model's outputs"):
            prepare_model(TwoHeads("namedtuple"), output=bad)
    with pytest.raises(OutputChoiceError, match="an index or a key, got True"):
        prepare_model(TwoHeads(), output=True)
    with pytest.raises(ValueError, match=r"output=2 is not one of the model's outputs: it returns a tuple of 2"):
        compute_partition(TwoHeads(), BOX, output=2)
    with pytest.raises(ValueError, match=r"output='scores' .* dict with keys 'logits', 'features'"):
        compute_partition(TwoHeads("dict"), BOX, output="scores")
    with pytest.raises(ValueError, match="returns a single value"):
        compute_partition(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)), BOX, output=0)
    prep = prepare_model(TwoHeads(), output=0)
    assert compute_partition(prep, BOX, output=0).num_regions > 10  # the same choice is fine
    with pytest.raises(ValueError, match="differs from the output=0 the PreparedModel was made with"):
        compute_partition(prep, BOX, output=1)


class InPlaceUnused(nn.Module):
    """``h.relu_()`` whose result is not used: dropping it as dead code would make the chosen output affine."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.trunk = nn.Linear(2, 10)
        self.head = nn.Linear(10, 2)
        self.other = nn.Linear(10, 4)

    def forward(self, x):
        h = self.trunk(x)
        h.relu_()
        return self.head(h), self.other(h)


def test_in_place_change_of_a_kept_tensor_is_kept():
    net = InPlaceUnused()
    part = compute_partition(net, BOX, output=0)
    ref = compute_partition(nn.Sequential(net.trunk, nn.ReLU(), net.head), BOX)
    assert part.num_regions == ref.num_regions > 5
    m64 = oracles.f64_copy(nn.Sequential(net.trunk, nn.ReLU(), net.head))
    oracles.check_interior_forward(part, m64, BOX)


def test_local_complexity_takes_the_choice():
    net = TwoHeads("dict")
    pts = torch.tensor([[0.1, 0.2], [-0.5, 0.3]])
    lc = local_complexity(net, pts, 0.5, output="logits", generator=torch.Generator().manual_seed(0))
    ref = local_complexity(Chosen(net), pts, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lc.num_regions, ref.num_regions)


class TwoHeadsModule(MoonsModule):
    """MoonsModule whose forward also returns the hidden features (as research code often does)."""

    def forward(self, x):
        h = x
        for i in range(len(self.net) - 1):
            h = self.net[i](h)
        return self.net[-1](h), h

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits, _ = self(x)
        return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(1), y)


def test_callback_partitions_the_chosen_output(tmp_path):
    model = TwoHeadsModule()
    square = Slice.from_vertices(SQUARE, name="square")
    cb = SplineCamCallback(
        [square], every_n_train_steps=4, dirpath=tmp_path / "sc", frame_size=64, background=False, output=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=SplineCamWarning)  # any callback failure would warn
        make_trainer(max_steps=8, callbacks=[cb], logger=False).fit(model, moons_loader())
    assert [h["step"] for h in cb.history] == [0, 4, 8]
    assert all(h["slices"]["square"]["num_regions"] > 1 for h in cb.history)


def test_cli_output_flag(tmp_path, capsys):
    net = TwoHeads("dict")
    path = tmp_path / "net.pt"
    torch.save(net, path)
    js = tmp_path / "p.json"
    args = ["partition", str(path), "--box", "-2,2,-1.5,1.5", "--out-png", str(tmp_path / "p.png"), "--size", "64"]
    assert main([*args, "--out-json", str(js), "--output", "logits"]) == 0
    info = json.loads(js.read_text())
    assert info["output"] == "logits"
    assert info["num_regions"] == compute_partition(Chosen(net), BOX).num_regions
    capsys.readouterr()
    assert main(args) != 0
    assert "pass --output to choose" in capsys.readouterr().err


class ViewChangedByOtherOutput(nn.Module):
    """The dropped output changes a view of the kept tensor in place, before the kept head reads it."""

    def __init__(self, after: bool = False) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.trunk, self.head, self.after = nn.Linear(2, 8), nn.Linear(8, 3), after

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        if self.after:  # the change comes after the kept head: it cannot change the chosen output
            logits = self.head(h)
            h.tanh_()
            return logits, h
        v = h[:, :6]
        v.mul_(2.0)
        return self.head(h), v


def test_in_place_changes_by_dropped_outputs():
    # Before the kept head: refused as for the whole model (the change reaches the head through the view).
    with pytest.raises(UnsupportedModelError, match="shares memory with another one used after it"):
        prepare_model(ViewChangedByOtherOutput(), output=0)
    # After it: dropped with its output, so its op (tanh, not piecewise linear) need not be supported.
    net = ViewChangedByOtherOutput(after=True)
    part = compute_partition(net, BOX, output=0)
    ref = compute_partition(nn.Sequential(net.trunk, nn.ReLU(), net.head), BOX)
    assert part.num_regions == ref.num_regions > 5


class SplitOutput(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.trunk, self.head, self.how = nn.Linear(2, 10), nn.Linear(10, 6), how
        self.w = nn.Parameter(torch.randn(10, 4))  # used only by the "param" output, through get_attr

    def forward(self, x):
        y = self.head(torch.relu(self.trunk(x)))
        if self.how == "split":
            return torch.split(y, 2, 1)
        if self.how == "chunk":
            return y.chunk(3, 1)
        return y, torch.relu(self.trunk(x)) @ self.w


@pytest.mark.parametrize("how", ["split", "chunk"])
def test_a_tuple_made_by_a_call_is_indexed(how):
    net = SplitOutput(how)
    full = compute_partition(nn.Sequential(net.trunk, nn.ReLU(), net.head), BOX)
    part = compute_partition(net, BOX, output=1)
    assert part.output_dim == 2 and part.num_regions == full.num_regions
    assert torch.allclose(part.jacobians, full.jacobians[:, 2:4], atol=1e-12)


def test_weights_of_dropped_outputs_leave_the_snapshot():
    prep = prepare_model(SplitOutput("param"), output=0)
    assert "w" not in prep.graph_module.state_dict()
    assert "w" in prepare_model(SplitOutput("param"), output=1).graph_module.state_dict()


def test_callback_refuses_a_bad_choice_at_fit_start(tmp_path):
    cb = SplineCamCallback(
        [Slice.from_vertices(SQUARE, name="square")],
        every_n_train_steps=4,
        dirpath=tmp_path,
        background=False,
        output=5,
    )
    with pytest.raises(OutputChoiceError, match="output=5 is not one of the model's outputs") as ei:
        make_trainer(max_steps=2, callbacks=[cb], logger=False).fit(TwoHeadsModule(), moons_loader())
    assert "module=" not in str(ei.value)  # the hint for a whole LightningModule is not about this
    with pytest.raises(ValueError, match="an index or a key"):
        SplineCamCallback(output=True)


def test_replay_of_checkpoints_takes_the_saved_choice(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from splinecam_lightning.replay import read_stats_csv, replay_checkpoints

    square = Slice.from_vertices(SQUARE, name="square")
    cb = SplineCamCallback(
        [square], every_n_train_steps=4, dirpath=tmp_path / "sc", frame_size=64, background=False, output=0
    )
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer = make_trainer(max_steps=8, callbacks=[cb, mc], logger=False, enable_checkpointing=True)
    trainer.fit(TwoHeadsModule(), moons_loader())
    ckpt = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), weights_only=False)
    saved = next(v for k, v in ckpt["callbacks"].items() if "SplineCam" in k)
    assert saved["output"] == 0 and saved["module"] is None

    # Neither --output nor the slices are repeated: both come from the callback state in the checkpoints.
    res = replay_checkpoints(tmp_path / "ckpt", f"{__name__}:TwoHeadsModule", tmp_path / "replayed")
    assert res["steps"] == [4, 8] and not res["errors"]
    regions = {
        r["step"]: r["slices"]["square"]["num_regions"] for r in read_stats_csv(tmp_path / "replayed" / "stats.csv")
    }
    assert regions == {h["step"]: h["slices"]["square"]["num_regions"] for h in cb.history if h["step"] in (4, 8)}
