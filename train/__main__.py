"""``torchrun … -m train CONFIG [key=value …]``: the same run as ``keye train`` (pretraining, SFT or GSPO RL, chosen
by the config as there), on every process."""

from __future__ import annotations

import sys

from train.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
