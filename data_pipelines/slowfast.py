"""Slow-Fast frame typing and the per-video token budget (Keye-VL 1.5, KEYE_FACTS Part A §3).

A sampled frame is *slow* (full token budget) when it differs enough from the most recent slow frame, otherwise
*fast* (about 30% of the tokens). Similarity is the fraction of 28×28 HSV patches whose cosine with the same patch
of the reference exceeds 0.7, computed on frames downscaled to at most 256 tokens. The decisions must equal the
shipped keye-vl-utils 1.5.2 bit for bit (the released checkpoint was trained on them), so the float32 operations
and their order mirror it; only the structure differs: each frame is converted to HSV once, every comparison is one
tensor expression over all patches, and the per-frame work (``frame_features``) is separate from the sequential
decision (``SlowFastSelector``), so readers compute features on their decode thread and hold one reference frame.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .media import FAST, SLOW
from .resize import IMAGE_FACTOR, PIXELS_PER_TOKEN, smart_resize

VIDEO_MIN_PIXELS = 48 * PIXELS_PER_TOKEN
VIDEO_MAX_PIXELS = 768 * PIXELS_PER_TOKEN
VIDEO_TOTAL_PIXELS = 65536 * PIXELS_PER_TOKEN
SIMILARITY_MAX_PIXELS = 256 * PIXELS_PER_TOKEN  # frames are compared at <= 256 tokens
PATCH_SIZE = 28
PATCH_COSINE_THRESHOLD = 0.7
_EPS = 1e-8
_BLACK_NORM = 0.01


def similarity_size(height: int, width: int) -> tuple[int, int]:
    """Size at which frames are compared: 48..256 tokens, multiples of 28."""
    return smart_resize(height, width, IMAGE_FACTOR, VIDEO_MIN_PIXELS, SIMILARITY_MAX_PIXELS)


def resize_uint8(frames: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear antialiased resize of uint8 ``[T, 3, H, W]`` (or ``[3, H, W]``) frames; a no-op at the same size."""
    squeeze = frames.dim() == 3
    x = frames.unsqueeze(0) if squeeze else frames
    if tuple(x.shape[-2:]) != tuple(hw):
        x = F.interpolate(x, list(hw), mode="bilinear", antialias=True)
    return x[0] if squeeze else x


