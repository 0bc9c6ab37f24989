"""Our reader must reproduce keye-vl-utils 1.5.2 ``fetch_video`` exactly: indices, timestamps, types, sizes.

Timestamps are compared as the prompt text they become: ``format(ts, ".1f")`` of each element of the reference's
float32 ``timestamps`` tensor (what the released processor writes) against ``timestamp_text`` of ours, and the
token ids of the whole video block (``<|frame|>`` + text + pads per frame) against our ``video_ids``. Clips at 20,
59.94, 60 and 120 fps are long enough that the old float64 ``i / fps`` text differs on some sampled frame (the
test checks that it does, so these cases keep their teeth); 50 fps cannot differ and serves as a control.
The real clips in ``../shared/data/real_videos`` (beside the project) are compared when that folder exists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

keye_vl_utils = pytest.importorskip("keye_vl_utils.vision_process")

from data_pipelines import synthetic  # noqa: E402
from data_pipelines.media import VideoOptions, timestamp_text  # noqa: E402
from data_pipelines.slowfast import frame_features, similar_patches, similarity  # noqa: E402
from data_pipelines.video_reader import decode_frames, load_video, open_video  # noqa: E402
from keye.image_processing import video_grids  # noqa: E402
from keye.processing import KeyeVLProcessor  # noqa: E402

REAL_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_videos"
REAL_CLIPS = sorted(p.name for p in REAL_VIDEOS.glob("*.mp4")) if REAL_VIDEOS.is_dir() else []

CASES = {
    "static": lambda p: synthetic.static_video(p, seconds=4),
    "moving": lambda p: synthetic.moving_shapes(p, seconds=5),
    "pan": lambda p: synthetic.slow_pan(p, seconds=8, pixels_per_frame=0.6),
    "cuts": lambda p: synthetic.scene_cuts(p, every=25, num_frames=100, fps=10),
    "fades": lambda p: synthetic.fades(p, seconds=6),
    "letterboxed": lambda p: synthetic.letterboxed(p, seconds=4),
    "portrait": lambda p: synthetic.portrait(p, seconds=4),
    "tiny": lambda p: synthetic.tiny(p, seconds=3),
    "text": lambda p: synthetic.text_video(p, seconds=4),
    "long_lowres": lambda p: synthetic.long_lowres(p, seconds=300, fps=2, height=48, width=80, every=30),
    "bframes_ntsc": lambda p: synthetic.scene_cuts(p, every=40, num_frames=120, fps=30000 / 1001, preset="veryfast"),
    # frame rates where float32 timestamps print differently from float64 ones (see OLD_TEXT_WRONG)
    "fps20": lambda p: synthetic.scene_cuts(p, every=30, num_frames=220, fps=20, height=56, width=84),
    "fps50": lambda p: synthetic.scene_cuts(p, every=40, num_frames=200, fps=50, height=56, width=84),
    "fps59_94": lambda p: synthetic.scene_cuts(p, every=300, num_frames=3001, fps=60000 / 1001, height=56, width=84),
    "fps60": lambda p: synthetic.scene_cuts(p, every=60, num_frames=420, fps=60, height=56, width=84),
    "fps120": lambda p: synthetic.scene_cuts(p, every=120, num_frames=840, fps=120, height=56, width=84),
}
# Sampled frames (default options) whose text the old float64 ``i / fps`` got wrong: 20 fps frames 21, 31, 63, …
# ("1.0" for the released "1.1"); 59.94 fps only frame 3000 (50.05 s, hence the 3001-frame clip); 60 fps frames 129
# and 387; 120 fps 258 and 774. 50 fps times are multiples of 0.02 s and never round differently.
OLD_TEXT_WRONG = {"fps20": 6, "fps50": 0, "fps59_94": 1, "fps60": 2, "fps120": 2}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ref_videos")
    return {name: make(root / f"{name}.mp4") for name, make in CASES.items()}


@pytest.fixture(scope="module")
def processor() -> KeyeVLProcessor:
    return KeyeVLProcessor()


def released_texts(kw) -> list[str]:
    """The released processor's timestamp text: ``format(ts, ".1f")`` of each 0-d float32 tensor."""
    return [format(ts, ".1f") for ts in kw["timestamps"]] if "timestamps" in kw else []


