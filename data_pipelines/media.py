"""What a decoded video or image looks like once the data pipeline is done with it.

These are the types the processor (``keye.processing``) consumes; the data pipeline produces them. Keeping
them here, in one small module, is the agreed interface between the two.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from data_pipelines.resize import PIXELS_PER_TOKEN

SLOW = 0
FAST = 1


class MediaError(ValueError):
    """A video or image that cannot be used; callers count ``reason`` and skip the sample.

    ``reason`` is a short machine-friendly tag: ``missing``, ``empty``, ``corrupt``, ``no_video`` (no video stream,
    or a still image such as a JPEG named ``.mp4``), ``too_short``, ``too_large``, ``mixed_sizes`` or ``unsupported``.
    """

    def __init__(self, reason: str, message: str, path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


DEFAULT_FPS = 2.0


def frame_timestamp(index: int, fps: float) -> float:
    """Seconds of frame ``index`` of a video at ``fps``, the value the released pipeline puts in the prompt.

    keye-vl-utils 1.5.2 computes ``(1 / video_fps) * i`` in float64 and stores it in a ``torch.FloatTensor``, so
    the released processor prints the float32 rounding of that product. Both details change the printed tenth:
    at 20 fps, frame 3 is ``(1 / 20) * 3`` = 0.15000000000000002, float32 0.15000000596…, printed "0.2", while
    ``3 / 20`` = 0.1499999999… prints "0.1"; one frame in 5 at 20 fps, 1 in 15 at 60 fps and 1 in 30 at 120 fps
    prints differently that way (tests/test_video_reference.py). So the order ``(1 / fps) * index`` is kept and the
    result is rounded to float32, returned as the Python float of that float32 (what ``tensor[j].item()`` gives).
    Every reader (video files, video bytes, frame lists with ``fps``) takes its timestamps from here.
    """
    return float(np.float32((1.0 / fps) * index))


def timestamp_text(seconds: float) -> str:
    """A frame timestamp as prompt text: ``format(ts, ".1f")`` of its float32 value, as the released processor
    writes it ("12.5"). The float32 cast makes float64 values from older records (``i / fps``) print as the
    released pipeline prints them; it changes nothing for values from :func:`frame_timestamp`."""
    return format(float(np.float32(seconds)), ".1f")


def size_text(hw: Sequence[int]) -> str:
    """A ``(height, width)`` pair as people read sizes, width first and labelled: ``(560, 1008)`` → "1008x560 (w×h)".
    JSON keeps ``[height, width]`` (``slow_hw``, ``fast_hw``); every human-readable size is printed with this."""
    height, width = hw
    return f"{width}x{height} (w×h)"


# keye-vl-utils 1.5.2's video budget, the one definition (slowfast, eval and the processor defaults read these)
VIDEO_MIN_PIXELS = 48 * PIXELS_PER_TOKEN  # the smallest frame is 48 merged tokens
VIDEO_MAX_PIXELS = 768 * PIXELS_PER_TOKEN  # the largest slow frame is 768 merged tokens
VIDEO_TOTAL_PIXELS = 65536 * PIXELS_PER_TOKEN  # token budget of the whole video


def _checked_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the field type ``hint`` (``int``, ``float``, ``bool``, ``str``, optionally ``| None``) wants
    it; ints are accepted for floats, nothing else is converted."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    wanted = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise ValueError(f"{where}: expected {wanted}, got {value!r}")


@dataclass
class VideoOptions:
    """Per-video reading options (keys as in a message's ``{"type": "video", ...}`` item)."""

    # None = the original's rule: 2.0 for video files; a frame list is taken whole and gets timestamps only
    # when fps is given (KEYE_FACTS Part A §3)
    fps: float | None = None
    max_frames: int | None = None
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    video_total_pixels: int = VIDEO_TOTAL_PIXELS
    min_frame_similarity: float = 0.90  # shipped code's threshold (the paper says 0.95)
    fast_token_ratio: float = 0.3
    slow_fast: bool = True  # False: every frame slow, the budget split evenly
    video_start: float | None = None
    video_end: float | None = None
    resized_height: int | None = None
    resized_width: int | None = None
    backend: str = "auto"  # "auto" (PyAV, then decord), "pyav" or "decord"
    # decoding threads per read; None = min(2, torch's thread count): 2 for a read on its own (eval, chat, a
    # benchmark), 1 in data-loader workers (torch runs them single-threaded; the workers are the parallelism)
    decode_threads: int | None = None
    # sampled frames are returned at decoded size when they all fit in this many MiB (the processor resizes each
    # once, as the original); above it they are held at the largest slow size still reachable (long videos)
    full_size_limit_mb: float = 512.0

    @property
    def sample_fps(self) -> float:
        return DEFAULT_FPS if self.fps is None else float(self.fps)

    @property
    def frame_cap(self) -> int:
        """Most frames sampled from one video: ``video_total_pixels / min_pixels`` (1365 by default), lowered by
        ``max_frames``."""
        cap = int(self.video_total_pixels / self.min_pixels)
        return cap if self.max_frames is None else min(int(self.max_frames), cap)

    def with_changes(self, changes: Mapping[str, Any], where: str = "video") -> VideoOptions:
        """These options with ``changes`` applied, each checked against its field's type: a misspelt name
        (``fsp``) or a wrong type (``max_frames: two``) is a ``ValueError`` naming ``where.key``, raised where a
        config is loaded rather than after a run has started."""
        names = [f.name for f in fields(VideoOptions)]
        hints = typing.get_type_hints(VideoOptions)
        checked: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"{where}.{key}: unknown video option{hint}; known: {', '.join(names)}")
            checked[key] = _checked_value(value, hints[key], f"{where}.{key}")
        return replace(self, **checked)

    def for_item(self, item: Mapping[str, Any]) -> VideoOptions:
        """The options a message's video item is read with: these, with the item's own keys (``fps``,
        ``max_frames``, …) replacing them; other keys (``type``, ``video``) are ignored. The processor applies it to
        its ``config.video``; ``keye video-info`` applies it to a checkpoint's (or the defaults) and its flags."""
        known = {f.name for f in fields(VideoOptions)}
        return replace(self, **{k: v for k, v in item.items() if k in known})


