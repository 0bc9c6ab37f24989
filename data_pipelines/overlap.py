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


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put ``item`` on ``q``, waiting while it is full; False (not put) once ``stop`` is set."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def read_ahead(items: Iterator[T], depth: int = 4) -> Iterator[T]:
    """Iterate ``items`` on a background thread, up to ``depth`` items ahead of the consumer.

    An exception raised by ``items`` re-raises in the consumer; a consumer that stops early (error, ``close()``)
    stops the producer, which then closes ``items`` (and with it the video container).
    """
    out: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: object) -> bool:
        return _put(out, item, stop)

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


class _Offloaded:
    """An item handed to an idle worker to finish; the consumer waits for it in its place."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: object = None
        self.error: BaseException | None = None

    def result(self) -> object:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


def ordered_parallel(
    jobs: Sequence[Callable[[], Iterator[T]]],
    workers: int,
    depth: int = 16,
    finish: Callable[[T], R] | None = None,
) -> Iterator[T] | Iterator[R]:
    """``finish(item)`` for the items of ``jobs[0]()``, then of ``jobs[1]()``, …, with up to ``workers`` jobs
    running at once on worker threads (one torch intra-op thread each).

    A job's thread finishes its own items, except while another worker is idle (no job left to start): then it
    hands them over, so the last, longest job is not alone at the end. Memory stays bounded: jobs start in order,
    at most ``workers + 1`` are started and not yet consumed, each holds at most ``depth`` items, and items are
    handed over only to waiting workers. An exception in a job or in ``finish`` re-raises in the consumer once
    its place is reached; a consumer that stops early stops the workers, which close their job iterators.
    """
    if not jobs:
        return
    finish_item: Callable = finish if finish is not None else (lambda item: item)
    if workers <= 1:
        yield from read_ahead((finish_item(item) for job in jobs for item in job()), depth)
        return
    outputs = [queue.Queue(maxsize=max(1, depth)) for _ in jobs]
    offload: queue.Queue = queue.Queue()
    stop = threading.Event()
    window = threading.Semaphore(workers + 1)
    claim = itertools.count()
    lock = threading.Lock()
    state = {"idle": 0, "unfinished": len(jobs)}

    def put(q: queue.Queue, item: object) -> bool:
        return _put(q, item, stop)

    def run_job(j: int) -> None:
        items = None
        try:
            items = jobs[j]()
            for item in items:
                if finish is not None and state["idle"] > 0:
                    slot = _Offloaded()
                    offload.put((slot, item))
                    entry: object = slot
                else:
                    entry = (finish_item(item),)
                if not put(outputs[j], entry):
                    return
            put(outputs[j], _DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it in order
            put(outputs[j], exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
            with lock:
                state["unfinished"] -= 1

    def help_others() -> None:
        while not stop.is_set():
            with lock:
                if state["unfinished"] == 0 and offload.empty():
                    return
                state["idle"] += 1
            try:
                slot, item = offload.get(timeout=0.05)
            except queue.Empty:
                continue
            finally:
                with lock:
                    state["idle"] -= 1
            try:
                slot.value = finish_item(item)
            except BaseException as exc:
                slot.error = exc
            slot.done.set()

    def work() -> None:
        torch.set_num_threads(1)
        while not stop.is_set():
            if not window.acquire(timeout=0.1):
                continue
            with lock:
                j = next(claim)
            if j >= len(jobs):
                window.release()
                help_others()
                return
            run_job(j)

    threads = [threading.Thread(target=work, name=f"keye-decode-{k}", daemon=True) for k in range(workers)]
    for thread in threads:
        thread.start()
    try:
        for out in outputs:
            while True:
                entry = out.get()
                if entry is _DONE:
                    break
                if isinstance(entry, BaseException):
                    raise entry
                yield entry.result() if isinstance(entry, _Offloaded) else entry[0]
            window.release()
    finally:
        stop.set()
        for slot, _ in _drain(offload):
            slot.done.set()
        for thread in threads:
            thread.join()


def _drain(q: queue.Queue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
