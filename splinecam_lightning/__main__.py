"""``python -m splinecam_lightning``: the same as the ``splinecam-lightning`` command."""

from splinecam_lightning.cli import run

if __name__ == "__main__":
    run()
