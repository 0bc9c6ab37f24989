"""Parallel video reads: H.264 packets nothing references are left out, IDR-started parts decode in parallel, and
every pixel still equals a sequential decode (decord's, the original reader's)."""

from __future__ import annotations

import threading
import time
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from data_pipelines import synthetic
from data_pipelines.h264_nal import is_droppable, is_idr, nal_length_size
from data_pipelines.media import VideoOptions
from data_pipelines.overlap import ordered_parallel
from data_pipelines.video_reader import (
    _av_probe,
    decode_frames,
    decode_parts,
    decoder_threads,
    load_video,
    open_video,
)

decord = pytest.importorskip("decord")


def _nal(header: int, payload: bytes = b"\x88\x84") -> bytes:
    return bytes([header]) + payload


def _avcc(*nals: bytes, size: int = 4) -> bytes:
    return b"".join(len(n).to_bytes(size, "big") + n for n in nals)


def test_droppable_only_for_non_reference_slices():
    nonref_slice, ref_slice, idr = _nal(0x01), _nal(0x21), _nal(0x65)
    aud, sei, sps = _nal(0x09, b"\x10"), _nal(0x06), _nal(0x67)
    assert is_droppable(_avcc(nonref_slice), 4)
    assert is_droppable(_avcc(aud, nonref_slice, nonref_slice), 4)  # delimiter + two slices of one picture
    assert is_droppable(_avcc(nonref_slice, size=2), 2)
    assert is_droppable(b"\x00\x00\x00\x01" + aud + b"\x00\x00\x01" + nonref_slice, None)  # Annex B
    assert not is_droppable(_avcc(ref_slice), 4)
    assert not is_droppable(_avcc(idr), 4)
    assert not is_droppable(_avcc(sei, nonref_slice), 4)  # SEI may persist past its picture: keep
    assert not is_droppable(_avcc(sps, nonref_slice), 4)
    assert not is_droppable(_avcc(aud), 4)  # no slice at all
    assert not is_droppable(_avcc(nonref_slice)[:-1], 4)  # truncated: unparsable is kept
    assert not is_droppable(_avcc(_nal(0x81)), 4)  # forbidden bit set
    assert is_idr(_avcc(sei, idr), 4) and not is_idr(_avcc(ref_slice), 4)
    assert nal_length_size(b"\x01\x64\x00\x1f\xff\xe1") == 4
    assert nal_length_size(b"\x01\x64\x00\x1f\xfd\xe1") == 2
    assert nal_length_size(b"\x00\x00\x00\x01\x67") is None and nal_length_size(None) is None


