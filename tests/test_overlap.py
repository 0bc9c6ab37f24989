"""The two-thread read: errors cross threads, early stops stop the producer, torch thread settings stay local."""

from __future__ import annotations

import threading

import pytest
import torch

from data_pipelines.media import VideoOptions
from data_pipelines.overlap import read_ahead, run_single_threaded
from data_pipelines.video_reader import _FrameStore


def test_read_ahead_yields_in_order_and_reraises():
    assert list(read_ahead(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("bad packet")

    it = read_ahead(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad packet"):
        next(it)


def test_read_ahead_stops_and_closes_producer_when_consumer_stops():
    closed = threading.Event()
    produced = []

    def endless():
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            closed.set()

    it = read_ahead(endless(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # joins the producer thread
    assert closed.is_set()
    assert len(produced) <= 3 + 2 + 1  # never more than depth ahead (plus the item it was putting)


def test_run_single_threaded_keeps_caller_setting_and_reraises():
    before = torch.get_num_threads()
    assert run_single_threaded(torch.get_num_threads) == 1
    assert torch.get_num_threads() == before
    with pytest.raises(KeyError):
        run_single_threaded(dict().__getitem__, "x")


def _solid(value: int, h: int = 720, w: int = 1280) -> torch.Tensor:
    return torch.full((3, h, w), value, dtype=torch.uint8)


def test_frame_store_shrinks_across_chunks_and_keeps_order():
    """150 frames over 3 chunks; the bound halves as frames turn slow; each frame keeps its own colour."""
    n = 150
    options = VideoOptions(video_total_pixels=20000 * 784, full_size_limit_mb=0)  # always bounded
    store = _FrameStore(n, options)
    held = []
    for i in range(n):
        store.add(_solid(i), num_slow=1 + i)  # as if every frame were slow
        held.append(store.hw)
    assert held[0][0] * held[0][1] >= 2 * held[-1][0] * held[-1][1]  # it did shrink
    assert all(c.shape[-2:] == store.hw for c in store.chunks)
    frames = store.finish((112, 196))
    assert frames.shape == (n, 3, 112, 196)
    assert [int(f[0, 0, 0]) for f in frames] == list(range(n))


def test_frame_store_single_chunk_at_final_size_is_not_copied():
    store = _FrameStore(10, VideoOptions())
    for i in range(10):
        store.add(_solid(i, 224, 224), num_slow=1)
    chunk = store.chunks[0]
    frames = store.finish((224, 224))
    assert frames.data_ptr() == chunk.data_ptr()
    with pytest.raises(ValueError, match="more than"):
        full = _FrameStore(1, VideoOptions())
        full.add(_solid(0, 56, 56), 1)
        full.add(_solid(1, 56, 56), 1)
