"""``smart_resize``: the one rule that turns any image or frame size into a ViT-friendly size.

Both sides become multiples of ``factor`` (patch 14 × merge 2 = 28) and the area is kept inside
``[min_pixels, max_pixels]``, preserving the aspect ratio as closely as the rounding allows. The same rule
serves images, slow frames and fast frames (KEYE_FACTS Part A §3).
"""

from __future__ import annotations

import math

IMAGE_FACTOR = 28
PIXELS_PER_TOKEN = IMAGE_FACTOR * IMAGE_FACTOR  # 784: one merged visual token covers 28×28 pixels
MIN_PIXELS = 4 * PIXELS_PER_TOKEN  # 3136
MAX_PIXELS = 20480 * PIXELS_PER_TOKEN
MAX_ASPECT_RATIO = 200


def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Return ``(h, w)``, multiples of ``factor``, with ``min_pixels <= h*w <= max_pixels`` where possible.

    Raises ``ValueError`` for an aspect ratio above 200, as the original does (such inputs would
    yield a one-token-wide strip).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height} (w×h)")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width)}"
        )
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, floor_by_factor(height / beta, factor))
        w_bar = max(factor, floor_by_factor(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def tokens_for(height: int, width: int, factor: int = IMAGE_FACTOR) -> int:
    """Merged visual tokens for an already-resized ``height × width`` image."""
    return (height // factor) * (width // factor)
