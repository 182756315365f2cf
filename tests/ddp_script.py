"""Run SplineCamCallback under DDP on 2 CPU processes (gloo). Used by tests/test_callback_ddp.py.

Usage: ``python tests/ddp_script.py OUT_DIR``. Lightning re-launches this script once per extra rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as L  # noqa: E402
from callback_utils import MoonsModule, moons_loader  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from splinecam_lightning.callback import SplineCamCallback  # noqa: E402


def main(out: Path) -> None:
    L.seed_everything(0)
    cb = SplineCamCallback(
        max_overhead=None,  # finish every snapshot before fit returns
        every_n_train_steps=3,
        dirpath=out / "splinecam",
        frame_size=64,
        num_slices=1,
        num_local_slices=1,
        module="net",
    )
    trainer = L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_steps=7,
        logger=CSVLogger(out / "logs", name="run", version=0),
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    model = MoonsModule()
    trainer.fit(model, moons_loader(n=128, batch_size=16))
    if trainer.global_rank == 0:  # for comparing with a one-process computation of the final snapshot
        import torch

        torch.save({"net": model.net.state_dict(), "slices": [s.state_dict() for s in cb.slices]}, out / "final.pt")
    # every rank chose the same slices from the (unsharded) dataset
    names = ",".join(s.name for s in cb.slices)
    print(f"RANK {trainer.global_rank} DONE steps={cb.snapshot_steps} slices={names}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
