"""Slow-Fast frame typing and the per-video token budget (Keye-VL 1.5, KEYE_FACTS Part A §3).

A sampled frame is *slow* (full token budget) when it differs enough from the most recent slow frame, otherwise
*fast* (about 30% of the tokens). Similarity is the fraction of 28×28 HSV patches whose cosine with the same patch
of the reference exceeds 0.7, computed on frames downscaled to at most 256 tokens. The decisions must equal the
shipped keye-vl-utils 1.5.2 bit for bit (the released checkpoint was trained on them). Its float32 cosines are
reproduced without redoing its work on every patch: a cheap cosine (any summation order) decides every patch whose
cosine is clearly away from 0.7, and only patches within ``_COSINE_MARGIN`` of it are recomputed with the
original's exact float32 operations and order (``_reference_cosines``). The margin is a proven bound: both
computations sum at most 2352 non-negative terms, so each is within 3e-4 of the true cosine.
Per-frame work (``frame_features``) is separate from the sequential decision (``SlowFastSelector``), so readers
compute it as frames arrive and hold one reference frame.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .media import FAST, SLOW, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, VIDEO_TOTAL_PIXELS
from .resize import IMAGE_FACTOR, PIXELS_PER_TOKEN, smart_resize

SIMILARITY_MAX_PIXELS = 256 * PIXELS_PER_TOKEN  # frames are compared at <= 256 tokens
PATCH_SIZE = 28
PATCH_COSINE_THRESHOLD = 0.7
_EPS = 1e-8
# |cheap cosine - original float32 cosine| <= 2 * (2351 + 4) * 2**-24 < 3e-4 (sums of non-negative terms);
# patches closer than this to the threshold are recomputed exactly
_COSINE_MARGIN = 1e-3


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


@dataclass(frozen=True)
class FrameFeatures:
    """HSV patches of one frame at ``similarity_size``.

    ``patches`` float32 ``[P, 28*28*3]`` in (row, column, channel) order within a patch (cheap to gather from an
    HWC image; the cheap cosine does not depend on the order), ``norm`` float32 ``[P]`` their Euclidean norms
    (exactly 0 for a black patch).
    """

    patches: torch.Tensor
    norm: torch.Tensor


def _hwc(frame: torch.Tensor) -> np.ndarray:
    """uint8 ``[3, h, w]`` as a contiguous ``[h, w, 3]`` array (cv2.merge: a plain permute copy is ~15x slower)."""
    view = frame.permute(1, 2, 0)
    if view.is_contiguous():
        return view.numpy()
    return cv2.merge([np.ascontiguousarray(c) for c in frame.numpy()])


def frame_features(frame: torch.Tensor) -> FrameFeatures:
    """HSV patch features of one uint8 frame ``[3, h, w]`` (h, w multiples of 28, normally ``similarity_size``)."""
    if frame.dim() != 3 or frame.shape[0] != 3:
        raise ValueError(f"expected a frame [3, h, w], got {list(frame.shape)}")
    _, h, w = frame.shape
    if h % PATCH_SIZE or w % PATCH_SIZE:
        raise ValueError(f"frame size {w}x{h} (w×h) is not a multiple of {PATCH_SIZE}")
    hsv = torch.from_numpy(cv2.cvtColor(_hwc(frame), cv2.COLOR_RGB2HSV))  # [h, w, 3] uint8
    ph, pw = h // PATCH_SIZE, w // PATCH_SIZE
    patches = hsv.reshape(ph, PATCH_SIZE, pw, PATCH_SIZE * 3).permute(0, 2, 1, 3).reshape(ph * pw, -1).float()
    return FrameFeatures(patches, torch.linalg.vector_norm(patches, dim=-1))


def _reference_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The original's float32 cosine of patch rows ``[k, 28*28*3]`` given in ``FrameFeatures`` order.

    Rows are put back in its (channel, row, column) order and go through its exact operations, so the float32
    rounding is the same; every operation works row by row, so a subset of rows gives the same values.
    """

    def original_order(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, PATCH_SIZE, PATCH_SIZE, 3).permute(0, 3, 1, 2).reshape(x.shape[0], -1)

    a, b = original_order(a), original_order(b)
    unit_a = a / (torch.norm(a, p=2, dim=-1, keepdim=True) + _EPS)
    unit_b = b / (torch.norm(b, p=2, dim=-1, keepdim=True) + _EPS)
    return (unit_a * unit_b).sum(dim=-1)


def similar_patches(
    ref: FrameFeatures, cur: FrameFeatures, threshold: float = PATCH_COSINE_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(similar, counted, recomputed)``: per-patch bool masks and how many patches needed the exact cosine.

    A patch pair is counted unless both are black (the original's ``norm < 0.01`` mask: a non-black patch of
    integers has norm >= 1); it is similar when the original's float32 cosine exceeds ``threshold``.
    """
    if ref.patches.shape != cur.patches.shape:
        raise ValueError(f"frames differ in patch layout: {list(ref.patches.shape)} vs {list(cur.patches.shape)}")
    dot = (ref.patches * cur.patches).sum(dim=-1)
    cosine = dot.double() / (ref.norm.double() * cur.norm.double()).clamp_min(1.0)  # 0 when either is black
    similar = cosine > threshold
    unsure = ((cosine - threshold).abs() < _COSINE_MARGIN).nonzero().flatten()
    if unsure.numel():
        similar[unsure] = _reference_cosines(ref.patches[unsure], cur.patches[unsure]) > threshold
    counted = (ref.norm > 0) | (cur.norm > 0)
    return similar & counted, counted, int(unsure.numel())


def similarity(ref: FrameFeatures, cur: FrameFeatures, threshold: float = PATCH_COSINE_THRESHOLD) -> float:
    """Fraction of similar patches, as the original computes it (a float32 mean; NaN when every patch pair is
    black, i.e. the mean over an empty selection)."""
    similar, counted, _ = similar_patches(ref, cur, threshold)
    return float(similar.sum().float() / counted.sum().float())


class SlowFastSelector:
    """Types frames in order from their ``frame_features``, holding only the current slow (reference) frame.

    The first frame is slow; a later frame is slow when its similarity to the last slow frame is below the
    threshold, compared in float64 as the original does after ``.item()`` (0.9f < 0.9 holds; NaN, i.e. both
    frames black, is fast).
    """

    def __init__(self, min_frame_similarity: float = 0.90) -> None:
        self.threshold = float(min_frame_similarity)
        self._ref: FrameFeatures | None = None
        self.frame_types: list[int] = []
        self.num_slow = 0

    def add(self, features: FrameFeatures) -> int:
        """Type the next frame from its features; returns ``SLOW`` or ``FAST``."""
        slow = self._ref is None or similarity(self._ref, features) < self.threshold
        if slow:
            self._ref = features
            self.num_slow += 1
        kind = SLOW if slow else FAST
        self.frame_types.append(kind)
        return kind


def select_frame_types(frames: torch.Tensor, min_frame_similarity: float = 0.90, chunk: int = 16) -> list[int]:
    """Slow/fast types of uint8 frames ``[T, 3, H, W]`` at any size (resized ``chunk`` frames at a time)."""
    t = int(frames.shape[0])
    if t == 0:
        return []
    sim_hw = similarity_size(int(frames.shape[2]), int(frames.shape[3]))
    selector = SlowFastSelector(min_frame_similarity)
    chunk = max(1, int(chunk))
    for start in range(0, t, chunk):
        for frame in resize_uint8(frames[start : start + chunk], sim_hw):
            selector.add(frame_features(frame))
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
