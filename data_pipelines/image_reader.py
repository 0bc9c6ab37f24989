"""Reading one image into the RGB, ``smart_resize``-d PIL image the processor patchifies.

Follows keye-vl-utils' ``fetch_image``: open, convert to RGB, resize (PIL's default resampling) to
``smart_resize(h, w, min_pixels, max_pixels)`` or, when ``resized_hw`` is given, to ``smart_resize`` of that size.
Two deliberate differences: transparent pixels are composited onto white (the original's plain ``convert("RGB")``
exposes whatever colour hides under alpha = 0, often black), and unreadable inputs raise ``MediaError`` with a
``reason`` so a data loader can count and skip them.
"""

from __future__ import annotations

import base64
import io
import os
import warnings

from PIL import Image, UnidentifiedImageError

from .media import MediaError
from .resize import IMAGE_FACTOR, MAX_PIXELS, MIN_PIXELS, smart_resize

ImageSource = str | bytes | os.PathLike | Image.Image


def _label(source: ImageSource) -> str:
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return "<PIL image>"
    text = str(source)
    return text if len(text) < 200 else text[:60] + "…"


def open_image(source: ImageSource) -> Image.Image:
    """Open (and fully decode) an image from a path, ``file://`` URL, ``data:image/...;base64,`` URL or bytes."""
    if isinstance(source, Image.Image):
        return source
    label = _label(source)
    if isinstance(source, bytes):
        if not source:
            raise MediaError("empty", "image data is empty (0 bytes)", label)
        fp: io.BytesIO | str = io.BytesIO(source)
    else:
        text = os.fspath(source)
        if text.startswith("data:image"):
            if "base64," not in text:
                raise MediaError("unsupported", "data URL without base64 payload", label)
            fp = io.BytesIO(base64.b64decode(text.split("base64,", 1)[1]))
        else:
            fp = text[7:] if text.startswith("file://") else text
            if not os.path.exists(fp):
                raise MediaError("missing", "image file not found", label)
            if os.path.getsize(fp) == 0:
                raise MediaError("empty", "image file is empty (0 bytes)", label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError("too_large", f"image exceeds the decompression-bomb limit: {exc}", label) from exc
    except UnidentifiedImageError as exc:
        raise MediaError("corrupt", "not a readable image (unknown format)", label) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError("corrupt", f"image is truncated or corrupt: {exc}", label) from exc
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white."""
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_image(
    source: ImageSource,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    resized_hw: tuple[int, int] | None = None,
) -> Image.Image:
    """RGB image resized to multiples of 28 within ``[min_pixels, max_pixels]`` (see module docstring)."""
    img = to_rgb(open_image(source))
    if resized_hw is not None:
        h, w = smart_resize(int(resized_hw[0]), int(resized_hw[1]), IMAGE_FACTOR)
    else:
        width, height = img.size
        try:
            h, w = smart_resize(height, width, IMAGE_FACTOR, min_pixels, max_pixels)
        except ValueError as exc:
            raise MediaError("unsupported", str(exc), _label(source)) from exc
    return img.resize((w, h))
