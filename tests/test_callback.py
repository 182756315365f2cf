"""SplineCamCallback with a real Trainer on the CPU: schedule, files, videos, resume, identity, failures."""

from __future__ import annotations

import hashlib
import re
import warnings

import pytest
import torch
from callback_utils import SQUARE, MoonsModule, frame_steps, make_trainer, moons_loader, video_frames
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from splinecam_lightning.callback import SplineCamCallback, SplineCamWarning
from splinecam_lightning.engine import TooManyRegionsError, UnsupportedModelError
from splinecam_lightning.slices import Slice

# Names of the slices chosen from two-class data: two planes, then a local square.
NAME_PATTERNS = (r"plane_c[01]-c[01]-c[01]_0", r"plane_c[01]-c[01]-c[01]_1", r"local_c[01]_0")


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cb(tmp_path, **kw):
    kw.setdefault("frame_size", 64)
    kw.setdefault("dirpath", tmp_path / "splinecam")
    kw.setdefault("max_overhead", None)  # these runs are too short for the worker to keep up within a budget
    return SplineCamCallback(**kw)


# Where the worker process is not what a test is about, the snapshots run inline: it saves a worker start
# (a fresh interpreter importing torch) per fit. The worker's own path is covered by the other fits here and by
# test_callback_worker.py.
INLINE = {"background": False}


# ---------------------------------------------------------------- arguments
def test_schedule_arguments_are_mutually_exclusive():
    with pytest.raises(ValueError, match="at most one"):
        SplineCamCallback(every_n_train_steps=5, every_n_epochs=1)
    with pytest.raises(ValueError, match="at most one"):
        SplineCamCallback(every_n_epochs=1, train_time_interval=10.0)
    with pytest.raises(ValueError):
        SplineCamCallback(every_n_train_steps=0)
    with pytest.raises(ValueError):
        SplineCamCallback(on_error="ignore")
    with pytest.raises(ValueError, match="multiple of 16"):
        SplineCamCallback(frame_size=100)
    assert SplineCamCallback().every_n_train_steps == 100  # documented default


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"max_regions": 0}, "max_regions"),
        ({"local_radius": -0.1}, "local_radius"),
        ({"slice_margin": -1.0}, "slice_margin"),
        ({"pool_size": 0}, "pool_size"),
        ({"slices": [Slice.from_vertices(SQUARE)], "input_shape": (3,)}, r"input_shape=\(3,\) has 3 values.*2 dim"),
    ],
)
def test_bad_arguments_fail_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        SplineCamCallback(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_fails_at_construction():
    with pytest.raises(ValueError, match="CUDA is not available"):
        SplineCamCallback(compute_device="cuda")


def test_a_slice_of_the_wrong_dimension_warns_once_and_training_goes_on(tmp_path):
    cube = Slice.through_points(torch.zeros(3), torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]))
    cb = _cb(tmp_path, slices=[cube], every_n_train_steps=1, **INLINE)
    trainer = make_trainer(max_steps=3, logger=False, callbacks=[cb])
    with pytest.warns(SplineCamWarning) as caught:
        trainer.fit(MoonsModule(), moons_loader())
    ours = [str(w.message) for w in caught if w.category is SplineCamWarning]
    assert len(ours) == 1 and "per-sample shape (3,)" in ours[0] and "While executing" not in ours[0], ours
    assert trainer.global_step == 3 and cb.snapshot_steps == []


def test_given_slices_get_unique_safe_names():
    s = Slice.from_vertices(SQUARE, name="my slice")
    cb = SplineCamCallback(slices=[s, s, Slice.from_vertices(SQUARE, name="../x")])
    assert [t.name for t in cb.slices] == ["my_slice", "my_slice_1", "x"]
    assert s.name == "my slice"  # the user's object is not renamed


# ---------------------------------------------------------------- schedule
def test_schedule_steps_with_gradient_accumulation(tmp_path):
    cb = _cb(tmp_path, slices=[Slice.from_vertices(SQUARE)], every_n_train_steps=3, write_frames=False, **INLINE)
    trainer = make_trainer(max_steps=10, accumulate_grad_batches=2, logger=False, callbacks=[cb])
    trainer.fit(MoonsModule(), moons_loader())
    assert trainer.global_step == 10
    assert cb.snapshot_steps == [0, 3, 6, 9, 10]


