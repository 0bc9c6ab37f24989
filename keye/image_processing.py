"""Pixels → flat ViT patches, in the row-major (t, h, w) order the vision tower expects.

Images arrive already resized to multiples of 28 (``data_pipelines.image_reader.load_image``); video frames
arrive at decoded size (or smaller, for long videos) and are resized here to the slow or fast resolution chosen by
the Slow-Fast selection, before rescaling, as Hugging Face image processors do: uint8 antialiased bilinear
(``data_pipelines.video_reader.clip_pixels``; ~12x cheaper than resizing float frames, measured).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from data_pipelines.media import VideoClip
from data_pipelines.video_reader import clip_pixels

PATCH = 14
IMAGE_MEAN = (0.5, 0.5, 0.5)  # SigLIP normalisation (Keye-VL Preview preprocessor_config)
IMAGE_STD = (0.5, 0.5, 0.5)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` → float32 rescaled by 1/255 and normalised with SigLIP mean/std."""
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def patchify(pixels: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """``[T, 3, H, W]`` → ``[T·(H/p)·(W/p), 3·p·p]``, patches row-major within each frame."""
    t, c, h, w = pixels.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    x = pixels.reshape(t, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(t * (h // patch) * (w // patch), c * patch * patch)


def image_to_patches(image: Image.Image) -> tuple[torch.Tensor, list[int]]:
    """A resized RGB image → (patches, grid ``[1, h/14, w/14]``)."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    _, h, w = arr.shape
    return patchify(normalize(arr)[None]), [1, h // PATCH, w // PATCH]


def video_to_patches(clip: VideoClip) -> tuple[torch.Tensor, list[list[int]]]:
    """All frames of a clip → (patches in frame order, per-frame grids ``[1, h/14, w/14]``)."""
    patches = [patchify(normalize(pixels[None])) for pixels in clip_pixels(clip)]
    grids = [[1, clip.frame_hw(j)[0] // PATCH, clip.frame_hw(j)[1] // PATCH] for j in range(clip.num_frames)]
    return torch.cat(patches), grids


def merge_grids(grids: list[list[int]]) -> list[list[int]]:
    """Run-length merge consecutive identical per-frame grids into ``[k, h, w]`` rows (the released format)."""
    merged: list[list[int]] = []
    for t, h, w in grids:
        if merged and merged[-1][1:] == [h, w]:
            merged[-1][0] += t
        else:
            merged.append([t, h, w])
    return merged
