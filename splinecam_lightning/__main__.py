"""``python -m splinecam_lightning``: the same as the ``splinecam-lightning`` command."""

import sys

from splinecam_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main())