def released_video_prompt(kw, num_frames: int) -> str:
    """The text the released processor puts in place of one ``<|video_pad|>``, inside the vision markers."""
    slow = "<|video_pad|>" * (kw["height"] * kw["width"] // 784)
    fast = "<|fast_start|>" + "<|video_pad|>" * (kw["fast_height"] * kw["fast_width"] // 784) + "<|fast_end|>"
    stamps = released_texts(kw) or [""] * num_frames
    frames = [f"<|frame|>{ts}" + (fast if int(t) == 1 else slow) for ts, t in zip(stamps, kw["frame_types"])]
    return "<|vision_start|>" + "".join(frames) + "<|vision_end|>"


def old_texts(clip) -> list[str]:
    """What this project printed before timestamps followed the release: float64 ``i / fps``, one decimal."""
    return [f"{i / clip.native_fps:.1f}" for i in clip.frame_indices]


def _assert_same(ours, ref_frames, kw, processor: KeyeVLProcessor | None = None) -> None:
    assert ours.num_frames == int(ref_frames.shape[0])
    assert ours.frame_types == [int(t) for t in kw["frame_types"]]
    assert ours.slow_hw == (kw["height"], kw["width"])
    assert ours.fast_hw == (kw["fast_height"], kw["fast_width"])
    assert ("timestamps" in kw) == bool(ours.timestamps)
    assert [timestamp_text(t) for t in ours.timestamps] == released_texts(kw)
    if processor is not None:
        expected = processor.tokenizer.encode(released_video_prompt(kw, ours.num_frames), add_special_tokens=False)
        assert processor.video_ids(ours, video_grids(ours)) == expected


@pytest.mark.parametrize("name", list(CASES))
def test_matches_fetch_video(videos, processor, name):
    path = videos[name]
    ref_frames, kw = keye_vl_utils.fetch_video({"video": path})
    ours = load_video(path)
    _assert_same(ours, ref_frames, kw, processor)
    if name in OLD_TEXT_WRONG:
        wrong = sum(a != b for a, b in zip(old_texts(ours), released_texts(kw)))
        assert wrong == OLD_TEXT_WRONG[name], "the clip no longer exercises the float64/float32 difference"
    # the reference returns the sampled frames themselves: every pixel equal (parts decoded in parallel, packets
    # nothing references left out)
    assert ours.frame_indices == sorted(set(ours.frame_indices))
    np.testing.assert_array_equal(ours.frames.numpy(), ref_frames.numpy())


def test_mixed_types_are_exercised(videos):
    """Guard against a reference suite that only ever sees all-slow or all-fast videos."""
    kinds = [load_video(videos[n]).frame_types for n in ("static", "pan", "cuts", "moving")]
    assert any(0 in k and 1 in k for k in kinds)
    assert sum(k.count(0) for k in kinds) > 4 and sum(k.count(1) for k in kinds) > 4


def test_options_match(videos, processor):
    path = videos["cuts"]
    ele = {"video": path, "fps": 4.0, "max_frames": 13, "min_frame_similarity": 0.97, "min_pixels": 64 * 784}
    ref_frames, kw = keye_vl_utils.fetch_video(ele)
    opts = VideoOptions(fps=4.0, max_frames=13, min_frame_similarity=0.97, min_pixels=64 * 784)
    _assert_same(load_video(path, opts), ref_frames, kw, processor)


def test_every_frame_at_20_fps_prints_like_the_release(videos, processor):
    """Sampling at the native 20 fps takes all 220 frames; one in five printed differently before."""
    path = videos["fps20"]
    ref_frames, kw = keye_vl_utils.fetch_video({"video": path, "fps": 20})
    ours = load_video(path, VideoOptions(fps=20))
    assert ours.frame_indices == list(range(220))
    _assert_same(ours, ref_frames, kw, processor)
    assert sum(a != b for a, b in zip(old_texts(ours), released_texts(kw))) == 44


@pytest.mark.parametrize("name", ["moving", "fps20"])
def test_bytes_match(videos, processor, name):
    data = Path(videos[name]).read_bytes()
    ref_frames, kw = keye_vl_utils.fetch_video({"video": data})
    _assert_same(load_video(data), ref_frames, kw, processor)


@pytest.mark.parametrize("fps", [None, 2.0, 0.5, 20.0, 20])
def test_frame_list_matches(tmp_path, processor, fps):
    """Frame lists are taken whole; timestamps exist only when fps is given (none at all otherwise). At 20 fps
    frames 3 and 9 (0.15 s, 0.45 s) print "0.2" and "0.5" in the release, "0.1" and "0.4" as float64 ``i / fps``."""
    paths = synthetic.write_frame_images(tmp_path, num_frames=12, every=4)
    ref_frames, kw = keye_vl_utils.fetch_video({"video": paths} if fps is None else {"video": paths, "fps": fps})
    ours = load_video(paths, VideoOptions(fps=fps))
    _assert_same(ours, ref_frames, kw, processor)
    np.testing.assert_array_equal(ours.frames.numpy(), ref_frames.numpy())
    if fps == 20:
        old = [f"{i / fps:.1f}" for i in ours.frame_indices]
        assert [k for k, (a, b) in enumerate(zip(old, released_texts(kw))) if a != b] == [3, 9]


@pytest.mark.skipif(not REAL_CLIPS, reason=f"no real clips in {REAL_VIDEOS}")
@pytest.mark.parametrize("name", REAL_CLIPS)
def test_real_clips_match(processor, name):
    """Real footage (23.98 to 60 fps, 480p to 1080p): timestamp text, prompt ids, frame types, sizes and pixels.

    The 60 fps clips are read with the default options (clip_32.mp4's frames 93 and 651 printed "1.6" and
    "10.8" before, "1.5" and "10.9" in the release); the others at most 12 frames, to keep the test quick.
    """
    path = str(REAL_VIDEOS / name)
    native_fps = open_video(path, VideoOptions())[0].fps
    max_frames = None if native_fps > 55 else 12
    ele = {"video": path} if max_frames is None else {"video": path, "max_frames": max_frames}
    ref_frames, kw = keye_vl_utils.fetch_video(ele)
    ours = load_video(path, VideoOptions(max_frames=max_frames))
    _assert_same(ours, ref_frames, kw, processor)
    np.testing.assert_array_equal(ours.frames.numpy(), ref_frames.numpy())


def test_decord_backend_matches_pyav(videos):
    path = videos["bframes_ntsc"]
    idx = load_video(path).frame_indices
    np.testing.assert_array_equal(decode_frames(path, idx, "pyav"), decode_frames(path, idx, "decord"))


def test_patch_similarity_equals_reference():
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(0, 256, (3, 84, 112), generator=gen, dtype=torch.uint8)
    b = a.clone()
    b[:, :56] = torch.randint(0, 256, (3, 56, 112), generator=gen, dtype=torch.uint8)
    b[:, 56:, :28] = 0
    a[:, 56:, :28] = 0  # a patch black in both: excluded
    ours = similarity(frame_features(a), frame_features(b))
    assert ours == keye_vl_utils.get_frame_sim(a.float(), b.float())


def test_patches_near_threshold_decide_like_reference():
    """Blacking out ~half of a patch's pixels puts its cosine near 0.7: the cheap cosine is unsure there and the
    exact recomputation must give the original's decision, patch by patch (each 28x28 crop run through it)."""
    gen = torch.Generator().manual_seed(0)
    h, w, recomputed = 112, 280, 0
    for _ in range(30):
        a = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
        frac = (0.45 + 0.11 * torch.rand(h // 28, w // 28, generator=gen)).repeat_interleave(28, 0)
        b = torch.where(torch.rand(h, w, generator=gen) < frac.repeat_interleave(28, 1), 0, a).to(torch.uint8)
        fa, fb = frame_features(a), frame_features(b)
        similar, counted, unsure = similar_patches(fa, fb)
        recomputed += unsure
        assert similarity(fa, fb) == keye_vl_utils.get_frame_sim(a.float(), b.float())
        for k in range(similar.numel()):
            r, c = divmod(k, w // 28)
            crop = (slice(None), slice(28 * r, 28 * r + 28), slice(28 * c, 28 * c + 28))
            assert float(similar[k]) == keye_vl_utils.get_frame_sim(a[crop].float(), b[crop].float()), k
    assert recomputed >= 20  # the exact path was exercised