def test_schedule_every_n_epochs(tmp_path):
    cb = _cb(tmp_path, slices=[Slice.from_vertices(SQUARE)], every_n_epochs=2, write_frames=False, **INLINE)
    trainer = make_trainer(max_epochs=5, logger=False, callbacks=[cb])
    trainer.fit(MoonsModule(), moons_loader(n=64, batch_size=16))  # 4 steps per epoch
    assert cb.snapshot_steps == [0, 8, 16, 20]


def test_schedule_train_time_interval(tmp_path):
    cb = _cb(tmp_path, slices=[Slice.from_vertices(SQUARE)], train_time_interval=1e-9, write_frames=False, **INLINE)
    trainer = make_trainer(max_steps=4, logger=False, callbacks=[cb])
    trainer.fit(MoonsModule(), moons_loader())
    assert cb.snapshot_steps == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- slices
def test_slices_are_chosen_with_private_generator(tmp_path):
    """Same seed -> same slices; the choice consumes no global RNG."""

    def run(seed):
        cb = _cb(
            tmp_path / str(seed), seed=seed, write_frames=False, make_videos=False, every_n_train_steps=50, **INLINE
        )
        make_trainer(max_steps=1, logger=False, callbacks=[cb]).fit(MoonsModule(), moons_loader())
        return [s.state_dict() for s in cb.slices]

    a, b, c = run(0), run(0), run(1)
    for sa, sb in zip(a, b, strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in ("origin", "basis", "domain", "anchors"))
    assert not torch.equal(a[0]["origin"], c[0]["origin"])


# ---------------------------------------------------------------- identity
def _train(seed, callbacks, tmp_path):
    import lightning.pytorch as L

    L.seed_everything(seed, workers=True)
    model = MoonsModule(extras=True)  # BatchNorm + Dropout: eval semantics and RNG would show
    trainer = make_trainer(max_steps=10, logger=False, callbacks=callbacks, deterministic=True)
    trainer.fit(model, moons_loader())
    return model, torch.get_rng_state()


def test_training_is_bitwise_identical_and_files_are_written(tmp_path):
    """The default path end to end, no logger: slices from data, the worker process, frames, videos, stats; and
    training with the callback is bitwise identical to training without it."""
    ref, rng_ref = _train(7, [], tmp_path)
    cb = _cb(tmp_path, every_n_train_steps=4, num_slices=2, num_local_slices=1, module="net")
    got, rng_got = _train(7, [cb], tmp_path)
    expected = [0, 4, 8, 10]
    assert cb.snapshot_steps == expected
    sd_ref, sd_got = ref.state_dict(), got.state_dict()
    assert sd_ref.keys() == sd_got.keys()
    for k in sd_ref:
        assert torch.equal(sd_ref[k], sd_got[k]), k
    assert torch.equal(rng_ref, rng_got)
    assert got.training  # mode untouched
    assert all(p.dtype == torch.float32 for p in got.parameters())

    names = [s.name for s in cb.slices]
    # Two planes through samples of both moons, one square around a sample: named by the anchors' classes.
    assert [re.fullmatch(p, n) is not None for p, n in zip(NAME_PATTERNS, names, strict=True)] == [True] * 3, names
    out = tmp_path / "splinecam"
    for name in names:
        assert frame_steps(out / name) == expected
        assert video_frames(out / f"{name}.mp4") == len(expected)
    assert (out / "stats.png").stat().st_size > 0
    lines = (out / "stats.csv").read_text().splitlines()
    assert lines[0].startswith("step,epoch,slice,num_regions")
    assert len(lines) == 1 + len(expected) * len(names)
    # slices through three samples of both classes: anchors are the chosen points
    for s in cb.slices[:2]:
        assert s.anchors.shape == (3, 2)
    # stats are sane
    for rec in cb.history:
        for stats in rec["slices"].values():
            assert stats["num_regions"] >= 1


class _Stream(torch.utils.data.IterableDataset):
    """Moons as a stream whose position lives in the dataset: whoever reads it advances it for training."""

    def __init__(self) -> None:
        from callback_utils import moons

        self.x, self.y = moons(128)
        self.pos = 0

    def __iter__(self):
        while True:
            i = self.pos % len(self.x)
            self.pos += 1
            yield self.x[i], self.y[i]