@dataclass
class VideoClip:
    """Sampled frames of one video plus everything the processor needs to tokenise them.

    ``frames`` are uint8 ``[T, 3, H, W]`` at decoded size; the processor resizes slow frames to
    ``slow_hw`` and fast frames to ``fast_hw`` (both multiples of 28). A clip read from a frame shard
    (``data_pipelines.frame_shards``) holds a list of ``[3, h, w]`` frames already at those sizes instead: slow and
    fast frames differ in size, so they cannot share one tensor, and the processor's resize is then a no-op.
    """

    frames: torch.Tensor | list[torch.Tensor]
    # seconds (float32 values, see ``frame_timestamp``); empty for a frame list read without fps (the original gives
    # none either). Values given as float64 are rounded to float32 on construction, as the released FloatTensor does.
    timestamps: list[float]
    frame_types: list[int]
    slow_hw: tuple[int, int]
    fast_hw: tuple[int, int]
    frame_indices: list[int] = field(default_factory=list)
    native_fps: float | None = None
    duration: float | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        n = len(self.frames)
        if len(self.frame_types) != n:
            raise ValueError(f"VideoClip has {n} frames but {len(self.frame_types)} frame types")
        if self.timestamps and len(self.timestamps) != n:
            raise ValueError(f"VideoClip has {n} frames but {len(self.timestamps)} timestamps")
        self.timestamps = [float(t) for t in np.asarray(self.timestamps, dtype=np.float32)]

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def frame_hw(self, j: int) -> tuple[int, int]:
        return self.fast_hw if self.frame_types[j] == FAST else self.slow_hw

    def visual_tokens(self, merge_factor: int = 28) -> int:
        """Merged visual tokens the model will see for this clip."""
        return sum((h // merge_factor) * (w // merge_factor) for h, w in map(self.frame_hw, range(self.num_frames)))
