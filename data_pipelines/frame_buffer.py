"""Large uint8 frame buffers backed by transparent huge pages.

A clip's sampled frames at decoded size are hundreds of MB (88 frames of 720p: 243 MB) written once, in a fresh
allocation per clip. With 4 KiB pages the kernel's first-touch faults cost more than the copy itself (measured on
the 2-core VM: 0.10–0.14 s to first-touch 243 MB, 0.013 s with huge pages). Linux's default THP mode is
``madvise``: an anonymous mapping asked for huge pages gets them; elsewhere this is a plain allocation.
"""

from __future__ import annotations

import contextlib
import math
import mmap

import torch

_HUGE_PAGE = 2 * 2**20
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)


def empty_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor of ``shape``; from a huge-page mapping when it is at least one huge page and
    the platform supports the advice (the tensor keeps the mapping alive), else ``torch.empty``."""
    nbytes = math.prod(shape)
    if _ADVICE is None or nbytes < _HUGE_PAGE:
        return torch.empty(shape, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # kernels without THP refuse the advice: ordinary pages, same memory
        region.madvise(_ADVICE)
    return torch.frombuffer(region, dtype=torch.uint8).view(shape)
