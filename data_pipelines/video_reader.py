"""``load_video``: decode the sampled frames of one video, type them slow/fast and fix the token budget.

Sampling, typing and budget equal keye-vl-utils 1.5.2's ``fetch_video`` (frame count, ``linspace(...).round()``
indices, float32 ``(1 / native_fps) * index`` timestamps from ``media.frame_timestamp``, slow/fast types, slow and
fast sizes); the reference tests check it, timestamps as the prompt text they become.
What differs is how the work is done:

- **Decoding** (backend ``auto``): PyAV first. One cheap demux pass lists packet timestamps (frame count and order
  as decord sees them) and the IDR frames. H.264 packets that no frame references and that are not sampled are
  never sent to the decoder (``h264_nal``; other codecs: the decoder skips them); only sampled frames are converted
  to RGB (the same swscale conversion decord uses, so pixels are identical). A part stops at its last sample.
  If PyAV cannot read the file, decord (the original's reader) is tried. ``backend="decord"`` forces decord.
- **Parallel parts** (``overlap.ordered_parallel``): the sampled frames split at IDR frames into parts that decode
  independently, each on its own container, on ``decoder_threads`` worker threads; a part's thread also converts
  its frames and computes their similarity features, unless a worker has no part left to start: that one takes
  them over. The caller types and stores frames in order. One part (a
  single IDR frame) decodes with FFmpeg frame threads instead. Measured on real footage: decoding the reference
  frames is ~60-70% of the CPU time, so two parts in parallel are what makes a read fast on 2 cores.
- **Streaming**: each frame is typed on arrival (``SlowFastSelector``) and stored (``_FrameStore``): at decoded
  size, as the original returns frames, when all sampled frames fit ``full_size_limit_mb``; otherwise only at the
  largest slow size the budget can still give it, so memory is bounded by the token budget, not the video length.
- **Frame lists** (the KC-MMBench form): only the sampled images are read; each is resized as the original does.

Errors on one input raise ``MediaError`` (with a ``reason``) so loaders can count and skip.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from .h264_nal import is_droppable, is_idr, nal_length_size
from .image_reader import load_image
from .media import SLOW, MediaError, VideoClip, VideoOptions, frame_timestamp
from .native_log import captured_native_stderr
from .overlap import ordered_parallel, read_ahead, run_single_threaded
from .slowfast import (
    FrameFeatures,
    SlowFastSelector,
    area,
    budget_sizes,
    count_types,
    frame_features,
    max_slow_hw,
    resize_uint8,
    similarity_size,
)

VideoSource = str | bytes | os.PathLike | Sequence[str]
T = TypeVar("T")
# (position among the sampled indices, work(frame as uint8 [H, W, 3])), in order of position
FrameIter = Iterator[tuple[int, Any]]
Decode = Callable[..., FrameIter]  # decode(sorted indices, work=identity)


@dataclass
class VideoMeta:
    """What is known before decoding pixels."""

    num_frames: int
    fps: float
    backend: str
    height: int = 0  # as the stream declares it (0: unknown); the decoded frames decide the clip's sizes
    width: int = 0


def _label(source: str | bytes | os.PathLike) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, bytes) else os.fspath(source)


def _check_exists(source: str | bytes | os.PathLike) -> str | bytes:
    if isinstance(source, bytes):
        if not source:
            raise MediaError("empty", "video data is empty (0 bytes)", "<bytes>")
        return source
    path = os.fspath(source)
    if path.startswith("file://"):
        path = path[7:]
    if not os.path.exists(path):
        raise MediaError("missing", "video file not found", path)
    if os.path.isdir(path):
        raise MediaError("unsupported", "expected a video file, found a directory", path)
    if os.path.getsize(path) == 0:
        raise MediaError("empty", "video file is empty (0 bytes)", path)
    return path


def sample_indices(num_frames: int, native_fps: float, options: VideoOptions, label: str = "") -> list[int]:
    """Frame indices to decode: ``min(int(duration·fps), max_frames)`` spread by ``linspace(...).round()``.

    ``fps = min(options.sample_fps, native_fps)``; ``max_frames = video_total_pixels / min_pixels`` (1365 by default),
    lowered by ``options.max_frames``. A ``video_start``/``video_end`` window restricts the range to the frames
    whose exact times ``index / native_fps`` fall inside it (1e-6 s tolerance). The timestamps the clip then
    carries are float32 (``frame_timestamp``) and may sit one float32 step outside it (0.699999988 for frame 7 at
    10 fps in a window starting at 0.7 s); the window is decided on frame indices, never on those rounded values.
    """
    if num_frames <= 0 or not native_fps or native_fps <= 0:
        raise MediaError("empty", f"video has {num_frames} frames at {native_fps} fps", label)
    lo, hi = 0, num_frames - 1
    if options.video_start is not None:
        lo = max(lo, math.ceil(options.video_start * native_fps - 1e-6))
    if options.video_end is not None:
        hi = min(hi, math.floor(options.video_end * native_fps + 1e-6))
    count = hi - lo + 1
    if count <= 0:
        raise MediaError(
            "too_short",
            f"window [{options.video_start}, {options.video_end}] s holds no frame of a {num_frames / native_fps:.2f} s video",
            label,
        )
    fps = min(options.sample_fps, native_fps)
    nframes = min(int(count / native_fps * fps), options.frame_cap)
    if nframes <= 0:
        raise MediaError(
            "too_short",
            f"{count / native_fps:.3f} s of video is shorter than one sample interval (1/{fps:g} s)",
            label,
        )
    return (torch.linspace(0, count - 1, nframes).round().long() + lo).tolist()


# ---------------------------------------------------------------- PyAV backend


def _av_open(source: str | bytes, label: str, probe_decoding: bool = True) -> av.container.InputContainer:
    """Open ``source``; ``probe_decoding=False`` (for a decoding pass, once the probe has read the metadata) stops
    FFmpeg's stream probing from decoding its first frames, which costs 2–6 ms per open at 720p–1080p."""
    options = None if probe_decoding else {"skip_frame": "all"}
    try:
        return av.open(io.BytesIO(source) if isinstance(source, bytes) else source, mode="r", options=options)
    except av.error.FFmpegError as exc:
        raise MediaError("corrupt", f"cannot open as a video: {exc}", label) from exc


