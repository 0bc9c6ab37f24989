"""Output that native libraries write straight to the process's stderr, kept off the console.

decord's C++ code logs a failed open as ``[14:46:11] /github/workspace/src/video/video_reader.cc:83: ERROR
opening: …`` (its build machine's source path) and its bundled FFmpeg adds ``[mov,mp4,… @ 0x…] moov atom not
found``: both go to file descriptor 2, past Python's ``logging`` and ``sys.stderr``, and arrive before our own
one-line error, which already says what failed. :func:`captured_native_stderr` around such a call keeps them
(``.text`` afterwards, e.g. for ``--debug``) instead.

The redirection is process-wide while the block runs: keep the block to the one native call (opening a reader),
not a whole decode that other threads' logging may overlap.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class CapturedStderr:
    text: str = ""  # what was written to file descriptor 2 inside the block (set when the block ends)


@contextlib.contextmanager
def captured_native_stderr() -> Iterator[CapturedStderr]:
    """Point file descriptor 2 at a temporary file inside the block; the yielded object's ``text`` holds what was
    written there once the block ends (normally or by an exception, which propagates unchanged)."""
    captured = CapturedStderr()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.text = tmp.read().decode("utf-8", errors="replace")
