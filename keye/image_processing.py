"""Pixels → flat ViT patches, in the row-major (t, h, w) order the vision tower expects.

What happens to pixels here is the released image processor's part of the pipeline, driven by the checkpoint's
``preprocessor_config.json`` (:class:`keye.preprocessor_config.ImageProcessorConfig`):

- **images** arrive after keye-vl-utils' resize (``data_pipelines.image_reader.load_image``, the first stage) and
  are resized a second time to ``smart_resize(h, w, 28, min_pixels, max_pixels)`` of the config with PIL's filter
  ``resample`` (bilinear), as the released processor does through transformers' ``image_transforms.resize``
  (``resize_for_model``); then rescaled and normalised (``pixel_values``);
- **video frames** arrive at decoded size (or smaller, for long videos) and are resized here to the slow or fast
  resolution chosen by the Slow-Fast selection, uint8 antialiased bilinear as the released processor does
  (``data_pipelines.video_reader.clip_pixels``; ~12x cheaper than resizing float frames, measured). The config's
  pixel limits do not apply to them: keye-vl-utils passes explicit slow/fast sizes and the released processor
  calls its image processor with ``do_resize=False``. Only the rescale and normalisation are shared with images.

``pixel_values`` computes exactly what transformers' ``rescale`` then ``normalize`` compute (float64 multiply by
``rescale_factor``, cast to float32, then float32 ``(x - mean) / std``), so the values are bit-identical to the
released processor's (tests/test_processor.py compares them).
"""

from __future__ import annotations

import torch
from PIL import Image

from data_pipelines.media import MediaError, VideoClip
from data_pipelines.resize import smart_resize
from data_pipelines.video_reader import clip_pixels
from keye.preprocessor_config import ImageProcessorConfig
from keye.released_image_processor import image_to_uint8, rescale_normalize, resize_image, to_patches

PATCH = 14


def model_image_size(height: int, width: int, config: ImageProcessorConfig) -> tuple[int, int]:
    """The released processor's own resize target for an image of ``height × width`` (its second stage).

    Raises ``MediaError("unsupported")`` for an aspect ratio above 200, as the released ``smart_resize`` does
    (possible after the first stage rounds a thin strip, e.g. 29×5800 → 28×5796).
    """
    if not config.do_resize:
        return height, width
    factor = config.patch_size * config.merge_size
    try:
        return smart_resize(height, width, factor, config.min_pixels, config.max_pixels)
    except ValueError as exc:
        raise MediaError("unsupported", f"image processor resize: {exc}") from exc


def resize_for_model(image: Image.Image, config: ImageProcessorConfig) -> Image.Image:
    """Second-stage resize of a first-stage RGB image (``keye.released_image_processor.resize_image``)."""
    if not config.do_resize:
        return image
    factor = config.patch_size * config.merge_size
    try:
        return resize_image(image, config.min_pixels, config.max_pixels, factor, config.resample)
    except ValueError as exc:
        raise MediaError("unsupported", f"image processor resize: {exc}") from exc


def pixel_values(pixels: torch.Tensor, config: ImageProcessorConfig) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` → float32 rescaled and normalised as transformers' ``rescale`` + ``normalize``."""
    return rescale_normalize(
        pixels,
        config.rescale_factor if config.do_rescale else None,
        config.image_mean if config.do_normalize else None,
        config.image_std if config.do_normalize else None,
    )


def patchify(pixels: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """``[T, 3, H, W]`` → ``[T·(H/p)·(W/p), 3·p·p]``, patches row-major within each frame."""
    return to_patches(pixels, patch)[0].flatten(1)


def image_to_patches(image: Image.Image, config: ImageProcessorConfig) -> tuple[torch.Tensor, list[int]]:
    """A first-stage RGB image (``load_image``) → (patches, grid ``[1, h/14, w/14]``) after the second stage."""
    arr = image_to_uint8(resize_for_model(image.convert("RGB"), config))
    _, h, w = arr.shape
    return patchify(pixel_values(arr, config)[None]), [1, h // PATCH, w // PATCH]


def video_to_patches(clip: VideoClip, config: ImageProcessorConfig) -> tuple[torch.Tensor, list[list[int]]]:
    """All frames of a clip → (patches in frame order, per-frame grids ``[1, h/14, w/14]``); no second resize."""
    patches = [patchify(pixel_values(pixels[None], config)) for pixels in clip_pixels(clip)]
    return torch.cat(patches), video_grids(clip)


def video_grids(clip: VideoClip) -> list[list[int]]:
    """Per-frame grids ``[1, h/14, w/14]`` of a clip (slow or fast size), without touching pixels."""
    return [[1, clip.frame_hw(j)[0] // PATCH, clip.frame_hw(j)[1] // PATCH] for j in range(clip.num_frames)]