@pytest.mark.parametrize("given", [True, False])
def test_an_iterable_loader_is_read_only_by_training(tmp_path, given):
    """Slices (or only the input shape) come from the first batch training draws, not from reading the stream."""

    def fit(callbacks):
        torch.manual_seed(3)
        model = MoonsModule()
        loader = torch.utils.data.DataLoader(_Stream(), batch_size=16)
        make_trainer(max_steps=6, logger=False, callbacks=callbacks).fit(model, loader)
        return model

    ref = fit([])
    slices = [Slice.from_vertices(SQUARE, name="sq")] if given else None
    cb = _cb(tmp_path, slices=slices, every_n_train_steps=3, num_slices=1, num_local_slices=1, **INLINE)
    got = fit([cb])
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k
    assert cb.snapshot_steps == [0, 3, 6]
    assert len(cb.slices) == (1 if given else 2)


def test_background_and_inline_drawing_agree(tmp_path):
    """Frames drawn on the worker are the frames of their own step: identical to frames drawn inline."""
    import lightning.pytorch as L

    def run(background):
        L.seed_everything(3)
        cb = _cb(tmp_path / str(background), every_n_train_steps=3, background=background)
        make_trainer(max_steps=7, logger=False, callbacks=[cb]).fit(MoonsModule(lr=0.05), moons_loader())
        return cb

    bg, inline = run(True), run(False)
    assert bg.snapshot_steps == inline.snapshot_steps == [0, 3, 6, 7]
    for a, b in zip(bg.history, inline.history, strict=True):
        for name in a["slices"]:
            sa = {k: v for k, v in a["slices"][name].items() if k != "seconds"}
            sb = {k: v for k, v in b["slices"][name].items() if k != "seconds"}
            assert sa == sb
    names = [s.name for s in bg.slices]
    assert names == [s.name for s in inline.slices]
    assert len({h["slices"][names[0]]["num_regions"] for h in bg.history}) > 1  # the partition did move
    for name in names:
        for step in bg.snapshot_steps:
            f = f"{name}/{step:08d}.png"
            assert _digest(tmp_path / "True" / "splinecam" / f) == _digest(tmp_path / "False" / "splinecam" / f)


# ---------------------------------------------------------------- resume
def test_resume_keeps_slices_and_continues_frames(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    out = tmp_path / "splinecam"
    cb_a = _cb(tmp_path, every_n_train_steps=5, num_slices=1, num_local_slices=1, seed=0)
    mc = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=10, save_top_k=-1)
    trainer = make_trainer(max_steps=20, logger=False, callbacks=[cb_a, mc], enable_checkpointing=True)
    trainer.fit(MoonsModule(), moons_loader())
    assert cb_a.snapshot_steps == [0, 5, 10, 15, 20]
    names = [s.name for s in cb_a.slices]
    early = {n: {s: _digest(out / n / f"{s:08d}.png") for s in (0, 5, 10)} for n in names}
    ckpt = next(p for p in ckpt_dir.iterdir() if "step=10" in p.name)

    # A different seed would choose different slices: the restored ones must win.
    cb_b = _cb(tmp_path, every_n_train_steps=5, num_slices=1, num_local_slices=1, seed=123)
    trainer = make_trainer(max_steps=30, logger=False, callbacks=[cb_b])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(MoonsModule(), moons_loader(), ckpt_path=ckpt)
    assert any(issubclass(w.category, SplineCamWarning) and "superseded" in str(w.message) for w in rec)
    for sa, sb in zip(cb_a.slices, cb_b.slices, strict=True):
        assert sa.name == sb.name
        da, db = sa.state_dict(), sb.state_dict()
        assert all(torch.equal(da[k], db[k]) for k in ("origin", "basis", "domain", "anchors"))
    # the colour scale continues from the checkpoint's (it only ever widens)
    saved = next(v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if "SplineCam" in k)
    lo, hi = saved["color_range"]
    assert cb_b.color_range[0] <= lo and cb_b.color_range[1] >= hi
    expected = [0, 5, 10, 15, 20, 25, 30]
    assert cb_b.snapshot_steps == expected
    for n in names:
        assert frame_steps(out / n) == expected
        # frames from before the checkpoint are neither rewritten nor renumbered
        assert {s: _digest(out / n / f"{s:08d}.png") for s in (0, 5, 10)} == early[n]
        # the abandoned timeline's frames (15, 20 of run A) were set aside, not deleted
        superseded = list((out / n / "_superseded").rglob("*.png"))
        assert sorted(p.name for p in superseded) == ["00000015.png", "00000020.png"]
        assert video_frames(out / f"{n}.mp4") == len(expected)
    assert [h["step"] for h in cb_b.state_dict()["history"]] == expected