def _av_video_stream(container: av.container.InputContainer, label: str) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise MediaError("no_video", "file has no video stream", label)
    return container.streams.video[0]


# FFmpeg's still-image demuxers: "image2"/"image2pipe" (by an image file name) and "<codec>_pipe" (by content:
# jpeg_pipe, png_pipe, webp_pipe, bmp_pipe, tiff_pipe, …), plus "gif". Each opens one picture as a one-frame
# "video" at a made-up 25 fps, which the sampler would report as too short to sample.
_IMAGE_CODEC_NAMES = {"mjpeg": "JPEG", "png": "PNG", "webp": "WebP", "bmp": "BMP", "gif": "GIF", "tiff": "TIFF"}


def image_format(container: av.container.InputContainer) -> str | None:
    """The picture format ("JPEG", "PNG", …) when FFmpeg opened ``container`` with a still-image demuxer (an image
    file, whatever its name), else None. Real videos, one-frame ones and MJPEG-in-AVI included, have a container
    demuxer (mov/mp4, matroska, avi, …) and give None."""
    name = container.format.name
    if name not in ("image2", "image2pipe", "gif") and not name.endswith("_pipe"):
        return None
    stream = container.streams.video[0] if container.streams.video else None
    codec = stream.codec_context.name if stream is not None else ""
    return _IMAGE_CODEC_NAMES.get(codec, codec.upper() or name)


class NotAVideoError(MediaError):
    """The file is a still image (reason ``no_video``); no other backend is tried."""

    def __init__(self, kind: str, label: str) -> None:
        super().__init__("no_video", f"is an image ({kind}), not a video", label)


