"""Small builders shared by the spine tests: a micro Keye config, synthetic clips and images."""

from __future__ import annotations

import torch
from PIL import Image

from data_pipelines.media import VideoClip
from keye.configuration import KeyeVLConfig


def micro_config(text: dict | None = None, vision: dict | None = None, **overrides) -> KeyeVLConfig:
    """Smaller than configs/model/tiny.yaml in width and depth (same tokenizer-sized vocabulary).

    ``text`` / ``vision`` change single fields of the text / vision config; ``overrides`` replace top-level ones.
    """
    cfg = dict(
        text_config=dict(
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                vocab_size=151936,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                pad_token_id=151643,
                eos_token_id=[151645, 151643],
            ),
            **(text or {}),
        ),
        vision_config=dict(
            dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=112),
            **(vision or {}),
        ),
        attn_backend="sdpa",
    )
    cfg.update(overrides)
    return KeyeVLConfig(**cfg)


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr)


def random_clip(n: int = 4, types=(0, 1, 1, 0), slow_hw=(56, 84), fast_hw=(28, 56), seed: int = 0) -> VideoClip:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (n, 3, 60, 90), generator=g, dtype=torch.uint8)
    return VideoClip(
        frames=frames,
        timestamps=[0.5 * i for i in range(n)],
        frame_types=list(types)[:n],
        slow_hw=slow_hw,
        fast_hw=fast_hw,
        frame_indices=list(range(n)),
    )
