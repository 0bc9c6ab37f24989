"""``python -m eval …`` (and ``torchrun --nproc_per_node G -m eval …``): same as ``keye eval``."""

import sys

from eval.cli import main

sys.exit(main())
