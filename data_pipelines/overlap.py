"""Threads for one video read: independent parts decode in parallel, and the caller assembles in order.

A video splits at its keyframes into parts that decode independently (``ordered_parallel`` runs them on a few
worker threads and hands their results back in order); a part that cannot split still overlaps its decoding with
the tensor work (``read_ahead``). FFmpeg decoding and torch's resize/similarity kernels all release the GIL, so
plain threads overlap them. Every thread here runs torch with one intra-op thread: with torch's default (one
OpenMP thread per core) its threads spin against the decoders and a read gets ~1.6x slower (measured on 2
cores). The setting is per thread (OpenMP keeps it per thread), so callers keep theirs.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
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
        torch.set_num_threads(1)  # this thread's tensor work (e.g. decord frames' features) stays on one core
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


def ordered_parallel(jobs: Sequence[Callable[[], Iterator[T]]], workers: int, depth: int = 16) -> Iterator[T]:
    """The items of ``jobs[0]()``, then of ``jobs[1]()``, …, with up to ``workers`` jobs running at once on worker
    threads (one torch intra-op thread each).

    Memory stays bounded: jobs start in order, at most ``workers + 1`` are started and not yet consumed, and each
    holds at most ``depth`` finished items. An exception in a job re-raises in the consumer once its items are
    reached; a consumer that stops early stops the workers, which close their job iterators.
    """
    if not jobs:
        return
    if workers <= 1 or len(jobs) == 1:
        yield from read_ahead(itertools.chain.from_iterable(job() for job in jobs), depth)
        return
    outputs = [queue.Queue(maxsize=max(1, depth)) for _ in jobs]
    stop = threading.Event()
    window = threading.Semaphore(workers + 1)
    claim = itertools.count()
    claim_lock = threading.Lock()

    def put(q: queue.Queue, item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        torch.set_num_threads(1)
        while not stop.is_set():
            if not window.acquire(timeout=0.1):
                continue
            with claim_lock:
                j = next(claim)
            if j >= len(jobs):
                window.release()
                return
            items = None
            try:
                items = jobs[j]()
                for item in items:
                    if not put(outputs[j], (item,)):
                        return
            except BaseException as exc:  # handed to the consumer, which re-raises it in order
                put(outputs[j], exc)
                return
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
            put(outputs[j], _DONE)

    threads = [threading.Thread(target=work, name=f"keye-decode-{k}", daemon=True) for k in range(workers)]
    for thread in threads:
        thread.start()
    try:
        for out in outputs:
            while True:
                item = out.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item[0]
            window.release()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
