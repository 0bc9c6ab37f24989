"""JIT-built C++ ops without stale-lock hangs.

On CPU, DeepSpeed JIT-builds its shared-memory allreduce (``deepspeed_shm_comm``) through torch's
``cpp_extension.load`` the first time a process group starts (on GPUs other ops may be built the same way). Before
torch 2.14, ``load`` guarded each build directory with a ``lock`` file whose mere existence makes every other
process wait, without limit: a process killed mid-build (SIGKILL, OOM, Slurm, a test timeout) never removes it and
every later run on that machine hangs silently. torch 2.14 holds an OS lock instead, which the kernel releases.

``build_lock_guard`` wraps the code that may build (``train.engine.init_distributed``). Every Keye process holds a
shared ``flock`` on ``<extensions root>/.keye-build-guard`` while it may be building; a process that can take it
exclusively knows no Keye process is building, so an existing ``lock`` that no live process holds with an OS lock
either was left by a killed build: it is removed with the half-built outputs beside it (one warning line naming
it), and the op is rebuilt. A non-Keye process building in the same directory at that moment is not seen; give
such jobs their own ``TORCH_EXTENSIONS_DIR``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from keye.compat import torch_build_lock_is_file

log = logging.getLogger(__name__)

GUARD_NAME = ".keye-build-guard"


def extensions_root() -> Path:
    """Where torch builds JIT extensions: ``TORCH_EXTENSIONS_DIR``, else torch's default cache folder."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _held_by_live_process(lock: Path) -> bool:
    """True when some process holds an OS lock on ``lock`` (torch ≥ 2.14 builds under one)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return True  # gone already: its owner finished
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def remove_stale_build_locks(root: Path) -> list[Path]:
    """Delete the build directories of ``root`` whose ``lock`` a killed build left; return the locks removed.

    Call only while holding the guard exclusively (no Keye process is building).
    """
    removed = []
    # TORCH_EXTENSIONS_DIR/<op>/lock, or <default root>/<pyXY_accel>/<op>/lock
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        if _held_by_live_process(lock):
            continue
        shutil.rmtree(lock.parent, ignore_errors=True)  # half-built objects would look up to date to ninja
        if lock.exists():
            lock.unlink()
        removed.append(lock)
    return removed


@contextlib.contextmanager
def build_lock_guard(root: Path | None = None) -> Iterator[list[Path]]:
    """Around code that may JIT-build torch extensions: first clear locks left by killed builds (see module doc).

    Yields the locks removed. With a torch whose builds hold OS locks (2.14+) nothing is removed: torch recovers
    from a killed build itself, and its leftover ``lock`` files are normal.
    """
    root = root or extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / GUARD_NAME, "a") as guard:
        removed: list[Path] = []
        if torch_build_lock_is_file():
            try:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another Keye process may be building right now: its lock is live
            else:
                removed = remove_stale_build_locks(root)
                for lock in removed:
                    log.warning("removed a torch extension build left unfinished by a killed run: %s", lock.parent)
        fcntl.flock(guard, fcntl.LOCK_SH)  # "this process may be building" until the block ends
        try:
            yield removed
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
