"""``KeyeVL1_5ImageProcessor``: the released checkpoint's image processor (``preprocessor_config.json``).

What the released pipeline does after keye-vl-utils has read the media (its stage 2): an image is resized to
``smart_resize(h, w, 28, min_pixels, max_pixels)`` of the checkpoint's limits with PIL bilinear, rescaled by
``rescale_factor`` (float64 product, stored float32) and normalised with ``image_mean``/``image_std``; a video's slow
or fast frames arrive with their sizes from keye-vl-utils and are resized there with antialiased bilinear
interpolation (``resize_frames``), not again here. Output patches are ``[N, 3, 14, 14]`` in row-major (h, w) order
per image or frame, grids ``[1, h/14, w/14]``.

Checkpoints carry this file as remote code (``keye.remote_code``), so it imports only torch, numpy, PIL,
transformers and the bundled ``smart_resize``; vLLM and ``AutoProcessor(..., trust_remote_code=True)`` use it.
The project's own processor (``keye.processing``) encodes with the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from data_pipelines.resize import smart_resize

PATCH_SIZE = 14
MERGE_SIZE = 2
# Keye-VL 1.5's published preprocessor_config.json values.
DEFAULT_MIN_PIXELS = 3136
DEFAULT_MAX_PIXELS = 1003520
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
DEFAULT_RESCALE = 1 / 255


def resize_image(
    image: Image.Image, min_pixels: int, max_pixels: int, factor: int = 28, resample: int = Image.Resampling.BILINEAR
) -> Image.Image:
    """Stage 2 of the released image path: PIL ``resample`` (bilinear) to ``smart_resize`` of the checkpoint's
    limits, as transformers' ``image_transforms.resize`` does (PIL returns a copy when the size is unchanged).
    ``smart_resize`` raises ``ValueError`` for an aspect ratio above 200."""
    width, height = image.size
    h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
    return image.resize((w, h), resample=resample)


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]`` frames → ``[T, 3, height, width]`` with antialiased bilinear (the released video path)."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return torch.nn.functional.interpolate(frames, [height, width], mode="bilinear", antialias=True)


def rescale_normalize(
    pixels: torch.Tensor,
    rescale_factor: float | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` → float32 ``(x · rescale_factor − mean) / std``, bit-identical to transformers'
    ``rescale`` (a float64 product stored as float32) followed by ``normalize`` (float32). ``None`` skips a step."""
    if rescale_factor is not None:
        x = (pixels.to(torch.float64) * rescale_factor).to(torch.float32)
    else:
        x = pixels.to(torch.float32)
    if mean is not None and std is not None:
        x = (x - torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)) / torch.tensor(std, dtype=torch.float32).view(
            3, 1, 1
        )
    return x


def to_patches(pixels: torch.Tensor, patch: int = PATCH_SIZE) -> tuple[torch.Tensor, list[list[int]]]:
    """``[T, 3, H, W]`` → (patches ``[T·(H/p)·(W/p), 3, p, p]`` row-major per frame, grids ``[[1, H/p, W/p]] × T``)."""
    t, c, h, w = pixels.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    x = pixels.reshape(t, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c, patch, patch), [[1, h // patch, w // patch]] * t


def image_to_uint8(image) -> torch.Tensor:
    """A PIL image, ``[H, W, 3]`` array or ``[3, H, W]`` tensor → uint8 ``[3, H, W]``."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    array = torch.as_tensor(np.asarray(image))
    if array.ndim == 3 and array.shape[-1] == 3 and array.shape[0] != 3:
        array = array.permute(2, 0, 1)
    return array.to(torch.uint8)


def frames_to_uint8(frames) -> torch.Tensor:
    """A video as ``[T, 3, H, W]`` or ``[T, H, W, 3]`` (tensor or array) or a list of frames → uint8 ``[T, 3, H, W]``."""
    if isinstance(frames, (list, tuple)):
        return torch.stack([image_to_uint8(f) for f in frames])
    array = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    if array.ndim == 4 and array.shape[1] != 3 and array.shape[-1] == 3:
        array = array.permute(0, 3, 1, 2)
    return array.to(torch.uint8)


class KeyeVL1_5ImageProcessor(BaseImageProcessor):
    """Images: stage-2 resize, rescale, normalise, patchify. Videos: rescale, normalise, patchify (sized upstream)."""

    model_input_names = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]

    def __init__(
        self,
        do_resize: bool = True,
        resample: int = 2,
        do_rescale: bool = True,
        rescale_factor: float = DEFAULT_RESCALE,
        do_normalize: bool = True,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        do_convert_rgb: bool = True,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        patch_size: int = PATCH_SIZE,
        temporal_patch_size: int = 1,
        merge_size: int = MERGE_SIZE,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if temporal_patch_size != 1:
            raise ValueError(
                f"Keye-VL 1.5 patches single frames: temporal_patch_size must be 1, got {temporal_patch_size}"
            )
        self.do_resize = do_resize
        self.resample = resample
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean if image_mean is not None else DEFAULT_MEAN)
        self.image_std = list(image_std if image_std is not None else DEFAULT_STD)
        self.do_convert_rgb = do_convert_rgb
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.patch_size = int(patch_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.merge_size = int(merge_size)
        self.size = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}

    def image_patches(self, image, do_resize: bool | None = None) -> tuple[torch.Tensor, list[int]]:
        """One image → (patches ``[N, 3, 14, 14]``, grid ``[1, h/14, w/14]``)."""
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
            if self.do_resize if do_resize is None else do_resize:
                factor = self.patch_size * self.merge_size
                image = resize_image(image, self.min_pixels, self.max_pixels, factor, self.resample)
        pixels = self.rescale_normalize(image_to_uint8(image)[None])
        patches, grids = to_patches(pixels, self.patch_size)
        return patches, grids[0]

    def frame_patches(self, frames: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
        """uint8 frames ``[T, 3, h, w]``, already at their slow or fast size → (patches, per-frame grids)."""
        return to_patches(self.rescale_normalize(frames), self.patch_size)

    def rescale_normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return rescale_normalize(
            pixels,
            self.rescale_factor if self.do_rescale else None,
            self.image_mean if self.do_normalize else None,
            self.image_std if self.do_normalize else None,
        )

    def preprocess(self, images=None, videos=None, do_resize: bool | None = None, return_tensors=None, **kwargs):
        """``images``: PIL images (resized to the checkpoint's limits); ``videos``: frame stacks at final size."""
        data: dict[str, torch.Tensor] = {}
        if images is not None:
            images = images if isinstance(images, (list, tuple)) else [images]
            parts = [self.image_patches(image, do_resize) for image in images]
            data["pixel_values"] = torch.cat([p for p, _ in parts])
            data["image_grid_thw"] = torch.tensor([g for _, g in parts], dtype=torch.long)
        if videos is not None:
            parts = [self.frame_patches(frames_to_uint8(v)) for v in videos]
            data["pixel_values_videos"] = torch.cat([p for p, _ in parts])
            data["video_grid_thw"] = torch.tensor([g for _, grids in parts for g in grids], dtype=torch.long)
        return BatchFeature(data=data, tensor_type=return_tensors)
