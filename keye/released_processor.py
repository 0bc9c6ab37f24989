"""``KeyeVL1_5Processor``: the released checkpoint's text-level processor, for tools that speak strings.

vLLM and ``AutoProcessor.from_pretrained(CKPT, trust_remote_code=True)`` load it from the checkpoint (it is remote
code there, written by ``keye.remote_code``, and imports only transformers, torch, numpy and PIL). It takes a
prompt whose ``<|image_pad|>``/``<|video_pad|>`` stand for whole images/videos plus what keye-vl-utils'
``process_vision_info`` returns (images, frame stacks, and per-video ``width``, ``height``, ``fast_width``,
``fast_height``, ``timestamps``, ``frame_types``) and expands each video frame to ``<|frame|>`` + its timestamp
(``data_pipelines.media.timestamp_text``: ``format(ts, ".1f")`` of the float32 value) + the frame's pads, fast
frames between ``<|fast_start|>`` and ``<|fast_end|>``. The project's own encoder (``keye.processing``) builds the same ids directly from token ids;
``tests/test_released_layout.py`` checks the two agree, ids and pixels.
"""

from __future__ import annotations

from typing import TypedDict

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from data_pipelines.media import timestamp_text
from data_pipelines.resize import smart_resize
from keye.released_image_processor import frames_to_uint8, resize_frames

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
FRAME_TOKEN = "<|frame|>"
FAST_START = "<|fast_start|>"
FAST_END = "<|fast_end|>"
_SLOT = "\x00keye-slot\x00"  # stands in for expanded pads while placeholders are being replaced


def merge_grids(grids: list[list[int]]) -> list[list[int]]:
    """Run-length merge consecutive identical per-frame grids into ``[k, h, w]`` rows (the released format)."""
    merged: list[list[int]] = []
    for t, h, w in grids:
        if merged and merged[-1][1:] == [h, w]:
            merged[-1][0] += t
        else:
            merged.append([t, h, w])
    return merged


class KeyeVL1_5VideosKwargs(TypedDict, total=False):
    """Per-call video arguments (keye-vl-utils' ``process_vision_info`` kwargs)."""

    width: list
    height: list
    fast_width: list
    fast_height: list
    timestamps: list
    frame_types: list
    fps: list


class KeyeVL1_5ProcessorKwargs(TypedDict, total=False):
    """Declares which ``__call__`` arguments vary per request: vLLM builds (and caches) the processor from the other
    kwargs it is given, so without this every video's Slow-Fast kwargs would load the processor anew (~8 s each)."""

    videos_kwargs: KeyeVL1_5VideosKwargs


def _per_video(value, n: int, name: str) -> list:
    if value is None:
        return [None] * n
    if not isinstance(value, (list, tuple)) or (n == 1 and len(value) != 1):
        value = [value]
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} videos")
    return list(value)


class KeyeVL1_5Processor(ProcessorMixin):
    """Tokenizer + ``KeyeVL1_5ImageProcessor``; see the module docstring for the inputs."""

    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        self.image_token = IMAGE_TOKEN
        self.video_token = VIDEO_TOKEN
        self.frame_token = FRAME_TOKEN
        self.fast_start = FAST_START
        self.fast_end = FAST_END
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def _video_inputs(self, frames, frame_types, size, fast_size):
        """One video → (per-frame patches, per-frame grids, frame types list)."""
        frames = frames_to_uint8(frames)
        n = int(frames.shape[0])
        if n == 0:
            raise ValueError("a video has no frames")
        types = [0] * n if frame_types is None else [int(t) for t in torch.as_tensor(frame_types).tolist()]
        if len(types) != n:
            raise ValueError(f"frame_types has {len(types)} entries for {n} frames")
        ip = self.image_processor
        factor = ip.patch_size * ip.merge_size
        _, _, height, width = frames.shape
        default = smart_resize(int(height), int(width), factor, ip.min_pixels, ip.max_pixels)
        sizes = {0: size if None not in size else default, 1: fast_size if None not in fast_size else default}
        patches, grids = [], []
        for j, kind in enumerate(types):
            h, w = sizes[kind]
            p, g = ip.frame_patches(resize_frames(frames[j : j + 1], int(h), int(w)))
            patches.append(p)
            grids.extend(g)
        return patches, grids, types

    def __call__(
        self,
        text=None,
        images=None,
        videos=None,
        width=None,
        height=None,
        fast_width=None,
        fast_height=None,
        timestamps=None,
        frame_types=None,
        fps=None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        """Token ids and visual inputs: ``pixel_values`` ``[N, 3, 14, 14]``, ``image_grid_thw``,
        ``pixel_values_videos``, ``video_grid_thw`` (run-length merged per video) and ``num_frames``."""
        texts = [text] if isinstance(text, str) else list(text or [""])
        data: dict[str, torch.Tensor] = {}
        merge = self.image_processor.merge_size**2
        if images is not None:
            data.update(self.image_processor(images=images))
            pads = iter([IMAGE_TOKEN * (int(g.prod()) // merge) for g in data["image_grid_thw"]])
            texts = [self._replace(t, IMAGE_TOKEN, pads) for t in texts]
        if videos is not None:
            videos = list(videos) if isinstance(videos, (list, tuple)) else [videos]
            n = len(videos)
            per = {
                name: _per_video(value, n, name)
                for name, value in (
                    ("width", width),
                    ("height", height),
                    ("fast_width", fast_width),
                    ("fast_height", fast_height),
                    ("timestamps", timestamps),
                    ("frame_types", frame_types),
                )
            }
            all_patches, all_grids, num_frames, expansions = [], [], [], []
            for i, frames in enumerate(videos):
                patches, grids, types = self._video_inputs(
                    frames,
                    per["frame_types"][i],
                    (per["height"][i], per["width"][i]),
                    (per["fast_height"][i], per["fast_width"][i]),
                )
                stamps = per["timestamps"][i]
                if stamps is not None and len(stamps) != len(types):
                    raise ValueError(f"video {i}: {len(stamps)} timestamps for {len(types)} frames")
                pieces = []
                for j, (kind, (_, h, w)) in enumerate(zip(types, grids)):
                    pads = VIDEO_TOKEN * (h * w // merge)
                    stamp = timestamp_text(stamps[j]) if stamps is not None else ""
                    pieces.append(FRAME_TOKEN + stamp + (FAST_START + pads + FAST_END if kind == 1 else pads))
                expansions.append("".join(pieces))
                all_patches.extend(patches)
                all_grids.extend(merge_grids(grids))
                num_frames.append(len(types))
            remaining = iter(expansions)
            texts = [self._replace(t, VIDEO_TOKEN, remaining) for t in texts]
            data["pixel_values_videos"] = torch.cat(all_patches)
            data["video_grid_thw"] = torch.tensor(all_grids, dtype=torch.long)
            data["num_frames"] = torch.tensor(num_frames, dtype=torch.long)
        kwargs.pop("return_mm_token_type_ids", None)
        text_inputs = self.tokenizer(texts, return_tensors=return_tensors, **kwargs)
        return BatchFeature(data={**text_inputs, **data}, tensor_type=return_tensors)

    @staticmethod
    def _replace(text: str, token: str, expansions) -> str:
        """Each ``token`` in ``text`` → the next expansion (placeholders inside expansions are left alone)."""
        parts = text.split(token)
        out = [parts[0]]
        for part in parts[1:]:
            try:
                out.append(next(expansions).replace(token, _SLOT))
            except StopIteration:
                raise ValueError(f"more {token} placeholders in the prompt than inputs were given") from None
            out.append(part)
        return "".join(out).replace(_SLOT, token)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names) + ["num_frames"]
