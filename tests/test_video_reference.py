"""Our reader must reproduce keye-vl-utils 1.5.2 ``fetch_video`` exactly: indices, timestamps, types, sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

keye_vl_utils = pytest.importorskip("keye_vl_utils.vision_process")

from data_pipelines import synthetic  # noqa: E402
from data_pipelines.media import VideoOptions  # noqa: E402
from data_pipelines.slowfast import frame_features, similar_patches, similarity  # noqa: E402
from data_pipelines.video_reader import decode_frames, load_video  # noqa: E402

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
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ref_videos")
    return {name: make(root / f"{name}.mp4") for name, make in CASES.items()}


def _assert_same(ours, ref_frames, kw) -> None:
    assert ours.num_frames == int(ref_frames.shape[0])
    assert ours.frame_types == [int(t) for t in kw["frame_types"]]
    assert ours.slow_hw == (kw["height"], kw["width"])
    assert ours.fast_hw == (kw["fast_height"], kw["fast_width"])
    if "timestamps" in kw:
        np.testing.assert_array_equal(np.asarray(ours.timestamps, np.float32), kw["timestamps"].numpy())


@pytest.mark.parametrize("name", list(CASES))
def test_matches_fetch_video(videos, name):
    path = videos[name]
    ref_frames, kw = keye_vl_utils.fetch_video({"video": path})
    ours = load_video(path)
    _assert_same(ours, ref_frames, kw)
    # frame indices: the reference returns the frames themselves; compare pixels at our indices
    assert ours.frame_indices == sorted(set(ours.frame_indices))
    np.testing.assert_array_equal(
        decode_frames(path, ours.frame_indices[:4]), ref_frames[:4].permute(0, 2, 3, 1).numpy()
    )


def test_mixed_types_are_exercised(videos):
    """Guard against a reference suite that only ever sees all-slow or all-fast videos."""
    kinds = [load_video(videos[n]).frame_types for n in ("static", "pan", "cuts", "moving")]
    assert any(0 in k and 1 in k for k in kinds)
    assert sum(k.count(0) for k in kinds) > 4 and sum(k.count(1) for k in kinds) > 4


def test_options_match(videos):
    path = videos["cuts"]
    ele = {"video": path, "fps": 4.0, "max_frames": 13, "min_frame_similarity": 0.97, "min_pixels": 64 * 784}
    ref_frames, kw = keye_vl_utils.fetch_video(ele)
    opts = VideoOptions(fps=4.0, max_frames=13, min_frame_similarity=0.97, min_pixels=64 * 784)
    _assert_same(load_video(path, opts), ref_frames, kw)


def test_bytes_match(videos):
    data = Path(videos["moving"]).read_bytes()
    ref_frames, kw = keye_vl_utils.fetch_video({"video": data})
    _assert_same(load_video(data), ref_frames, kw)


@pytest.mark.parametrize("fps", [None, 2.0, 0.5])
def test_frame_list_matches(tmp_path, fps):
    """Frame lists are taken whole; timestamps exist only when fps is given (none at all otherwise)."""
    paths = synthetic.write_frame_images(tmp_path, num_frames=12, every=4)
    ref_frames, kw = keye_vl_utils.fetch_video({"video": paths} if fps is None else {"video": paths, "fps": fps})
    ours = load_video(paths, VideoOptions(fps=fps))
    _assert_same(ours, ref_frames, kw)
    assert ("timestamps" in kw) == bool(ours.timestamps)
    assert tuple(ours.frames.shape[-2:]) == tuple(ref_frames.shape[-2:])


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