def patch_features(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HSV patch vectors of uint8 frames ``[T, 3, h, w]`` (h, w multiples of 28).

    Returns ``(unit, norm)``: ``unit`` ``[T, h/28, w/28, 3*28*28]`` float32 patches divided by ``norm + 1e-8``,
    ``norm`` ``[T, h/28, w/28]``. Vector layout is (channel, row, column) within a patch, as in the original.
    """
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames [T, 3, h, w], got {list(frames.shape)}")
    t, c, h, w = frames.shape
    if h % PATCH_SIZE or w % PATCH_SIZE:
        raise ValueError(f"frame size {h}x{w} is not a multiple of {PATCH_SIZE}")
    hwc = frames.permute(0, 2, 3, 1).contiguous().numpy()
    hsv = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2HSV) for f in hwc]) if t else np.zeros((0, h, w, 3), np.uint8)
    x = torch.from_numpy(hsv).permute(0, 3, 1, 2)  # [T, C, H, W] uint8
    ph, pw = h // PATCH_SIZE, w // PATCH_SIZE
    # rearrange while still uint8 (4x less to copy), then widen: the same float values as widening first
    patches = (
        x.reshape(t, c, ph, PATCH_SIZE, pw, PATCH_SIZE)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(t, ph, pw, c * PATCH_SIZE**2)
        .float()
    )
    norm = torch.norm(patches, p=2, dim=-1, keepdim=True) + _EPS
    return patches / norm, norm.squeeze(-1)


def similarity_to(
    ref_unit: torch.Tensor,
    ref_norm: torch.Tensor,
    unit: torch.Tensor,
    norm: torch.Tensor,
    threshold: float = PATCH_COSINE_THRESHOLD,
) -> torch.Tensor:
    """Fraction of similar patches between one reference ``[ph, pw, D]`` and frames ``[T, ph, pw, D]``.

    Patches black in both frames are excluded; a pair with no remaining patch yields NaN (never "dissimilar"),
    matching the original's mean over an empty selection. Float32 result, as the original compares it.
    """
    cos = (ref_unit.unsqueeze(0) * unit).sum(dim=-1)  # [T, ph, pw]
    counted = ~((ref_norm.unsqueeze(0) < _BLACK_NORM) & (norm < _BLACK_NORM))
    similar = ((cos > threshold) & counted).flatten(1).sum(1).float()
    total = counted.flatten(1).sum(1).float()
    return similar / total  # 0/0 -> NaN


def frame_features(frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``patch_features`` of one uint8 frame ``[3, h, w]`` already at ``similarity_size``: ``(unit, norm)``.

    Independent of every other frame, so readers compute it on their decode thread.
    """
    unit, norm = patch_features(frame.unsqueeze(0))
    return unit[0], norm[0]


class SlowFastSelector:
    """Types frames in order from their ``frame_features``, holding only the current slow (reference) frame.

    The first frame is slow; a later frame is slow when its similarity to the last slow frame is below the
    threshold, compared in float64 as the original does after ``.item()`` (0.9f < 0.9 holds; NaN, i.e. both
    frames black, is fast).
    """

    def __init__(self, min_frame_similarity: float = 0.90) -> None:
        self.threshold = float(min_frame_similarity)
        self._ref: tuple[torch.Tensor, torch.Tensor] | None = None
        self.frame_types: list[int] = []
        self.num_slow = 0

    def add(self, unit: torch.Tensor, norm: torch.Tensor) -> int:
        """Type the next frame from its ``(unit, norm)`` features; returns ``SLOW`` or ``FAST``."""
        slow = self._ref is None
        if not slow:
            sim = similarity_to(self._ref[0], self._ref[1], unit.unsqueeze(0), norm.unsqueeze(0))
            slow = float(sim[0]) < self.threshold
        if slow:
            self._ref = (unit, norm)
            self.num_slow += 1
        kind = SLOW if slow else FAST
        self.frame_types.append(kind)
        return kind


def select_frame_types(frames: torch.Tensor, min_frame_similarity: float = 0.90, chunk: int = 16) -> list[int]:
    """Slow/fast types of uint8 frames ``[T, 3, H, W]`` at any size (features computed ``chunk`` frames at a time)."""
    t = int(frames.shape[0])
    if t == 0:
        return []
    sim_hw = similarity_size(int(frames.shape[2]), int(frames.shape[3]))
    selector = SlowFastSelector(min_frame_similarity)
    chunk = max(1, int(chunk))
    for start in range(0, t, chunk):
        unit, norm = patch_features(resize_uint8(frames[start : start + chunk], sim_hw))
        for u, n in zip(unit, norm, strict=True):
            selector.add(u, n)
    return selector.frame_types


def slow_token_limit(
    num_slow: int,
    num_fast: int,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
    fast_ratio: float = 0.3,
) -> float:
    """``max_pixels`` for slow frames: binary search of tokens T with S·T + F·max(⌊r·T⌋, min_t) ≤ total.

    As the original, it returns the first *infeasible* T (one above the largest feasible one) times 784;
    ``smart_resize`` floors the size, so the budget still holds in practice.
    """
    min_pixels = max(int(min_pixels), VIDEO_MIN_PIXELS)
    min_tokens = int(min_pixels / PIXELS_PER_TOKEN)
    left: float = min_pixels / PIXELS_PER_TOKEN
    right: float = max_pixels / PIXELS_PER_TOKEN
    while left < right:
        mid = int(left + right) // 2
        need = num_slow * mid * PIXELS_PER_TOKEN + num_fast * max(int(fast_ratio * mid), min_tokens) * PIXELS_PER_TOKEN
        if need > total_pixels:
            right = mid
        else:
            left = mid + 1
    return left * PIXELS_PER_TOKEN


def budget_sizes(
    height: int,
    width: int,
    num_slow: int,
    num_fast: int,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
    fast_ratio: float = 0.3,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(slow_hw, fast_hw)`` for a ``height × width`` video with ``num_slow``/``num_fast`` frames."""
    slow_max = slow_token_limit(num_slow, num_fast, min_pixels, max_pixels, total_pixels, fast_ratio)
    min_pixels = max(int(min_pixels), VIDEO_MIN_PIXELS)
    slow_hw = smart_resize(height, width, IMAGE_FACTOR, min_pixels, slow_max)
    slow_tokens = slow_hw[0] * slow_hw[1] / PIXELS_PER_TOKEN
    fast_max = max(int(slow_tokens * fast_ratio) * PIXELS_PER_TOKEN, VIDEO_MIN_PIXELS)
    fast_hw = smart_resize(height, width, IMAGE_FACTOR, min_pixels, fast_max)
    return slow_hw, fast_hw


def count_types(frame_types: Iterable[int]) -> tuple[int, int]:
    """``(num_slow, num_fast)``."""
    types = list(frame_types)
    fast = sum(1 for t in types if t == FAST)
    return len(types) - fast, fast


def max_slow_hw(height: int, width: int, num_frames: int, min_slow: int, **budget) -> tuple[int, int]:
    """Largest slow size any final typing can give when at least ``min_slow`` of ``num_frames`` are slow.

    More slow frames never enlarge the slow size, so this bounds what a reader must keep while decoding.
    """
    s = max(1, min(min_slow, num_frames))
    return budget_sizes(height, width, s, num_frames - s, **budget)[0]


def area(hw: tuple[int, int]) -> int:
    return int(hw[0]) * int(hw[1])
