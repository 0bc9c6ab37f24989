"""Deterministic synthetic media (real h264/yuv420p mp4s, PNG/JPEG images) for tests, benchmarks and the demo.

Nothing in the project downloads media, so every test and the demo builds what it needs here. Each video is a
pure function of its arguments (including ``seed``): frames are rendered with vectorised numpy and encoded with
PyAV/libx264. Scenes are sparse bright blocks on black, which makes them clearly dissimilar under the Slow-Fast
HSV patch cosine (dense positive patterns would all look alike to a cosine), so "a cut every k frames" really
produces a new slow frame at each cut.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

FrameFn = Callable[[int], np.ndarray]


def _even(n: int) -> int:
    """yuv420p needs even dimensions."""
    return max(2, n - (n % 2))


def write_video(
    path: str | os.PathLike,
    frame_fn: FrameFn,
    num_frames: int,
    fps: float,
    height: int,
    width: int,
    preset: str = "ultrafast",
    crf: int = 23,
    gop: int | None = None,
) -> str:
    """Encode ``frame_fn(i) -> uint8 [H, W, 3]`` for ``i < num_frames`` as an h264 mp4; returns the path."""
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    height, width = _even(height), _even(width)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        opts = {"preset": preset, "crf": str(crf)}
        if gop is not None:
            opts["g"] = str(gop)
        stream.options = opts
        for i in range(num_frames):
            arr = np.ascontiguousarray(frame_fn(i)[:height, :width])
            if arr.shape != (height, width, 3) or arr.dtype != np.uint8:
                raise ValueError(f"frame {i} must be uint8 [{height}, {width}, 3], got {arr.dtype} {list(arr.shape)}")
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def block_texture(height: int, width: int, seed: int, block: int = 8, density: float = 0.3) -> np.ndarray:
    """Sparse random coloured blocks on black: uint8 ``[H, W, 3]``, distinct per seed."""
    rng = np.random.default_rng(seed)
    bh, bw = -(-height // block), -(-width // block)
    on = rng.random((bh, bw)) < density
    colors = rng.integers(64, 256, size=(bh, bw, 3), dtype=np.uint8) * on[..., None].astype(np.uint8)
    return np.repeat(np.repeat(colors, block, axis=0), block, axis=1)[:height, :width]


def _disc_mask(height: int, width: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.ogrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def moving_shapes(
    path: str | os.PathLike,
    seconds: float = 4.0,
    fps: float = 10.0,
    height: int = 112,
    width: int = 160,
    seed: int = 0,
    **enc,
) -> str:
    """A fixed textured background with a disc and a square moving across it (mostly fast frames)."""
    height, width = _even(height), _even(width)
    bg = block_texture(height, width, seed, block=max(4, height // 16))
    r = max(3, min(height, width) // 10)

    def frame(i: int) -> np.ndarray:
        t = i / max(1.0, seconds * fps)
        out = bg.copy()
        out[_disc_mask(height, width, height / 2, r + t * (width - 2 * r), r)] = (255, 40, 40)
        y0 = int(r + t * (height - 3 * r))
        out[y0 : y0 + r, width // 4 : width // 4 + r] = (40, 40, 255)
        return out

    return write_video(path, frame, int(round(seconds * fps)), fps, height, width, **enc)


def static_video(
    path: str | os.PathLike,
    seconds: float = 4.0,
    fps: float = 10.0,
    height: int = 112,
    width: int = 160,
    seed: int = 0,
    **enc,
) -> str:
    """The same picture in every frame: one slow frame, the rest fast."""
    img = block_texture(_even(height), _even(width), seed)
    return write_video(path, lambda i: img, int(round(seconds * fps)), fps, height, width, **enc)


def slow_pan(
    path: str | os.PathLike,
    seconds: float = 6.0,
    fps: float = 10.0,
    height: int = 112,
    width: int = 160,
    seed: int = 0,
    pixels_per_frame: float = 2.0,
    **enc,
) -> str:
    """A camera pan over a wide texture: similarity decays until a new slow frame is taken."""
    height, width = _even(height), _even(width)
    n = int(round(seconds * fps))
    wide = block_texture(height, width + int(np.ceil(n * pixels_per_frame)) + 1, seed, block=max(4, height // 14))

    def frame(i: int) -> np.ndarray:
        x = int(i * pixels_per_frame)
        return wide[:, x : x + width]

    return write_video(path, frame, n, fps, height, width, **enc)


def scene_cuts(
    path: str | os.PathLike,
    every: int = 10,
    num_frames: int = 60,
    fps: float = 10.0,
    height: int = 112,
    width: int = 160,
    seed: int = 0,
    **enc,
) -> str:
    """A hard cut to an unrelated scene every ``every`` frames, small motion within a scene."""
    height, width = _even(height), _even(width)
    scenes = {}

    def frame(i: int) -> np.ndarray:
        k = i // every
        if k not in scenes:
            scenes[k] = block_texture(height, width, seed * 1000 + k, block=max(4, height // 10))
        out = scenes[k].copy()
        j = i % every
        out[2 : 2 + 4, 2 + j : 2 + j + 4] = 255
        return out

    return write_video(path, frame, num_frames, fps, height, width, **enc)


def fades(
    path: str | os.PathLike,
    seconds: float = 6.0,
    fps: float = 10.0,
    height: int = 112,
    width: int = 160,
    seed: int = 0,
    **enc,
) -> str:
    """Scene A fades to black, then scene B fades in from black (brightness ramps, near-black frames)."""
    height, width = _even(height), _even(width)
    n = int(round(seconds * fps))
    a = block_texture(height, width, seed * 7 + 1).astype(np.float32)
    b = block_texture(height, width, seed * 7 + 2).astype(np.float32)

    def frame(i: int) -> np.ndarray:
        t = i / max(1, n - 1)
        img, alpha = (a, 1 - 2 * t) if t < 0.5 else (b, 2 * t - 1)
        return np.clip(img * max(0.0, alpha), 0, 255).astype(np.uint8)

    return write_video(path, frame, n, fps, height, width, **enc)


def letterboxed(
    path: str | os.PathLike,
    seconds: float = 4.0,
    fps: float = 10.0,
    height: int = 144,
    width: int = 160,
    seed: int = 0,
    bar: float = 0.2,
    **enc,
) -> str:
    """Moving content between black bars (top and bottom ``bar`` of the height): all-black patches."""
    height, width = _even(height), _even(width)
    top = int(height * bar)
    inner = max(2, height - 2 * top)
    n = int(round(seconds * fps))
    wide = block_texture(inner, width + 3 * n + 1, seed, block=6)

    def frame(i: int) -> np.ndarray:
        out = np.zeros((height, width, 3), np.uint8)
        out[top : top + inner] = wide[:, 3 * i : 3 * i + width]
        return out

    return write_video(path, frame, n, fps, height, width, **enc)


def portrait(path: str | os.PathLike, seconds: float = 4.0, fps: float = 10.0, seed: int = 0, **enc) -> str:
    """9:16 portrait video (the short-video form), 180×320."""
    return scene_cuts(
        path, every=15, num_frames=int(round(seconds * fps)), fps=fps, height=320, width=180, seed=seed, **enc
    )


def tiny(path: str | os.PathLike, seconds: float = 3.0, fps: float = 10.0, seed: int = 0, **enc) -> str:
    """64×64: below the 48-token minimum, so frames are upscaled by ``smart_resize``."""
    return moving_shapes(path, seconds=seconds, fps=fps, height=64, width=64, seed=seed, **enc)


def long_lowres(
    path: str | os.PathLike,
    seconds: float = 600.0,
    fps: float = 2.0,
    height: int = 72,
    width: int = 128,
    seed: int = 0,
    every: int = 40,
    **enc,
) -> str:
    """A long (default 10 min) low-resolution, low-fps video with periodic cuts: exercises the frame cap."""
    return scene_cuts(
        path, every=every, num_frames=int(round(seconds * fps)), fps=fps, height=height, width=width, seed=seed, **enc
    )


def text_video(
    path: str | os.PathLike,
    seconds: float = 4.0,
    fps: float = 5.0,
    height: int = 112,
    width: int = 224,
    seed: int = 0,
    **enc,
) -> str:
    """White text on a dark background, the caption changing every second (OCR-style content)."""
    height, width = _even(height), _even(width)
    rng = np.random.default_rng(seed)
    words = ["KEYE", "VIDEO", "SLOW", "FAST", "FRAME", "TOKEN", "CLIP", "SCENE"]
    captions = [" ".join(rng.choice(words, size=2)) for _ in range(int(seconds) + 1)]

    def frame(i: int) -> np.ndarray:
        img = Image.new("RGB", (width, height), (10, 10, 30))
        draw = ImageDraw.Draw(img)
        draw.text((8, height // 3), f"{captions[int(i / fps)]} {i}", fill=(255, 255, 255))
        return np.asarray(img)

    return write_video(path, frame, int(round(seconds * fps)), fps, height, width, **enc)


def write_image(path: str | os.PathLike, height: int = 96, width: int = 128, seed: int = 0, mode: str = "RGB") -> str:
    """A still image; the format follows the suffix (``.png``/``.jpg``). ``mode="RGBA"`` adds a transparent half."""
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    arr = block_texture(height, width, seed, block=max(4, height // 12), density=0.5)
    img = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        alpha = np.full((height, width), 255, np.uint8)
        alpha[:, : width // 2] = 0
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(alpha, "L"))
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def write_frame_images(
    directory: str | os.PathLike, num_frames: int = 8, height: int = 96, width: int = 128, seed: int = 0, every: int = 4
) -> list[str]:
    """A list of JPEG frames (the KC-MMBench "video as frame list" form) with a cut every ``every`` frames."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_frames):
        arr = block_texture(height, width, seed * 1000 + i // every, block=8).copy()
        arr[2:6, 2 + i % every : 6 + i % every] = 255
        p = directory / f"frame_{i:05d}.jpg"
        Image.fromarray(arr).save(p, quality=95)
        paths.append(str(p))
    return paths
