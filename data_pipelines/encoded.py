"""Tokenised samples and packed rows: the tensors that flow from the processor to the model.

``EncodedSample`` is what ``KeyeVLProcessor.encode_conversation`` returns for one conversation;
``PackedBatch`` is one or more samples concatenated into a single row (``cu_seqlens`` marks their
boundaries), which is what the trainer feeds to ``KeyeVLForConditionalGeneration.forward``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


@dataclass
class EncodedSample:
    """One conversation, tokenised, with its visual inputs.

    - ``input_ids``/``labels``: ``[L]`` long; labels are ``IGNORE_INDEX`` outside assistant answers.
    - ``position_ids``: ``[3, L]`` multimodal rotary positions (temporal, height, width), starting at 0.
    - ``pixel_values``: ``[N_img_patches, 3*14*14]`` float, patches of all images in order.
    - ``image_grid_thw``: ``[n_images, 3]`` long, (1, h/14, w/14) per image.
    - ``pixel_values_videos``: ``[N_vid_patches, 3*14*14]``; ``video_grid_thw``: ``[n_frames, 3]``, one
      (1, h/14, w/14) row per frame (the model also accepts run-length merged rows).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    source: str = ""
    sample_id: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def visual_inputs(self) -> dict[str, torch.Tensor | None]:
        """Patches and grids as the model's ``forward``/``generate`` take them (with ``input_ids[None]``)."""
        return {
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
            "pixel_values_videos": self.pixel_values_videos,
            "video_grid_thw": self.video_grid_thw,
        }

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_visual_tokens(self) -> int:
        """Image and video placeholder tokens (what the ViT + projector fill in)."""
        from keye.configuration import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID

        return int(((self.input_ids == IMAGE_TOKEN_ID) | (self.input_ids == VIDEO_TOKEN_ID)).sum())


@dataclass
class PackedBatch:
    """Samples packed into ``B`` rows (usually 1) with ``cu_seqlens`` over the flattened rows.

    ``input_ids``/``labels``: ``[B, L]``; ``position_ids``: ``[3, B, L]``; ``cu_seqlens``: ``[n_samples+1]``
    int32 offsets into the flattened ``B*L`` tokens (padding at the end of a row is its own segment
    with labels ``IGNORE_INDEX``). Visual tensors are concatenated in sample order.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    num_samples: int = 0
    sample_ids: list[str] = field(default_factory=list)

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments for ``KeyeVLForConditionalGeneration.forward``."""
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
            "pixel_values_videos": self.pixel_values_videos,
            "video_grid_thw": self.video_grid_thw,
        }

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PackedBatch(**moved)
