"""load_video / load_image behaviour: sampling, windows, budget, frame storage, errors."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import synthetic
from data_pipelines.image_reader import load_image
from data_pipelines.media import FAST, SLOW, MediaError, VideoClip, VideoOptions, frame_timestamp, timestamp_text
from data_pipelines.resize import tokens_for
from data_pipelines.video_reader import clip_pixels, decode_frames, load_video, sample_indices


@pytest.fixture(scope="module")
def cuts(tmp_path_factory) -> str:
    # 12 s at 10 fps, a new scene every 2 s
    return synthetic.scene_cuts(tmp_path_factory.mktemp("v") / "cuts.mp4", every=20, num_frames=120, fps=10)


def test_sampling_counts_and_timestamps():
    opts = VideoOptions()
    assert sample_indices(300, 30.0, opts) == torch.linspace(0, 299, 20).round().long().tolist()
    assert len(sample_indices(100_000, 30.0, opts)) == 1365  # 65536*784 / (48*784)
    assert len(sample_indices(100_000, 30.0, VideoOptions(max_frames=50))) == 50
    assert len(sample_indices(300, 1.0, VideoOptions(fps=2.0))) == 300  # fps capped by the native rate
    with pytest.raises(MediaError) as err:
        sample_indices(7, 30.0, opts)  # 0.23 s < one 0.5 s interval
    assert err.value.reason == "too_short"


def test_clip_fields_and_types(cuts):
    clip = load_video(cuts)
    assert clip.num_frames == 24 and clip.frames.dtype == torch.uint8 and clip.frames.shape[1] == 3
    assert clip.native_fps == pytest.approx(10.0) and clip.duration == pytest.approx(12.0)
    assert clip.timestamps == [frame_timestamp(i, 10.0) for i in clip.frame_indices]
    assert clip.frame_types[0] == SLOW
    # every scene starts with a slow frame: samples land on frames 0, 20, 40, ... at most one sample late
    scene_of = [i // 20 for i in clip.frame_indices]
    firsts = [k for k in range(clip.num_frames) if k == 0 or scene_of[k] != scene_of[k - 1]]
    assert all(clip.frame_types[k] == SLOW for k in firsts)
    assert FAST in clip.frame_types
    assert all(v % 28 == 0 for v in (*clip.slow_hw, *clip.fast_hw))
    pixels = clip_pixels(clip)
    assert [tuple(p.shape[1:]) for p in pixels] == [clip.frame_hw(j) for j in range(clip.num_frames)]
    assert clip.visual_tokens() == sum(tokens_for(*p.shape[1:]) for p in pixels)


def test_window_keeps_absolute_timestamps(cuts):
    clip = load_video(cuts, VideoOptions(video_start=4.0, video_end=8.0))
    assert clip.frame_indices[0] == 40 and clip.frame_indices[-1] == 80
    assert all(4.0 <= t <= 8.0 for t in clip.timestamps)
    assert len(clip.frame_indices) == int(41 / 10 * 2)
    full = decode_frames(cuts, clip.frame_indices)
    np.testing.assert_array_equal(decode_frames(cuts, clip.frame_indices, backend="decord"), full)
    with pytest.raises(MediaError) as err:
        load_video(cuts, VideoOptions(video_start=20.0))
    assert err.value.reason == "too_short"


def test_slow_fast_off_splits_budget_evenly(cuts):
    clip = load_video(cuts, VideoOptions(slow_fast=False, video_total_pixels=24 * 100 * 784))
    assert clip.frame_types == [SLOW] * 24 and clip.fast_hw == clip.slow_hw
    assert tokens_for(*clip.slow_hw) <= 101
    assert clip.visual_tokens() <= 24 * 101


def test_budget_respected_and_memory_bounded(tmp_path):
    path = synthetic.static_video(tmp_path / "s.mp4", seconds=60, fps=2.5, height=720, width=1280)
    # 120 frames at 720x1280 are 316 MiB, over the limit: frames are held at the slow size instead
    clip = load_video(path, VideoOptions(video_total_pixels=6000 * 784, full_size_limit_mb=300))
    assert clip.num_frames == 120
    assert clip.visual_tokens() <= 6000 + tokens_for(*clip.slow_hw)  # the search may overshoot by < 1 slow step
    assert tuple(clip.frames.shape[-2:]) == clip.slow_hw
    assert clip.frames.numel() < 120 * 3 * 720 * 1280 / 3
    under = load_video(path, VideoOptions(video_total_pixels=6000 * 784, full_size_limit_mb=317))
    assert tuple(under.frames.shape[-2:]) == (720, 1280)
    assert (under.frame_types, under.slow_hw, under.fast_hw) == (clip.frame_types, clip.slow_hw, clip.fast_hw)
    assert [p.shape for p in clip_pixels(under)] == [p.shape for p in clip_pixels(clip)]


def test_short_clip_keeps_decoded_pixels(cuts):
    """Under the memory limit frames come back exactly as decoded (the original's output), in its channels-last
    layout, without a copy per chunk beyond the one store."""
    clip = load_video(cuts)
    decoded = torch.from_numpy(decode_frames(cuts, clip.frame_indices)).permute(0, 3, 1, 2)
    assert torch.equal(clip.frames, decoded)
    assert clip.frames.permute(0, 2, 3, 1).is_contiguous()
    assert [tuple(p.shape[-2:]) for p in clip_pixels(clip)] == [clip.frame_hw(j) for j in range(clip.num_frames)]


def _thread_ids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _new_native_threads(before: set[int]) -> int:
    """Threads started since ``before`` that Python did not start (FFmpeg's decoder threads). By thread id, not
    by count: a Python thread of an earlier test that is still exiting has left ``threading.enumerate()`` but not
    ``/proc`` yet, and would count as native."""
    return len(_thread_ids() - before - {t.native_id for t in threading.enumerate()})


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
@pytest.mark.parametrize("threads", [1, 2])
def test_decoder_starts_no_threads_unless_asked(cuts, threads, monkeypatch):
    """PyAV's default (automatic slice threads) burns a core for nothing on one-slice H.264; 1 means none.

    Threads are counted inside the decoding job, after its first frame, while its decoder is open: counted in the
    consumer instead, the read-ahead thread may already have finished its three frames and be exiting (gone from
    ``threading.enumerate()``, still in ``/proc``), and would count as an FFmpeg thread."""
    from data_pipelines import video_reader

    part = video_reader._av_part
    started: list[int] = []

    def counted_part(*args, **kwargs):
        frames = part(*args, **kwargs)
        yield next(frames)
        started.append(_new_native_threads(before))
        yield from frames

    monkeypatch.setattr(video_reader, "_av_part", counted_part)
    _, decode = video_reader.open_video(cuts, VideoOptions(decode_threads=threads))
    before = _thread_ids()
    assert len(list(decode([0, 1, 2]))) == 3
    assert len(started) == 1
    assert started[0] == 0 if threads == 1 else started[0] >= 1


def test_decord_backend_same_result(cuts):
    a, b = load_video(cuts), load_video(cuts, VideoOptions(backend="decord"))
    assert (a.frame_indices, a.frame_types, a.slow_hw, a.fast_hw) == (
        b.frame_indices,
        b.frame_types,
        b.slow_hw,
        b.fast_hw,
    )
    assert torch.equal(a.frames, b.frames)


def test_wrong_extension_is_read_by_content(cuts, tmp_path):
    other = tmp_path / "clip.avi"
    other.write_bytes(Path(cuts).read_bytes())
    assert load_video(str(other)).frame_types == load_video(cuts).frame_types


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda d: str(d / "nope.mp4"), "missing"),
        (lambda d: (d / "empty.mp4").write_bytes(b"") and str(d / "empty.mp4") or str(d / "empty.mp4"), "empty"),
        (lambda d: (d / "text.mp4").write_text("not a video at all " * 50) and str(d / "text.mp4"), "corrupt"),
    ],
)
def test_bad_inputs_raise_media_error(tmp_path, make, reason):
    with pytest.raises(MediaError) as err:
        load_video(make(tmp_path))
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError)


def test_truncated_and_too_short(tmp_path, cuts):
    data = Path(cuts).read_bytes()
    bad = tmp_path / "trunc.mp4"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError) as err:
        load_video(str(bad))
    assert err.value.reason == "corrupt"
    short = synthetic.moving_shapes(tmp_path / "short.mp4", seconds=0.4, fps=10)
    with pytest.raises(MediaError) as err:
        load_video(short)
    assert err.value.reason == "too_short"
    with pytest.raises(MediaError):
        load_video(b"")


@pytest.mark.parametrize("suffix, kind", [(".jpg", "JPEG"), (".png", "PNG")])
def test_a_picture_named_like_a_video_is_not_a_video(tmp_path, suffix, kind):
    """PyAV opens a JPEG/PNG as a one-frame "video" (jpeg_pipe/png_pipe, 25 fps): it is reported as an image
    (reason no_video), from a path, from bytes and on every backend, not as a 0.04 s video too short to sample."""
    picture = Path(synthetic.write_image(tmp_path / f"photo{suffix}"))
    renamed = tmp_path / "photo.mp4"
    renamed.write_bytes(picture.read_bytes())
    for source, backend in [(str(renamed), "auto"), (str(renamed), "pyav"), (str(renamed), "decord")]:
        with pytest.raises(MediaError) as err:
            load_video(source, VideoOptions(backend=backend))
        assert err.value.reason == "no_video", backend
        assert str(err.value) == f"{renamed}: is an image ({kind}), not a video"
    with pytest.raises(MediaError, match=rf"is an image \({kind}\), not a video") as err:
        load_video(renamed.read_bytes())
    assert err.value.reason == "no_video"


def test_one_frame_videos_and_animations_are_still_videos(tmp_path):
    """Only a single picture is refused: a one-frame mp4 is a (too short) video, an animated GIF is read."""
    one = synthetic.moving_shapes(tmp_path / "one.mp4", seconds=0.1, fps=10)
    with pytest.raises(MediaError) as err:
        load_video(one)
    assert err.value.reason == "too_short"
    frames = [Image.fromarray(np.full((48, 64, 3), 20 * i, np.uint8)) for i in range(10)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    clip = load_video(str(tmp_path / "anim.gif"))
    assert clip.native_fps == pytest.approx(10.0) and clip.num_frames == 2


def test_frame_list(tmp_path):
    paths = synthetic.write_frame_images(tmp_path, num_frames=8, every=4)
    clip = load_video(paths, VideoOptions(fps=1.0))
    assert clip.frame_indices == list(range(8)) and clip.timestamps == [float(i) for i in range(8)]
    assert clip.frame_types[0] == SLOW and clip.frame_types[4] == SLOW and clip.frame_types[1] == FAST
    with pytest.raises(MediaError) as err:
        load_video([*paths[:2], str(tmp_path / "gone.jpg")], VideoOptions(fps=1.0))
    assert err.value.reason == "missing"


def test_load_image(tmp_path):
    img = load_image(synthetic.write_image(tmp_path / "a.png", height=100, width=150))
    assert img.mode == "RGB" and img.size == (140, 112)  # smart_resize rounds to multiples of 28
    assert load_image(synthetic.write_image(tmp_path / "b.jpg"), resized_hw=(60, 90)).size == (84, 56)
    small = load_image(synthetic.write_image(tmp_path / "c.png", height=20, width=20), min_pixels=56 * 56)
    assert small.size == (56, 56)
    rgba = load_image(synthetic.write_image(tmp_path / "d.png", height=56, width=56, mode="RGBA"))
    assert np.asarray(rgba)[:, :20].min() == 255  # transparent half composited onto white
    assert load_image((tmp_path / "a.png").read_bytes()).size == (140, 112)
    assert load_image(Image.new("L", (28, 56))).mode == "RGB"


@pytest.mark.parametrize("reason", ["missing", "empty", "corrupt", "too_large"])
def test_load_image_errors(tmp_path, reason, monkeypatch):
    path = tmp_path / "x.png"
    if reason == "empty":
        path.write_bytes(b"")
    elif reason == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    elif reason == "too_large":
        synthetic.write_image(path, height=64, width=64)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(MediaError) as err:
        load_image(str(path))
    assert err.value.reason == reason


def test_timestamps_are_the_released_float32_values():
    """``(1 / fps) * i`` rounded to float32, printed with one decimal of that float32 (keye-vl-utils + the released
    processor); the old float64 ``i / fps`` printed 20 fps frame 81 as "4.0" where the release prints "4.1"."""
    assert frame_timestamp(81, 20.0) == float(np.float32((1 / 20.0) * 81)) == 4.050000190734863
    assert (f"{81 / 20.0:.1f}", timestamp_text(frame_timestamp(81, 20.0))) == ("4.0", "4.1")
    assert frame_timestamp(93, 60.0) == float(torch.FloatTensor([(1 / 60.0) * 93])[0])
    assert timestamp_text(frame_timestamp(93, 60.0)) == "1.5" != f"{93 / 60.0:.1f}"
    # a float64 value from an older record prints as the release prints it: the text casts to float32 first
    assert timestamp_text(81 / 20.0) == "4.1" and timestamp_text(3 / 20.0) == "0.2"
    clip = VideoClip(
        frames=torch.zeros(2, 3, 28, 28, dtype=torch.uint8),
        timestamps=[0.0, 81 / 20.0],
        frame_types=[SLOW, FAST],
        slow_hw=(28, 28),
        fast_hw=(28, 28),
    )
    assert clip.timestamps == [0.0, 4.050000190734863]  # stored as the released FloatTensor holds them


def test_decord_failure_prints_nothing_but_our_error(tmp_path, capfd):
    """decord logs its C++ errors (with its build machine's paths) to fd 2; the user sees only our MediaError."""
    pytest.importorskip("decord")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(MediaError):
        load_video(str(bad), VideoOptions(backend="decord"))
    assert capfd.readouterr().err == ""
