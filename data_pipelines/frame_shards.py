"""Decode-once frame shards: each video's sampled frames stored typed, sized and timestamped, so reading one back
is an image decode per frame instead of a video decode, Slow-Fast typing and resize (``keye shards --frames``).

A frame member holds exactly what :func:`data_pipelines.video_reader.clip_pixels` hands the processor (every sampled
frame at its slow or fast size) plus the clip's metadata, so a clip read back encodes to the same tokens and, with
the default lossless codec, bit-identical patches as the mp4 it came from (tests/test_frame_shards.py).

One member per video, ``media_<i>.frames.npz``: an uncompressed numpy archive (``np.load`` opens it) with ``meta``
(UTF-8 JSON: ``format``, ``codec``, ``quality``, ``timestamps``, ``frame_types``, ``slow_hw``, ``fast_hw``,
``frame_indices``, ``native_fps``, ``duration``, ``path`` of the source video, ``video_options`` it was read with)
and ``f0000``, ``f0001``… (each frame as an encoded image). Codecs, measured on the real clips
(tools/bench_loader.py): ``webp-lossless`` (default; libwebp's fastest method: 25-30% smaller than PNG at zlib
level 1, as fast to encode and faster to decode; its slowest method saves another 12-17% for 4-15x the encode
time) and ``jpeg`` at ``quality`` with full-resolution chroma (several times smaller, lossy: the benchmark reports
its error; 4:2:0 chroma would save another ~20% for twice the largest pixel error).

The video options are baked in: a run that reads videos with other options (fps, max_frames, pixel budgets,
Slow-Fast threshold, …) would silently train on other clips than it asks for, so reading a member with different
options raises :class:`FrameOptionsMismatch`, a fatal error naming the option and both values.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipelines.media import MediaError, VideoClip, VideoOptions
from data_pipelines.video_reader import VideoSource, clip_pixels, load_video

FRAMES_SUFFIX = ".frames.npz"
FORMAT = "keye-frames-v1"
CODECS = ("webp-lossless", "jpeg")
# options that change how fast a video is read, never the clip: they may differ between sharding and training
SPEED_ONLY_OPTIONS = frozenset({"decode_threads"})


class FrameOptionsMismatch(RuntimeError):
    """A run reads videos with other options than its frame shards were written with.

    A ``RuntimeError``, not a ``ValueError``: the trainer counts and skips ``ValueError`` samples, and this is a
    configuration error that would otherwise skip every video of the run.
    """


@dataclass(frozen=True)
class FrameEncoding:
    """How ``write_shards`` stores videos as frames: codec, JPEG quality and the base video options (each video
    item's own options are applied on top, as the processor does)."""

    codec: str = "webp-lossless"
    quality: int = 90  # jpeg only
    video: VideoOptions = field(default_factory=VideoOptions)

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"frame codec must be one of {CODECS}, got {self.codec!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"frame quality must be in 1..100, got {self.quality}")

    @property
    def lossless(self) -> bool:
        return self.codec == "webp-lossless"

    def manifest(self) -> dict[str, Any]:
        """The ``frames`` entry of ``manifest.json`` (``None`` there for shards that hold the video files)."""
        return {
            "format": FORMAT,
            "codec": self.codec,
            "quality": None if self.lossless else self.quality,
            "lossless": self.lossless,
            "video_options": dataclasses.asdict(self.video),
        }


def is_frames_member(name: str) -> bool:
    return name.endswith(FRAMES_SUFFIX)


def _encode_frame(pixels: torch.Tensor, encoding: FrameEncoding) -> bytes:
    image = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())
    out = io.BytesIO()
    if encoding.lossless:
        image.save(out, "WEBP", lossless=True, method=0, quality=0, exact=True)
    else:
        image.save(out, "JPEG", quality=encoding.quality, subsampling=0)  # 4:4:4: chroma error halved, +24% bytes
    return out.getvalue()