def _encode(path, options: dict[str, str], num_frames: int = 90, fps: int = 15, size=(96, 128)) -> str:
    """Moving shapes through libx264 with explicit options (B-pyramid, GOP length, open GOPs)."""
    h, w = size
    gen = np.random.default_rng(0)
    base = gen.integers(0, 255, (h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = options
        for i in range(num_frames):
            arr = np.roll(base, (i * 3, i * 2), axis=(0, 1))
            arr[(i * 5) % h : (i * 5) % h + 16, :] = (i * 37) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("parts")
    return {
        # closed GOPs of 12 frames, B-pyramid (reference B-frames) and non-reference b-frames
        "pyramid": _encode(d / "pyramid.mp4", {"preset": "medium", "x264-params": "keyint=12:min-keyint=12:bframes=3"}),
        # open GOPs: the recovery-point I-frames are keyframes but not IDR; leading b-frames refer back
        "open_gop": _encode(
            d / "open.mp4", {"preset": "medium", "x264-params": "keyint=12:min-keyint=12:bframes=3:open-gop=1"}
        ),
        "one_gop": _encode(d / "one.mp4", {"preset": "veryfast", "x264-params": "keyint=300:bframes=2"}),
    }


def _decord(path: str, indices: list[int]) -> np.ndarray:
    return decord.VideoReader(path).get_batch(indices).asnumpy()


def test_probe_splits_only_at_idr_frames(clips):
    meta, pts, idr = _av_probe(clips["pyramid"], "pyramid")
    assert meta.num_frames == 90 and len(idr) == 90 // 12 + 1
    _, _, idr_open = _av_probe(clips["open_gop"], "open")
    with av.open(clips["open_gop"]) as c:
        keyframes = sum(p.is_keyframe for p in c.demux(video=0) if p.size)
    assert keyframes > 1 and len(idr_open) == 1  # open-GOP keyframes are not split points
    parts = decode_parts(list(range(0, 90, 7)), pts, idr)
    assert [start for start, _ in parts][0] is None and len(parts) == len({i // 12 for i in range(0, 90, 7)})
    positions = [pos for _, wanted in parts for pos in wanted.values()]
    assert positions == list(range(len(range(0, 90, 7))))


@pytest.mark.parametrize("name", ["pyramid", "open_gop", "one_gop"])
@pytest.mark.parametrize("step", [1, 4, 11])
def test_parallel_parts_equal_sequential_decode(clips, name, step):
    """Every sampled frame equals a sequential decode, whether all frames are wanted (nothing dropped) or few (most
    b-frames dropped, several parts).

    Open GOPs: decord's own sparse read (the original's) seeks to the recovery-point keyframes and decodes the
    frames after them differently (FFmpeg logs "mmco: unref short failure"); a sequential decode, and ours, do not
    seek there."""
    path = clips[name]
    indices = list(range(0, 90, step))
    expected = _decord(path, list(range(90)))[indices]  # decord reading every frame: one sequential decode
    if name != "open_gop":
        np.testing.assert_array_equal(_decord(path, indices), expected)
    for threads in (1, 2, 3):
        _, decode = open_video(path, VideoOptions(decode_threads=threads))
        got = dict(decode(indices))
        assert sorted(got) == list(range(len(indices)))
        np.testing.assert_array_equal(np.stack([got[k] for k in range(len(indices))]), expected, err_msg=f"{threads}")
    np.testing.assert_array_equal(decode_frames(path, indices[::-1]), expected[::-1])  # any order of indices


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_load_video_same_clip_for_any_thread_count(clips, threads):
    path = clips["pyramid"]
    ref = load_video(path, VideoOptions(backend="decord"))
    ours = load_video(path, VideoOptions(decode_threads=threads))
    assert (ours.frame_indices, ours.frame_types, ours.slow_hw, ours.fast_hw) == (
        ref.frame_indices,
        ref.frame_types,
        ref.slow_hw,
        ref.fast_hw,
    )
    assert torch.equal(ours.frames, ref.frames)


def test_scene_cut_clip_matches_decord_in_parallel(tmp_path):
    path = synthetic.scene_cuts(tmp_path / "c.mp4", every=12, num_frames=96, fps=12, preset="veryfast")
    clip = load_video(path, VideoOptions(decode_threads=2))
    np.testing.assert_array_equal(clip.frames.permute(0, 2, 3, 1).numpy(), _decord(path, clip.frame_indices))


def test_decoder_threads_default_follows_torch():
    assert decoder_threads(VideoOptions(decode_threads=3)) == 3
    seen = []

    def in_worker() -> None:  # a DataLoader worker runs torch on one thread
        torch.set_num_threads(1)
        seen.append(decoder_threads(VideoOptions()))

    t = threading.Thread(target=in_worker)
    t.start()
    t.join()
    assert seen == [1]
    assert decoder_threads(VideoOptions()) == min(2, torch.get_num_threads())
    with pytest.raises(ValueError, match="decode_threads"):
        decoder_threads(VideoOptions(decode_threads=0))


def _job(k: int, n: int = 5, delay: float = 0.0):
    def run():
        for i in range(n):
            if delay:
                time.sleep(delay * ((k + i) % 3))
            yield (k, i)

    return run


def test_ordered_parallel_keeps_job_order():
    jobs = [_job(k, delay=0.002) for k in range(7)]
    expected = [(k, i) for k in range(7) for i in range(5)]
    assert list(ordered_parallel(jobs, workers=3)) == expected
    assert list(ordered_parallel(jobs, workers=1)) == expected
    assert list(ordered_parallel([], workers=2)) == []


def test_ordered_parallel_reraises_in_order():
    def broken():
        yield ("bad", 0)
        raise ValueError("corrupt part")

    out = ordered_parallel([_job(0), broken, _job(2)], workers=2)
    assert [next(out) for _ in range(6)] == [(0, i) for i in range(5)] + [("bad", 0)]
    with pytest.raises(ValueError, match="corrupt part"):
        next(out)


def test_ordered_parallel_bounds_work_ahead_and_stops_on_close():
    started, closed = [], []

    def job(k: int):
        def run():
            started.append(k)
            try:
                for i in range(1000):
                    yield (k, i)
            finally:
                closed.append(k)

        return run

    out = ordered_parallel([job(k) for k in range(20)], workers=2, depth=4)
    assert next(out) == (0, 0)
    time.sleep(0.3)  # the workers run ahead as far as they may
    assert len(started) <= 3  # workers + 1 jobs started and not consumed
    out.close()
    assert sorted(closed) == sorted(started)  # every started job's iterator was closed (its container with it)


def test_ordered_parallel_finishes_in_order_and_idle_workers_help():
    finished_by: dict[tuple[int, int], str] = {}

    def finish(item):
        time.sleep(0.005)
        finished_by[item] = threading.current_thread().name
        return item[0] * 100 + item[1]

    jobs = [_job(0, n=30, delay=0.003), _job(1, n=1)]
    assert list(ordered_parallel(jobs, workers=2, finish=finish)) == [i for i in range(30)] + [100]
    # the worker that ran the short job had nothing left to start: it finished some of the long job's items
    assert len({name for (k, _), name in finished_by.items() if k == 0}) == 2


def test_ordered_parallel_reraises_finish_errors_in_order():
    def finish(item):
        if item == (1, 2):
            raise ValueError("bad frame")
        return item

    out = ordered_parallel([_job(0), _job(1), _job(2)], workers=2, finish=finish)
    assert [next(out) for _ in range(7)] == [(0, i) for i in range(5)] + [(1, 0), (1, 1)]
    with pytest.raises(ValueError, match="bad frame"):
        next(out)
