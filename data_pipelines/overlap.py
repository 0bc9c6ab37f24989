"""Two threads per video read: one decodes, one does the tensor work, so a read uses both cores of a small box.

FFmpeg decoding and torch's resize/similarity kernels all release the GIL, so plain threads overlap them. The
tensor work runs with one intra-op thread: with torch's default (one OpenMP thread per core) its threads spin
against the decoder and a read gets ~1.6x slower (measured on 2 cores). The setting is per thread (OpenMP keeps
it per thread), so callers keep theirs. Data-loader workers already run torch single-threaded; in them the worker
thread costs only its start-up (~0.1 ms).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
_DONE = object()


def read_ahead(items: Iterator[T], depth: int = 4) -> Iterator[T]:
    """Iterate ``items`` on a background thread, up to ``depth`` items ahead of the consumer.

    An exception raised by ``items`` re-raises in the consumer; a consumer that stops early (error, ``close()``)
    stops the producer, which then closes ``items`` (and with it the video container).
    """
    out: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)
            return
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        put(_DONE)

    worker = threading.Thread(target=produce, name="keye-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


def run_single_threaded(fn: Callable[..., R], *args, **kwargs) -> R:
    """``fn(*args, **kwargs)`` on a fresh thread whose torch ops use one intra-op thread; returns or re-raises."""
    result: list = []
    error: list[BaseException] = []

    def target() -> None:
        torch.set_num_threads(1)  # OpenMP keeps this per thread: the caller's setting is untouched
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as exc:
            error.append(exc)

    worker = threading.Thread(target=target, name="keye-video-work", daemon=True)
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]
