"""Console noise from other libraries, kept out of the lines a user reads.

By default ``keye train`` (and ``python -m train`` / ``torchrun -m train`` on every rank, and the demo's steps)
shows its own lines plus third-party warnings and errors: the loggers below are set to WARNING, the Hugging Face
progress bars (``Loading weights``, ``Writing model shards``) are off, wandb is silent, and a few specific messages
that carry nothing a user can act on are dropped by their text (listed below, never a whole category).
``--verbose`` or ``KEYE_VERBOSE=1`` (inherited by torchrun's ranks and the demo's child processes) keeps everything.

Call :func:`quiet` first thing in a command, before torch, transformers or DeepSpeed are imported: the progress-bar
switch and the message filters must be in place when those libraries set themselves up.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator

VERBOSE_ENV = "KEYE_VERBOSE"

# Libraries whose INFO/DEBUG lines are theirs, not the run's.
THIRD_PARTY_LOGGERS = (
    "DeepSpeed",
    "deepspeed",
    "torch.distributed",
    "torch.utils.cpp_extension",
    "transformers",
    "huggingface_hub",
    "datasets",
    "urllib3",
    "wandb",
    "filelock",
)

# (logger, message pattern): warnings by level that say nothing actionable in a keye run.
DROPPED_LOG_MESSAGES = (
    # DeepSpeed's accelerator probe on a machine without a GPU (a CPU run is what keye train then does anyway).
    ("DeepSpeed", re.compile(r"Setting accelerator to CPU")),
    # torch.utils.cpp_extension, imported by DeepSpeed's op builders on a machine with a CUDA toolkit but no GPU.
    ("torch.utils.cpp_extension", re.compile(r"No CUDA runtime is found")),
)

# (category, message pattern): Python warnings with nothing to act on. DeepSpeed's ZeRO-3 still calls the
# collectives torch renamed (one FutureWarning per call site and process).
DROPPED_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
)


def is_verbose() -> bool:
    """``KEYE_VERBOSE`` set to anything but empty/0/false/no."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


class _DropMessages(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet(verbose: bool | None = None) -> bool:
    """Quiet third-party output in this process (and, through the environment, its children) unless ``verbose``
    (default: :func:`is_verbose`); ``verbose=True`` also sets ``KEYE_VERBOSE=1`` for child processes. Idempotent;
    returns whether the run is verbose."""
    verbose = is_verbose() if verbose is None else verbose
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return True
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by huggingface_hub and transformers at import
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, pattern in DROPPED_LOG_MESSAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_DropMessages(pattern))
    for category, message in DROPPED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    _quiet_loaded_libraries()
    return False


def _quiet_loaded_libraries() -> None:
    """Libraries already imported read their switches at import: set them directly."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


@contextlib.contextmanager
def quiet_stdout(verbose: bool | None = None) -> Iterator[None]:
    """Swallow what Python code prints to stdout inside the block unless verbose; for third-party calls that
    print() progress instead of logging it (DeepSpeed's "… op built successfully" when it loads a JIT-built op)."""
    if is_verbose() if verbose is None else verbose:
        yield
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())  # a failure shows what was printed on the way
        raise
