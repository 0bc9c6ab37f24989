"""Frame shards (``keye shards --frames``): a video decoded once and stored as typed, sized, timestamped frames must
encode, through the trainer's own encoder, to exactly the tokens and patches of the mp4 it came from; a run that
reads videos with other options must stop naming both values; ``keye train`` runs from frame shards."""

from __future__ import annotations

import json
import tarfile
from operator import attrgetter
from pathlib import Path

import pytest
import torch

from data_pipelines import synthetic
from data_pipelines.frame_shards import (
    FrameEncoding,
    FrameOptionsMismatch,
    check_manifest_options,
    read_frames_member,
)
from data_pipelines.media import FAST, SLOW, VideoOptions
from data_pipelines.reader import MappedStream, ShardStream
from data_pipelines.shards import write_shards
from data_pipelines.video_reader import load_video
from keye.cli.main import main as keye_main
from keye.processing import KeyeVLProcessor
from tests import train_helpers as th
from train.data import make_encoder

REAL_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_videos"


def _record(rid: str, video: str | list[str], **options) -> dict:
    return {
        "id": rid,
        "source": "video",
        "messages": [
            {"role": "user", "content": [{"type": "video", "video": video, **options}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": f"answer {rid}"},
        ],
    }


@pytest.fixture(scope="module")
def processor() -> KeyeVLProcessor:
    return KeyeVLProcessor()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """A Slow-Fast video (a cut every second, sampled at 2 fps: slow, fast, slow, …; large enough that fast frames
    are smaller than slow ones) and a frame-list video, one record each."""
    root = tmp_path_factory.mktemp("frame_shards")
    synthetic.scene_cuts(root / "cuts.mp4", every=10, num_frames=40, fps=10.0, height=448, width=640)
    frames = synthetic.write_frame_images(root / "frames", num_frames=3, height=112, width=140)
    jsonl = root / "data.jsonl"
    records = [
        _record("cuts", "cuts.mp4"),
        _record("list", [str(Path(p).relative_to(root)) for p in frames], fps=1.0),
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, jsonl


def _shards(dataset: tuple[Path, Path], name: str, frames: FrameEncoding | None) -> Path:
    root, jsonl = dataset
    out = root / name
    if not (out / "manifest.json").is_file():
        report = write_shards(jsonl, root, out, media_check="none", progress=False, frames=frames)
        assert report.num_samples == 2 and report.num_skipped == 0
    return out


def _encoded(shards: Path, processor: KeyeVLProcessor) -> list:
    return list(MappedStream(ShardStream(str(shards), shuffle=False, epochs=1), make_encoder(processor, None), ()))


def test_a_frame_shard_sample_encodes_to_the_mp4_samples_tokens_and_patches(dataset, processor):
    mp4, frames = _shards(dataset, "mp4", None), _shards(dataset, "frames", FrameEncoding())
    with tarfile.open(next(frames.glob("*.tar"))) as tar:
        names = tar.getnames()
    assert "000000000.media_0.frames.npz" in names and not any(n.endswith((".mp4", ".jpg")) for n in names)
    manifest = json.loads((frames / "manifest.json").read_text())["frames"]
    assert manifest["codec"] == "webp-lossless" and manifest["lossless"] and manifest["video_options"]["fps"] is None
    assert json.loads((mp4 / "manifest.json").read_text())["frames"] is None

    expected, got = _encoded(mp4, processor), _encoded(frames, processor)
    assert [s.sample_id for s in got] == [s.sample_id for s in expected] == ["cuts", "list"]
    for a, b in zip(expected, got, strict=True):
        for name in ("input_ids", "labels", "position_ids", "visual.video_grid_thw", "visual.pixel_values_videos"):
            assert torch.equal(attrgetter(name)(a), attrgetter(name)(b)), (a.sample_id, name)
    # the video really is Slow-Fast: both kinds of frame, at two sizes
    grids = {tuple(g) for g in got[0].visual.video_grid_thw[:, 1:].tolist()}
    assert len(grids) == 2, grids
    clip = read_frames_member(_member(frames, "media_0.frames.npz"), VideoOptions(), "cuts")
    assert {SLOW, FAST} <= set(clip.frame_types) and clip.slow_hw != clip.fast_hw and clip.path == "cuts.mp4"
    decoded = load_video(dataset[0] / "cuts.mp4")  # the original metadata travels with the frames
    for key in ("timestamps", "frame_types", "slow_hw", "fast_hw", "frame_indices", "native_fps", "duration"):
        assert getattr(clip, key) == getattr(decoded, key), key


def test_jpeg_frames_keep_the_tokens_and_differ_a_little_in_patches(dataset, processor):
    exact = _encoded(_shards(dataset, "frames", FrameEncoding()), processor)
    lossy = _encoded(_shards(dataset, "frames-jpeg", FrameEncoding("jpeg", 90)), processor)
    assert json.loads((dataset[0] / "frames-jpeg" / "manifest.json").read_text())["frames"]["quality"] == 90
    for a, b in zip(exact, lossy, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.visual.video_grid_thw, b.visual.video_grid_thw)
        diff = (a.visual.pixel_values_videos - b.visual.pixel_values_videos).abs()
        assert 0 < float(diff.mean()) < 0.05


def _member(shards: Path, suffix: str) -> bytes:
    with tarfile.open(next(shards.glob("*.tar"))) as tar:
        name = next(n for n in tar.getnames() if n.endswith(suffix))
        return tar.extractfile(name).read()


def test_other_video_options_stop_the_run_naming_both_values(dataset, processor):
    frames = _shards(dataset, "frames", FrameEncoding())
    other = VideoOptions(max_pixels=256 * 784)
    with pytest.raises(FrameOptionsMismatch, match=r"max_pixels=602112, but this run .* max_pixels=200704"):
        check_manifest_options([str(p) for p in frames.glob("*.tar")], other)
    with pytest.raises(FrameOptionsMismatch, match=r"'cuts'.*max_pixels=602112.*max_pixels=200704"):
        read_frames_member(_member(frames, "media_0.frames.npz"), other, "record 'cuts'")
    # not a sample error the trainer counts and skips: it ends the run
    slow_processor = KeyeVLProcessor(processor.tokenizer)
    slow_processor.config.video = other
    with pytest.raises(FrameOptionsMismatch):
        _encoded(frames, slow_processor)
    # decode threads change speed, not frames: no error
    read_frames_member(_member(frames, "media_0.frames.npz"), VideoOptions(decode_threads=2), "cuts")


def test_keye_shards_frames_cli_bakes_in_the_video_options(dataset, capsys):
    root, jsonl = dataset
    out = root / "cli_frames"
    args = ["shards", "--input", str(jsonl), "--media-root", str(root), "--out", str(out), "--no-progress"]
    assert keye_main([*args, "--frames", "--video", "max_frames=4", "--video", "slow_fast=false"]) == 0
    assert "frame shards (webp-lossless)" in capsys.readouterr().out
    written = json.loads((out / "manifest.json").read_text())["frames"]["video_options"]
    assert written["max_frames"] == 4 and written["slow_fast"] is False
    clip = read_frames_member(_member(out, "media_0.frames.npz"), VideoOptions(max_frames=4, slow_fast=False), "c")
    assert clip.num_frames == 4 and set(clip.frame_types) == {SLOW}
    assert keye_main([*args, "--frames", "--video", "fast=1"]) == 1
    assert "--video 'fast=1': expected KEY=VALUE with KEY one of" in capsys.readouterr().err


@pytest.mark.skipif(not REAL_VIDEOS.is_dir(), reason="no real clips in ../shared/data/real_videos")
def test_a_real_clip_encodes_exactly_from_frame_shards(tmp_path, processor):
    clip = min(REAL_VIDEOS.glob("*.mp4"), key=lambda p: p.stat().st_size)
    jsonl = tmp_path / "real.jsonl"
    jsonl.write_text(json.dumps(_record("real", clip.name)) + "\n")
    encoded = []
    for name, frames in (("mp4", None), ("frames", FrameEncoding())):
        write_shards(jsonl, REAL_VIDEOS, tmp_path / name, media_check="none", progress=False, frames=frames)
        (sample,) = _encoded(tmp_path / name, processor)
        encoded.append(sample)
    assert torch.equal(encoded[0].input_ids, encoded[1].input_ids)
    assert torch.equal(encoded[0].visual.pixel_values_videos, encoded[1].visual.pixel_values_videos)


@pytest.mark.slow
def test_keye_train_runs_from_frame_shards(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    records = th.make_records(media, n_image=2, n_video=3, n_text=2, n_frames=1)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    shards = tmp_path / "frame_shards"
    report = write_shards(jsonl, media, shards, media_check="open", progress=False, frames=FrameEncoding())
    assert report.num_samples == len(records)
    out = tmp_path / "run"
    cfg = th.run_config(out, th.write_nano_model(tmp_path / "nano.yaml"), [str(shards)])
    th.run(th.write_config(tmp_path / "run.yaml", cfg))
    rows = [r for r in th.metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["samples_skipped"] == 0 and r["loss"] == r["loss"] for r in rows)