def _av_probe(source: str | bytes, label: str) -> tuple[VideoMeta, list[int], list[int]]:
    """Frame count, average fps, presentation timestamps in display order and where a read may split: the
    timestamps of H.264 IDR frames (``h264_nal.is_idr``; none for other codecs). One demux pass, no decoding.

    A still image (a JPEG or PNG renamed ``.mp4``: one frame through an image demuxer) raises ``NotAVideoError``;
    an image demuxer yielding several frames (an animated GIF, concatenated JPEGs) is read as a video."""
    with _av_open(source, label) as container:
        stream = _av_video_stream(container, label)
        codec = stream.codec_context
        splits = codec.name == "h264"
        length_size = nal_length_size(codec.extradata) if splits else None
        pts, key_pts = [], []
        try:
            for packet in container.demux(stream):
                if packet.pts is not None and packet.size > 0:
                    pts.append(packet.pts)
                    if splits and packet.is_keyframe and is_idr(bytes(packet), length_size):
                        key_pts.append(packet.pts)
        except av.error.FFmpegError as exc:
            raise MediaError("corrupt", f"cannot read packets: {exc}", label) from exc
        rate = stream.average_rate or stream.guessed_rate
        kind = image_format(container)
    if kind is not None and len(pts) <= 1:
        raise NotAVideoError(kind, label)
    if not pts:
        raise MediaError("empty", "video stream holds no frames", label)
    fps = float(rate) if rate else 0.0
    meta = VideoMeta(len(pts), fps, "pyav", height=codec.height or 0, width=codec.width or 0)
    return meta, sorted(pts), sorted(key_pts)


_reformatters = threading.local()


def _rgb_array(frame: av.VideoFrame) -> np.ndarray:
    """RGB24 through swscale, as decord converts (pixels identical to decord's), with this thread's swscale
    context (a fresh one per frame costs ~1 ms; one context must not convert on two threads at once)."""
    reformatter = getattr(_reformatters, "value", None)
    if reformatter is None:
        reformatter = _reformatters.value = VideoReformatter()
    return reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()


# A part of a read: the keyframe to seek to (None: decode from the stream's start) and the sampled frames it
# delivers, {pts: position among the sampled indices}
Part = tuple[int | None, dict[int, int]]


def decode_parts(indices: list[int], pts: list[int], key_pts: list[int]) -> list[Part]:
    """The sampled frames grouped by the IDR frame (``key_pts``) that starts their group of pictures, in display
    order. Each part decodes on its own from its IDR frame (nothing after it refers to anything before it), so
    parts can decode in parallel and give the same pixels as one pass from the start."""
    parts: list[Part] = []
    for pos, i in enumerate(indices):
        k = bisect.bisect_right(key_pts, pts[i]) - 1
        start = key_pts[k] if k >= 0 and key_pts[k] != pts[0] else None
        if not parts or parts[-1][0] != start:
            parts.append((start, {}))
        parts[-1][1][pts[i]] = pos
    return parts