# ---------------------------------------------------------------- failures
def test_failed_snapshot_warns_and_training_continues(tmp_path):
    cb = _cb(tmp_path, slices=[Slice.from_vertices(SQUARE)], every_n_train_steps=4, max_regions=1)
    trainer = make_trainer(max_steps=8, logger=False, callbacks=[cb])
    with pytest.warns(SplineCamWarning, match="TooManyRegionsError"):
        trainer.fit(MoonsModule(), moons_loader())
    assert trainer.global_step == 8
    assert cb.snapshot_steps == []


def test_failed_snapshot_raises_with_on_error_raise(tmp_path):
    cb = _cb(tmp_path, slices=[Slice.from_vertices(SQUARE)], every_n_train_steps=4, max_regions=1, on_error="raise")
    trainer = make_trainer(max_steps=8, logger=False, callbacks=[cb])
    model = MoonsModule()
    with pytest.raises(TooManyRegionsError):
        trainer.fit(model, moons_loader())
    assert model.steps_run == 0  # the step-0 snapshot stopped training


@pytest.mark.parametrize("slices", [None, [Slice.from_vertices(SQUARE)]])
def test_unsupported_model_fails_at_fit_start(tmp_path, slices):
    cb = _cb(tmp_path, slices=slices, every_n_train_steps=2)  # on_error="warn" does not soften this
    trainer = make_trainer(max_steps=4, logger=False, callbacks=[cb])
    model = MoonsModule(act=nn.GELU)
    with pytest.raises(UnsupportedModelError, match="GELU"):
        trainer.fit(model, moons_loader())
    assert model.steps_run == 0
    assert trainer.global_step == 0


def test_unsupported_layer_is_named_by_its_path_in_the_lightning_module(tmp_path):
    cb = _cb(tmp_path, slices=[Slice.from_vertices(SQUARE)], module="net", every_n_train_steps=2)
    with pytest.raises(UnsupportedModelError, match="GELU at 'net.1'"):
        make_trainer(max_steps=2, logger=False, callbacks=[cb]).fit(MoonsModule(act=nn.GELU), moons_loader())


@pytest.mark.parametrize("background", [True, False])
def test_exception_in_training_still_leaves_videos(tmp_path, background):
    cb = _cb(tmp_path, slices=[Slice.from_vertices(SQUARE, name="sq")], every_n_train_steps=2, background=background)
    trainer = make_trainer(max_steps=20, logger=False, callbacks=[cb])
    with pytest.raises(RuntimeError, match="boom at step 7"):
        trainer.fit(MoonsModule(fail_at_step=7), moons_loader())
    out = tmp_path / "splinecam"
    assert frame_steps(out / "sq") == [0, 2, 4, 6]
    assert video_frames(out / "sq.mp4") == 4
    assert (out / "stats.png").exists()


def test_module_option_callable_and_bad_path(tmp_path):
    cb = _cb(tmp_path, slices=[Slice.from_vertices(SQUARE)], module=lambda m: m.net, write_frames=False, **INLINE)
    make_trainer(max_steps=2, logger=False, callbacks=[cb]).fit(MoonsModule(), moons_loader())
    assert cb.snapshot_steps == [0, 2]
    cb = _cb(tmp_path, slices=[Slice.from_vertices(SQUARE)], module="nope")
    with pytest.raises(AttributeError, match="nope"):
        make_trainer(max_steps=2, logger=False, callbacks=[cb]).fit(MoonsModule(), moons_loader())


def test_forgetting_module_gets_a_hint(tmp_path):
    import lightning.pytorch as L

    class Wrapped(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))

        def forward(self, batch):  # takes the whole batch, as many LightningModules do
            x, _ = batch
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self(batch).squeeze(1), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = _cb(tmp_path, slices=[Slice.from_vertices(SQUARE)], write_frames=False)
    with pytest.warns(SplineCamWarning, match="module='net'"):
        make_trainer(max_steps=2, logger=False, callbacks=[cb]).fit(Wrapped(), moons_loader())