def _decode_frame(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def encode_clip(clip: VideoClip, options: VideoOptions, encoding: FrameEncoding, path: str) -> bytes:
    """A loaded clip as a frame member: its frames at their final sizes plus metadata (``path``: the source video
    as the record named it; ``options``: what the clip was read with)."""
    meta = {
        "format": FORMAT,
        "codec": encoding.codec,
        "quality": None if encoding.lossless else encoding.quality,
        "timestamps": clip.timestamps,
        "frame_types": clip.frame_types,
        "slow_hw": list(clip.slow_hw),
        "fast_hw": list(clip.fast_hw),
        "frame_indices": list(clip.frame_indices),
        "native_fps": clip.native_fps,
        "duration": clip.duration,
        "path": path,
        "video_options": dataclasses.asdict(options),
    }
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for j, pixels in enumerate(clip_pixels(clip)):
        arrays[f"f{j:04d}"] = np.frombuffer(_encode_frame(pixels, encoding), dtype=np.uint8)
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def frames_member(
    source: VideoSource | Sequence[bytes], item_options: Mapping[str, Any], encoding: FrameEncoding, path: str
) -> bytes:
    """Read a video (file bytes or frame-list bytes) with the trainer's loader and its item's options, and encode it
    as a frame member. Raises ``MediaError`` as ``load_video`` does."""
    options = encoding.video.for_item(item_options)
    return encode_clip(load_video(source, options), options, encoding, path)  # type: ignore[arg-type]


def check_video_options(written: Mapping[str, Any], wanted: VideoOptions, where: str) -> None:
    """Raise ``FrameOptionsMismatch`` naming the first option whose written value differs from ``wanted``'s."""
    for f in dataclasses.fields(VideoOptions):
        if f.name in SPEED_ONLY_OPTIONS:
            continue
        have, want = written.get(f.name, "(not recorded)"), getattr(wanted, f.name)
        if have != want:
            raise FrameOptionsMismatch(
                f"{where}: frame shards were written with video option {f.name}={have!r}, but this run reads videos "
                f"with {f.name}={want!r}; set data.video.{f.name}={have!r} in the run config, or re-shard with "
                f"keye shards --frames --video {f.name}={want!r}"
            )


def read_frames_member(data: bytes, wanted: VideoOptions, where: str) -> VideoClip:
    """The clip stored in a frame member, after checking it was written with the ``wanted`` video options (the
    processor's options for its message item). A damaged member is a ``MediaError`` (counted and skipped)."""
    try:
        archive = np.load(io.BytesIO(data))
        meta = json.loads(archive["meta"].tobytes())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise MediaError("corrupt", f"unreadable frame member: {exc}", where) from exc
    if meta.get("format") != FORMAT:
        raise MediaError("unsupported", f"frame member format {meta.get('format')!r}, expected {FORMAT!r}", where)
    check_video_options(meta["video_options"], wanted, where)
    try:
        frames = [_decode_frame(archive[f"f{j:04d}"].tobytes()) for j in range(len(meta["frame_types"]))]
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise MediaError("corrupt", f"unreadable frame in frame member: {exc}", where) from exc
    clip = VideoClip(
        frames=frames,
        timestamps=meta["timestamps"],
        frame_types=meta["frame_types"],
        slow_hw=tuple(meta["slow_hw"]),
        fast_hw=tuple(meta["fast_hw"]),
        frame_indices=meta["frame_indices"],
        native_fps=meta["native_fps"],
        duration=meta["duration"],
        path=meta["path"],
    )
    for j, frame in enumerate(frames):
        if tuple(frame.shape[1:]) != clip.frame_hw(j):
            raise MediaError(
                "corrupt", f"frame {j} is {list(frame.shape[1:])}, expected {list(clip.frame_hw(j))}", where
            )
    return clip


def check_manifest_options(shard_paths: Sequence[str], wanted: VideoOptions) -> None:
    """Fail before training starts when a frame-shard directory among ``shard_paths`` was written with other base
    video options than ``wanted`` (the run's; each member is checked again as it is read, item options included)."""
    for directory in sorted({Path(p).parent for p in shard_paths}):
        manifest = directory / "manifest.json"
        if not manifest.is_file():
            continue
        frames = json.loads(manifest.read_text()).get("frames")
        if frames:
            check_video_options(frames["video_options"], wanted, str(manifest))
