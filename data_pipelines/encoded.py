"""Tokenised samples and packed rows: the tensors that flow from the processor to the model.

``EncodedSample`` is what ``KeyeVLProcessor.encode_conversation`` returns for one conversation;
``PackedBatch`` is one or more samples concatenated into a single row (``cu_seqlens`` marks their
boundaries), which is what the trainer feeds to ``KeyeVLForConditionalGeneration.forward``. Both carry their
images' and videos' patches as one ``VisualInputs`` and the ``TokenIds`` their placeholder tokens use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenIds:
    """The special token ids of one checkpoint that encoding, packing and sequence-parallel sharding depend on.

    ``KeyeVLProcessor`` builds them from the model config (``KeyeVLConfig``'s ``*_token_id`` fields) and its
    tokenizer's padding token; every sample it encodes carries them, and the packer checks they are the ids it
    was built with (the checkpoint's).
    """

    image: int
    video: int
    vision_start: int
    vision_end: int
    frame: int
    fast_start: int
    fast_end: int
    pad: int

    @classmethod
    def from_config(cls, config: Any, pad: int) -> TokenIds:
        """From a ``KeyeVLConfig`` (``image`` from ``config.image_token_id``, …) and the padding token's id."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "pad"]
        return cls(**{name: int(getattr(config, f"{name}_token_id")) for name in names}, pad=int(pad))


@dataclass
class VisualInputs:
    """The patches and grids of a sample's (or a row's) images and videos, named as the model's ``forward`` takes them.

    - ``pixel_values``: ``[N_img_patches, 3*14*14]`` float, patches of all images in order.
    - ``image_grid_thw``: ``[n_images, 3]`` long, (1, h/14, w/14) per image.
    - ``pixel_values_videos``: ``[N_vid_patches, 3*14*14]``; ``video_grid_thw``: ``[n_frames, 3]``, one
      (1, h/14, w/14) row per frame (the model also accepts run-length merged rows).
    """

    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None

    def kinds(self) -> tuple[tuple[str, torch.Tensor | None, torch.Tensor | None], ...]:
        """``("image", pixels, grid)`` and ``("video", pixels, grid)``."""
        image = ("image", self.pixel_values, self.image_grid_thw)
        return image, ("video", self.pixel_values_videos, self.video_grid_thw)

    @property
    def has_pixels(self) -> bool:
        return any(p is not None and p.numel() > 0 for _, p, _ in self.kinds())

    def as_kwargs(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments for ``KeyeVLForConditionalGeneration.forward``/``generate``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to(self, device: torch.device | str) -> VisualInputs:
        return VisualInputs(**{k: None if v is None else v.to(device) for k, v in self.as_kwargs().items()})

    @staticmethod
    def concat(parts: Iterable[VisualInputs]) -> VisualInputs:
        """Several samples' (or rows') visual inputs in order; a tensor none of them has stays ``None``."""
        parts = list(parts)

        def cat(name: str) -> torch.Tensor | None:
            present = [t for p in parts if (t := getattr(p, name)) is not None and t.shape[0] > 0]
            return torch.cat(present) if present else None

        return VisualInputs(**{f.name: cat(f.name) for f in dataclasses.fields(VisualInputs)})


@dataclass
class EncodedSample:
    """One conversation, tokenised, with its visual inputs.

    - ``input_ids``/``labels``: ``[L]`` long; labels are ``IGNORE_INDEX`` outside assistant answers.
    - ``position_ids``: ``[3, L]`` multimodal rotary positions (temporal, height, width), starting at 0.
    - ``token_ids``: the ids its placeholders and layout tokens use (the encoding processor's).
    - ``visual``: the patches and grids of its images and videos.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    token_ids: TokenIds
    visual: VisualInputs = field(default_factory=VisualInputs)
    source: str = ""
    sample_id: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_visual_tokens(self) -> int:
        """Image and video placeholder tokens (what the ViT + projector fill in)."""
        ids = self.token_ids
        return int(((self.input_ids == ids.image) | (self.input_ids == ids.video)).sum())


@dataclass
class PackedBatch:
    """Samples packed into ``B`` rows (usually 1) with ``cu_seqlens`` over the flattened rows.

    ``input_ids``/``labels``: ``[B, L]``; ``position_ids``: ``[3, B, L]``; ``cu_seqlens``: ``[n_samples+1]``
    int32 offsets into the flattened ``B*L`` tokens (padding at the end of a row is its own segment
    with labels ``IGNORE_INDEX``). ``token_ids`` are its samples'; visual inputs are concatenated in sample order.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    token_ids: TokenIds
    visual: VisualInputs = field(default_factory=VisualInputs)
    num_samples: int = 0
    sample_ids: list[str] = field(default_factory=list)

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments for ``KeyeVLForConditionalGeneration.forward``."""
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
            **self.visual.as_kwargs(),
        }

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {
            k: (v.to(device) if isinstance(v, (torch.Tensor, VisualInputs)) else v) for k, v in self.__dict__.items()
        }
        return PackedBatch(**moved)