def _av_part(source: str | bytes, label: str, part: Part, threads: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """Decode one part's sampled frames, leaving out unsampled frames that nothing references, and yield
    ``(position, frame)`` for each (still YUV: converting is the caller's, possibly on another thread).

    H.264 (nearly all real footage): such packets are recognised from their NAL headers (``h264_nal``) and never
    sent to the decoder, which then runs ``threads`` frame threads. Other codecs: the decoder is asked to skip
    non-reference frames (``skip_frame``), which FFmpeg does only serially, so they decode on one thread.
    A part that seeks and then misses frames (a file whose index lies) is decoded again from the stream's start.
    """
    start_pts, wanted = part
    pending = dict(wanted)
    with _av_open(source, label, probe_decoding=False) as container:
        stream = _av_video_stream(container, label)
        codec = stream.codec_context
        by_headers = codec.name == "h264"
        length_size = nal_length_size(codec.extradata) if by_headers else None
        # PyAV's default is automatic *slice* threads: with one slice per frame (x264's default) they decode
        # nothing in parallel, yet their hand-offs cost about one extra CPU-second per CPU-second of decoding
        # (measured). Frame threads do decode in parallel, but only when the packet stream is not steered with
        # skip_frame: 1 thread for other codecs.
        codec.skip_frame = "DEFAULT"  # whatever the probing option left
        codec.thread_count = threads if by_headers else 1
        if codec.thread_count != 1:
            codec.thread_type = "FRAME"
        try:
            if start_pts is not None:
                container.seek(start_pts, stream=stream, backward=True, any_frame=False)
            unsent = set(pending)
            for packet in container.demux(stream):
                needed = packet.pts is None or packet.pts in pending
                if by_headers:
                    if not needed and packet.size and is_droppable(bytes(packet), length_size):
                        continue
                else:
                    codec.skip_frame = "DEFAULT" if needed else "NONREF"
                unsent.discard(packet.pts)
                # once every sampled frame's packet is in, later packets are only the decoder's reordering delay:
                # flush instead of decoding them
                frames = packet.decode() if unsent else [*packet.decode(), *codec.decode(None)]
                for frame in frames:
                    pos = pending.pop(frame.pts, None)
                    if pos is not None:
                        yield pos, frame
                if not pending or not unsent:
                    break
        except av.error.FFmpegError as exc:
            raise MediaError("corrupt", f"decoding failed: {exc}", label) from exc
    if pending and start_pts is not None:
        yield from _av_part(source, label, (None, pending), threads)
    elif pending:
        raise MediaError("corrupt", f"only {len(wanted) - len(pending)} of {len(wanted)} sampled frames decoded", label)


# ---------------------------------------------------------------- decord backend


def _decord_open(source: str | bytes, label: str):
    try:
        import decord
    except ImportError as exc:  # optional, as in keye-vl-utils
        raise MediaError("unsupported", "decord is not installed", label) from exc
    try:
        # decord's C++ logs go straight to fd 2 (with its build machine's paths): our MediaError says it in one line
        with captured_native_stderr():
            return decord.VideoReader(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Exception as exc:  # decord raises its own DECORDError / RuntimeError types
        raise MediaError("corrupt", f"decord cannot open: {str(exc).splitlines()[0]}", label) from exc


def _decord_frames(
    reader, label: str, indices: list[int], work: Callable[[np.ndarray], T], chunk: int = 16
) -> FrameIter:
    try:
        for start in range(0, len(indices), chunk):
            batch = reader.get_batch(indices[start : start + chunk]).asnumpy()
            for k, arr in enumerate(batch):
                yield start + k, work(arr)
    except Exception as exc:
        raise MediaError("corrupt", f"decord decoding failed: {str(exc).splitlines()[0]}", label) from exc


# ---------------------------------------------------------------- public API


def decoder_threads(options: VideoOptions) -> int:
    """Decoding threads for one read: ``options.decode_threads``, or by default two when this thread may use more
    than one core (a DataLoader worker runs torch on one thread: its read then uses one too)."""
    if options.decode_threads is not None:
        if options.decode_threads < 1:
            raise ValueError(f"decode_threads must be at least 1 (or unset), got {options.decode_threads}")
        return options.decode_threads
    return min(2, torch.get_num_threads())


def _keep(rgb: np.ndarray) -> np.ndarray:
    return rgb


def _finish(work: Callable[[np.ndarray], T], item: tuple[int, av.VideoFrame]) -> tuple[int, T]:
    return item[0], work(_rgb_array(item[1]))


def open_video(source: str | bytes | os.PathLike, options: VideoOptions) -> tuple[VideoMeta, Decode]:
    """Probe a video; return its metadata and ``decode(indices, work)``, which yields ``(position, work(rgb))``
    for the frames at sorted ``indices`` in order, ``rgb`` a uint8 ``[H, W, 3]`` array.

    PyAV reads split at keyframes (``decode_parts``) and run on ``decoder_threads(options)`` threads, ``work``
    (e.g. similarity features) on the same threads; one part decodes with that many frame threads instead."""
    label = _label(source)
    src = _check_exists(source)
    backend = options.backend
    if backend not in ("auto", "pyav", "decord"):
        raise ValueError(f"video backend must be 'auto', 'pyav' or 'decord', got {backend!r}")
    workers = decoder_threads(options)
    if backend in ("auto", "pyav"):
        try:
            meta, pts, key_pts = _av_probe(src, label)
        except NotAVideoError:
            raise  # decord would read the picture as a one-frame video
        except MediaError as exc:
            if backend == "pyav" or exc.reason not in ("corrupt", "no_video", "empty"):
                raise
            first_error = exc
        else:

            def decode(indices: list[int], work: Callable[[np.ndarray], T] = _keep, depth: int = 16) -> FrameIter:
                parts = decode_parts(indices, pts, key_pts)
                threads = workers if len(parts) == 1 else 1  # parts in parallel, or one part's frames
                jobs = [partial(_av_part, src, label, p, threads) for p in parts]
                return ordered_parallel(jobs, workers, depth, finish=partial(_finish, work))

            return meta, decode
    else:
        first_error = None
    try:
        reader = _decord_open(src, label)
        meta = VideoMeta(num_frames=len(reader), fps=float(reader.get_avg_fps()), backend="decord")
    except MediaError:
        if first_error is not None:
            raise first_error from None
        _check_not_image(src, label)  # decord fails on pictures with "broken metadata": say what the file is
        raise
    if meta.num_frames <= 1 and first_error is None:
        _check_not_image(src, label)

    def decode_decord(indices: list[int], work: Callable[[np.ndarray], T] = _keep, depth: int = 4) -> FrameIter:
        return read_ahead(_decord_frames(reader, label, indices, work), depth)

    return meta, decode_decord


def _check_not_image(source: str | bytes, label: str) -> None:
    """Raise ``NotAVideoError`` if PyAV sees a still image (``backend="decord"``, which cannot tell)."""
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else source, mode="r") as container:
            kind = image_format(container)
    except av.error.FFmpegError:
        return
    if kind is not None:
        raise NotAVideoError(kind, label)


def decode_frames(source: str | bytes | os.PathLike, indices: list[int], backend: str = "auto") -> np.ndarray:
    """Full-resolution RGB frames ``uint8 [len(indices), H, W, 3]`` at the given indices (tools and tests)."""
    _, decode = open_video(source, VideoOptions(backend=backend))
    frames = dict(decode(sorted(indices)))
    order = sorted(range(len(indices)), key=lambda k: indices[k])
    out = [None] * len(indices)
    for pos, k in enumerate(order):
        out[k] = frames[pos]
    return np.stack(out)


def held_smaller(num_frames: int, height: int, width: int, limit_bytes: int) -> bool:
    """Whether ``num_frames`` frames of ``height × width`` exceed ``limit_bytes`` at decoded size (a long video):
    then ``_FrameStore`` holds them smaller and a read buffers few decoded frames ahead."""
    return num_frames * height * width * 3 > limit_bytes


class _FrameStore:
    """Holds the sampled frames of one video as they arrive, in chunks of frames.

    When all of them fit ``options.full_size_limit_mb`` at decoded size they are kept as decoded: what the
    processor expects (it resizes each frame once, to its slow or fast size, as the original does). Otherwise
    each is kept no larger than the biggest slow size still reachable: the bound falls as frames turn out slow;
    once it has halved, the held frames are shrunk chunk by chunk (each old chunk freed as its replacement fills),
    so memory never exceeds what is held plus one chunk. Frames held at decoded size fill one buffer, returned
    without a copy. Buffers take the first frame's memory layout, so storing a frame is one plain copy.
    """

    CHUNK = 64

    def __init__(self, num_frames: int, options: VideoOptions) -> None:
        self.n = num_frames
        self.budget = {
            "min_pixels": options.min_pixels,
            "max_pixels": options.max_pixels,
            "total_pixels": options.video_total_pixels,
            "fast_ratio": options.fast_token_ratio,
        }
        self.limit_bytes = int(options.full_size_limit_mb * 2**20)
        self.chunks: list[torch.Tensor] = []
        self.count = 0
        self.hw = (0, 0)
        self.source_hw = (0, 0)
        self.channels_last = False

    def bounded(self, height: int, width: int) -> bool:
        """Whether frames of this decoded size are held below it (all of them at full size exceed the limit)."""
        return held_smaller(self.n, height, width, self.limit_bytes)

    def _target(self, height: int, width: int, num_slow: int) -> tuple[int, int]:
        if not self.bounded(height, width):
            return height, width
        cap = max_slow_hw(height, width, self.n, num_slow, **self.budget)
        return cap if area(cap) < height * width else (height, width)

    def _empty(self, rows: int, hw: tuple[int, int]) -> torch.Tensor:
        if self.channels_last:
            return torch.empty((rows, *hw, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        return torch.empty((rows, 3, *hw), dtype=torch.uint8)

    def add(self, frame: torch.Tensor, num_slow: int) -> None:
        """Keep the next frame (at decoded size), given how many frames so far are slow."""
        h, w = int(frame.shape[1]), int(frame.shape[2])
        target = self._target(h, w, num_slow)
        if self.count == 0:
            self.source_hw, self.hw = (h, w), target
            self.channels_last = frame.permute(1, 2, 0).is_contiguous()
        elif 2 * area(target) <= area(self.hw):
            self._shrink(target)
        if self.count >= self.n:
            raise ValueError(f"more than the {self.n} sampled frames arrived")
        # frames held at decoded size go to one buffer (returned as is); held smaller, to chunks that can shrink
        chunk = self.CHUNK if self.bounded(*self.source_hw) else self.n
        row = self.count % chunk
        if row == 0:
            self.chunks.append(self._empty(min(chunk, self.n - self.count), self.hw))
        self.chunks[-1][row].copy_(resize_uint8(frame, self.hw))
        self.count += 1

    def _shrink(self, hw: tuple[int, int]) -> None:
        for c, old in enumerate(self.chunks):
            new = self._empty(old.shape[0], hw)
            for i in range(min(old.shape[0], self.count - c * self.CHUNK)):
                new[i].copy_(resize_uint8(old[i], hw))
            self.chunks[c] = new  # the old chunk is freed here
        self.hw = hw

    def finish(self, hw: tuple[int, int]) -> torch.Tensor:
        """The frames as one ``[T, 3, h, w]`` tensor: at decoded size when held so, else at ``hw`` (or the held
        size, if that is smaller)."""
        target = hw if self.bounded(*self.source_hw) and area(hw) < area(self.hw) else self.hw
        if len(self.chunks) == 1 and target == self.hw:
            frames = self.chunks[0][: self.count]
        else:
            frames = self._empty(self.count, target)
            for c, chunk in enumerate(self.chunks):
                start = c * self.CHUNK
                for i in range(min(chunk.shape[0], self.count - start)):
                    frames[start + i].copy_(resize_uint8(chunk[i], target))
                self.chunks[c] = None  # released as copied
        self.chunks = []
        return frames


Prepared = tuple[torch.Tensor, FrameFeatures | None]  # (uint8 [3, H, W] frame, its similarity features)


def _prepare(rgb: np.ndarray, slow_fast: bool) -> Prepared:
    """A decoded ``[H, W, 3]`` frame as a ``[3, H, W]`` view (the memory layout the original interpolates from, so
    its rounding is reproduced), with its similarity features: resized and turned into HSV patches on the
    decoding thread, in parallel with the other parts of the read."""
    frame = torch.from_numpy(rgb).permute(2, 0, 1)
    if not slow_fast:
        return frame, None
    return frame, frame_features(resize_uint8(frame, similarity_size(int(frame.shape[1]), int(frame.shape[2]))))


def _assemble(
    prepared: Iterator[Prepared],
    indices: list[int],
    native_fps: float | None,
    timestamps: list[float],
    options: VideoOptions,
    label: str,
    duration: float | None,
) -> VideoClip:
    """Type frames as they arrive, then fix the budget and return the clip."""
    selector = SlowFastSelector(options.min_frame_similarity) if options.slow_fast else None
    store = _FrameStore(len(indices), options)
    size: tuple[int, int] | None = None
    for k, (frame, features) in enumerate(prepared):
        hw = (int(frame.shape[1]), int(frame.shape[2]))
        if size is None:
            size = hw
        elif hw != size:
            raise MediaError("mixed_sizes", f"frame {k} is {list(hw)}, frame 0 was {list(size)}", label)
        if selector is not None:
            selector.add(features)
        store.add(frame, selector.num_slow if selector is not None else len(indices))
    if store.count == 0:
        raise MediaError("empty", "no frame decoded", label)
    frame_types = selector.frame_types if selector is not None else [SLOW] * len(indices)
    num_slow, num_fast = count_types(frame_types)
    height, width = store.source_hw
    slow_hw, fast_hw = budget_sizes(
        height,
        width,
        num_slow,
        num_fast,
        options.min_pixels,
        options.max_pixels,
        options.video_total_pixels,
        options.fast_token_ratio,
    )
    if not options.slow_fast:
        fast_hw = slow_hw
    return VideoClip(
        frames=store.finish(slow_hw),
        timestamps=timestamps,
        frame_types=[int(t) for t in frame_types],
        slow_hw=slow_hw,
        fast_hw=fast_hw,
        frame_indices=indices,
        native_fps=native_fps,
        duration=duration,
        path=label,
    )


def _load_frame_list(paths: Sequence[str], options: VideoOptions) -> VideoClip:
    """A video given as image files, as the original reads them: ``len(paths)`` frames taken whole (capped by
    ``max_frames``) and timestamps ``frame_timestamp(index, fps)`` only when ``options.fps`` is given."""
    if not paths:
        raise MediaError("empty", "frame list is empty", "<frame list>")
    label = f"<{len(paths)} frames: {paths[0]}…>"
    fps = options.sample_fps
    indices = sample_indices(len(paths), fps, options, label)
    resized = (
        (options.resized_height, options.resized_width)
        if options.resized_height is not None and options.resized_width is not None
        else None
    )

    def read(path: str) -> Iterator[Prepared]:
        img = load_image(path, options.min_pixels, options.max_pixels, resized)
        # contiguous [3, H, W], as the original stacks its images (the resize rounds by memory layout)
        frame = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
        yield (
            frame,
            frame_features(resize_uint8(frame, similarity_size(*frame.shape[1:]))) if options.slow_fast else None,
        )

    timestamps = [frame_timestamp(i, fps) for i in indices] if options.fps is not None else []
    duration = len(paths) / fps if options.fps is not None else None
    prepared = ordered_parallel([partial(read, paths[i]) for i in indices], decoder_threads(options))
    return run_single_threaded(_assemble, prepared, indices, None, timestamps, options, label, duration)


def load_video(source: VideoSource, options: VideoOptions | None = None) -> VideoClip:
    """Sampled, slow/fast-typed frames of a video file, video bytes or list of frame image paths."""
    options = options or VideoOptions()
    if isinstance(source, (list, tuple)):
        return _load_frame_list(source, options)
    label = _label(source)
    meta, decode = open_video(source, options)
    indices = sample_indices(meta.num_frames, meta.fps, options, label)
    # a long video's frames are held small, so few full-size frames may wait in the parts' queues (2 each; on a
    # 10-minute 1080p clip peak RSS +590 MB, +860 MB with 16, +510 MB for one sequential read); a short video's
    # frames are all held at full size anyway
    limit = int(options.full_size_limit_mb * 2**20)
    long_video = not meta.height or held_smaller(len(indices), meta.height, meta.width, limit)
    work = partial(_prepare, slow_fast=options.slow_fast)
    prepared = (item for _, item in decode(indices, work, depth=2 if long_video else 16))
    timestamps = [frame_timestamp(i, meta.fps) for i in indices]
    duration = meta.num_frames / meta.fps
    return run_single_threaded(_assemble, prepared, indices, meta.fps, timestamps, options, label, duration)


def clip_pixels(clip: VideoClip) -> list[torch.Tensor]:
    """Each frame as uint8 ``[3, h, w]`` at its final slow or fast size (what the processor patchifies)."""
    return [resize_uint8(clip.frames[j], clip.frame_hw(j)) for j in range(clip.num_frames)]
