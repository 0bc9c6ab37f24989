"""Our encoded prompts as vLLM requests, without vLLM: token ids, images, video frames and Slow-Fast kwargs.

vLLM's multimodal processor always expands each visual item from one placeholder token, so the request carries our
ids with each item's expansion collapsed back to ``<|vision_start|><|image_pad|><|vision_end|>`` (or the video pad),
plus the pixels that expansion was computed from. The engine then checks that vLLM's expanded prompt equals our
ids token for token, which catches any disagreement on visual token counts, timestamps or Slow-Fast markers.

- Images are recovered exactly from our patches (uint8 → rescale/normalise is invertible after rounding), at the
  size our second resize chose; the checkpoint's processor leaves an image of that size as it is.
- Video frames cannot be recovered that way (a clip mixes slow and fast frame sizes and vLLM takes one frame
  stack), so :class:`ClipRecordingProcessor` keeps the decoded clip on the sample (``meta["videos"]``) and the
  request carries its frames at decoded size with our frame types, timestamps and slow/fast sizes; the
  checkpoint's processor resizes them exactly as ours does (tests/test_vllm.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from data_pipelines.encoded import EncodedSample, TokenIds
from data_pipelines.media import VideoClip
from keye.image_processing import PATCH
from keye.preprocessor_config import ImageProcessorConfig
from keye.processing import KeyeVLProcessor

VIDEOS_META = "videos"  # EncodedSample.meta key: the decoded clips, in prompt order


class ClipRecordingProcessor(KeyeVLProcessor):
    """A processor that keeps the clips it decodes on the sample it returns (``meta["videos"]``).

    Only the vLLM engine uses it: a training sample must not hold decoded frames (data-loader workers pickle
    samples), but a prompt for vLLM needs them (see the module docstring).
    """

    _clips: list[VideoClip] | None = None

    @classmethod
    def wrap(cls, processor: KeyeVLProcessor) -> ClipRecordingProcessor:
        wrapped = cls(processor.tokenizer, processor.config, processor.image_config)
        wrapped.token_ids = processor.token_ids
        return wrapped

    def load_video_item(self, item: dict, media_root: str | Path | None) -> VideoClip:
        clip = super().load_video_item(item, media_root)
        if self._clips is not None:
            self._clips.append(clip)
        return clip

    def encode_conversation(self, messages: Sequence[dict], *args: Any, **kwargs: Any) -> EncodedSample:
        self._clips = []
        try:
            sample = super().encode_conversation(messages, *args, **kwargs)
            if self._clips:
                sample.meta = {**sample.meta, VIDEOS_META: list(self._clips)}
        finally:
            self._clips = None
        return sample


def collapse_visual_tokens(ids: Sequence[int], token_ids: TokenIds) -> list[int]:
    """``ids`` with the inside of every ``<|vision_start|> … <|vision_end|>`` span holding image or video pads
    replaced by one pad: the form vLLM expands itself."""
    t = token_ids
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        token = ids[i]
        out.append(token)
        i += 1
        if token != t.vision_start:
            continue
        try:
            end = ids.index(t.vision_end, i)
        except ValueError:
            raise ValueError(f"prompt has <|vision_start|> at {i - 1} without <|vision_end|>") from None
        inner = ids[i:end]
        if t.image in inner:
            out.append(t.image)
        elif t.video in inner:
            out.append(t.video)
        else:
            out.extend(inner)
        out.append(t.vision_end)
        i = end + 1
    return out


def patches_to_images(
    pixel_values: torch.Tensor, grids: torch.Tensor, config: ImageProcessorConfig
) -> list[Image.Image]:
    """The uint8 images our patches were made from (inverse of ``keye.image_processing.image_to_patches`` after
    its resize): patches ``[N, 3·14·14]`` row-major per image, grids ``[n, 3]`` of ``(1, h, w)`` patches."""
    images = []
    offset = 0
    for t, h, w in grids.tolist():
        if t != 1:
            raise ValueError(f"an image grid has t={t}, expected 1")
        chunk = pixel_values[offset : offset + h * w].float().view(h, w, 3, PATCH, PATCH)
        offset += h * w
        x = chunk.permute(2, 0, 3, 1, 4).reshape(3, h * PATCH, w * PATCH).double()
        if config.do_normalize:
            x = x * torch.tensor(config.image_std, dtype=torch.float64).view(3, 1, 1)
            x = x + torch.tensor(config.image_mean, dtype=torch.float64).view(3, 1, 1)
        if config.do_rescale:
            x = x / config.rescale_factor
        pixels = x.round().clamp(0, 255).to(torch.uint8)
        images.append(Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy()))
    if offset != pixel_values.shape[0]:
        raise ValueError(f"image grids cover {offset} patches, pixel_values has {pixel_values.shape[0]}")
    return images


def video_kwargs(clips: Sequence[VideoClip]) -> dict[str, list]:
    """Per-video processor kwargs as keye-vl-utils' ``process_vision_info`` returns them for vLLM (frame types and
    timestamps as tensors: vLLM hashes the kwargs, and the values are the float32 seconds our timestamps hold)."""
    kwargs: dict[str, list] = {
        "frame_types": [torch.tensor(c.frame_types, dtype=torch.int32) for c in clips],
        "height": [c.slow_hw[0] for c in clips],
        "width": [c.slow_hw[1] for c in clips],
        "fast_height": [c.fast_hw[0] for c in clips],
        "fast_width": [c.fast_hw[1] for c in clips],
    }
    if any(c.timestamps for c in clips):
        kwargs["timestamps"] = [
            torch.tensor(c.timestamps, dtype=torch.float32) if c.timestamps else None for c in clips
        ]
    return kwargs


def vllm_prompt(sample: EncodedSample, config: ImageProcessorConfig) -> dict[str, Any]:
    """A vLLM ``TokensPrompt`` (plain dict) for one encoded prompt; see the module docstring."""
    prompt: dict[str, Any] = {"prompt_token_ids": collapse_visual_tokens(sample.input_ids.tolist(), sample.token_ids)}
    mm: dict[str, Any] = {}
    visual = sample.visual
    if visual.pixel_values is not None and visual.image_grid_thw is not None:
        images = patches_to_images(visual.pixel_values, visual.image_grid_thw, config)
        mm["image"] = images if len(images) > 1 else images[0]
    if visual.pixel_values_videos is not None:
        clips = sample.meta.get(VIDEOS_META)
        if not clips:
            raise ValueError(
                f"sample {sample.sample_id or '?'} has video patches but no decoded clips: encode prompts for the "
                "vLLM engine with its processor (engine.processor / engine.encode)"
            )
        mm["video"] = [c.frames for c in clips] if len(clips) > 1 else clips[0].frames
        prompt["mm_processor_kwargs"] = video_kwargs(clips)
    if mm:
        prompt["multi_modal_data"] = mm
    return prompt
