"""Append-only JSONL logs (eval predictions, training metrics) that survive a process killed mid-line.

A kill can leave the last line without its newline. Appending after it would glue the next record onto the
fragment and lose both; ``open_append`` first cuts such a torn tail (whose record is incomplete anyway).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

_BLOCK = 1 << 16


def drop_torn_tail(path: str | Path) -> int:
    """Cut a last line that lacks its newline; return how many bytes were removed (0 for a clean file)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with path.open("rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        keep, end = 0, size
        while end > 0:  # the last newline, read backwards block by block
            start = max(0, end - _BLOCK)
            fh.seek(start)
            newline = fh.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return size - keep


def open_append(path: str | Path) -> TextIO:
    """``path`` opened for appending UTF-8 lines, after cutting a torn last line left by a killed writer."""
    drop_torn_tail(path)
    return Path(path).open("a", encoding="utf-8")
