"""``KeyeVLConfig``: a SigLIP-style native-resolution ViT, the 1.5 projector, and a Qwen3 text config.

In memory the text model is ``config.text_config`` (a ``Qwen3Config``), as in transformers' VL models. On disk
``config.json`` has the released Keye-VL 1.5 layout, the one vLLM's ``KeyeVL1_5ForConditionalGeneration`` reads:
the text model's fields at the top level (vLLM builds its Qwen3 from there), ``mrope_section`` inside
``rope_parameters``, ``vision_config`` nested, and ``auto_map`` pointing at the remote-code files every checkpoint
carries (``keye.remote_code``). Both layouts load: configs written by earlier versions (a nested ``text_config``),
model YAMLs, and the released model's own ``config.json``.

This module imports only transformers: it is copied into checkpoints as remote code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedConfig, Qwen3Config

# Token ids of the Qwen3 tokenizer plus Keye's added tokens (KEYE_FACTS Part A §2).
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
FRAME_TOKEN_ID = 151675
FAST_START_TOKEN_ID = 151676
FAST_END_TOKEN_ID = 151677


class KeyeVisionConfig(PreTrainedConfig):
    """The ViT: SigLIP-so400m-patch14-384 shapes by default (1152 wide, 27 layers, 16 heads)."""

    model_type = "keye_vl_1_5_vision"
    base_config_key = "vision_config"

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    spatial_merge_size: int = 2
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError("vision head_dim must be a multiple of 4 (two rotary axes, rotate-half)")
        super().__post_init__(**kwargs)


class KeyeTextConfig(Qwen3Config):
    """Qwen3's config whose ``rope_parameters`` also carry ``mrope_section`` (as vLLM reads the text model's rope)."""

    model_type = "keye_vl_1_5_text"
    base_config_key = "text_config"
    ignore_keys_at_rope_validation = {"mrope_section"}


class KeyeVLConfig(PreTrainedConfig):
    """Top-level config: ``vision_config`` (KeyeVisionConfig), ``text_config`` (Qwen3Config), token ids.

    ``mrope_section`` splits the text head's rotary frequencies over the (temporal, height, width) axes and
    must sum to ``head_dim // 2``. ``attn_backend`` picks the varlen attention backend (``auto``,
    ``flash_attn``, ``torch_varlen``, ``sdpa``; see ``keye.attention``).
    """

    model_type = "keye_vl_1_5"
    sub_configs = {"vision_config": KeyeVisionConfig, "text_config": KeyeTextConfig}
    architecture = "KeyeVL1_5ForConditionalGeneration"  # the released name; vLLM's registry finds the model by it
    ignore_keys_at_rope_validation = {"mrope_section"}  # top-level rope_parameters carry it (the released layout)
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = IMAGE_TOKEN_ID
    video_token_id: int = VIDEO_TOKEN_ID
    vision_start_token_id: int = VISION_START_TOKEN_ID
    vision_end_token_id: int = VISION_END_TOKEN_ID
    frame_token_id: int = FRAME_TOKEN_ID
    fast_start_token_id: int = FAST_START_TOKEN_ID
    fast_end_token_id: int = FAST_END_TOKEN_ID
    mrope_section: list[int] | None = None
    projector_layer_norm_eps: float = 1e-5
    attn_backend: str = "auto"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict):
            vision = {k: v for k, v in self.vision_config.items() if k != "model_type"}
            self.vision_config = KeyeVisionConfig(**vision)
        elif self.vision_config is None:
            self.vision_config = KeyeVisionConfig()
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k in TEXT_KEYS | LEGACY_ROPE_KEYS}  # the flat layout
        if isinstance(self.text_config, PreTrainedConfig):
            text = self.text_config.to_dict()
        else:
            text = {**flat, **(self.text_config or {})}
        text.pop("model_type", None)
        text.setdefault("tie_word_embeddings", self.tie_word_embeddings)
        # older configs (the Preview's and earlier transformers'): rope_theta + rope_scaling {"type": "mrope", ...}
        legacy = text.pop("rope_scaling", None) or {}
        theta = text.pop("rope_theta", None)
        rope = dict(text.get("rope_parameters") or {"rope_type": "default", "rope_theta": theta or 1000000.0})
        if self.mrope_section is None and "mrope_section" in legacy:
            self.mrope_section = legacy["mrope_section"]
        if self.mrope_section is None and "mrope_section" in rope:
            self.mrope_section = rope["mrope_section"]
        head_dim = text.get("head_dim") or text.get("hidden_size", 4096) // text.get("num_attention_heads", 32)
        if self.mrope_section is None:
            # Keye-VL 1.5: [16, 24, 24] for head_dim 128; scale the same proportions for other head sizes.
            quarter = head_dim // 8
            self.mrope_section = [
                quarter,
                (head_dim // 2 - quarter) // 2,
                head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2,
            ]
        self.mrope_section = [int(s) for s in self.mrope_section]
        rope["mrope_section"] = list(self.mrope_section)
        text["rope_parameters"] = rope
        self.text_config = KeyeTextConfig(**text)
        self.tie_word_embeddings = bool(self.text_config.tie_word_embeddings)
        head_dim = self.text_config.head_dim
        if sum(self.mrope_section) != head_dim // 2 or len(self.mrope_section) != 3:
            raise ValueError(
                f"mrope_section {self.mrope_section} must have 3 parts summing to text head_dim/2 = {head_dim // 2}"
            )
        super().__post_init__(**kwargs)

    def __getattr__(self, name: str) -> Any:
        """Text-model fields read at the top level (``config.hidden_size``), as vLLM's Qwen3 does."""
        text = self.__dict__.get("text_config")
        if name in TEXT_KEYS and isinstance(text, PreTrainedConfig):
            return getattr(text, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """The released layout: text fields at the top level, ``mrope_section`` in ``rope_parameters``."""
        out = super().to_dict()
        text = out.pop("text_config", None) or self.text_config.to_dict()
        out.pop("mrope_section", None)
        for key in TEXT_KEYS:
            if key in text:
                out[key] = text[key]
        out["architectures"] = [self.architecture]
        out["auto_map"] = dict(AUTO_MAP)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """Every field, not only those that differ from the defaults: other readers (vLLM) see the whole model."""
        return self.to_dict()


# Qwen3 fields that live at the top level of config.json (everything but the generic PreTrainedConfig ones).
TEXT_KEYS = frozenset(
    {f.name for f in dataclasses.fields(Qwen3Config)} - {f.name for f in dataclasses.fields(PreTrainedConfig)}
)
LEGACY_ROPE_KEYS = frozenset({"rope_theta", "rope_scaling"})
# Where transformers' Auto classes (trust_remote_code=True) find the classes; the files are written by
# keye.remote_code into every checkpoint.
AUTO_MAP = {
    "AutoConfig": "configuration_keye_vl_1_5.KeyeVLConfig",
    "AutoModel": "modeling_keye_vl_1_5.KeyeVLForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_keye_vl_1_5.KeyeVLForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_keye_vl_1_5.KeyeVLForConditionalGeneration",
}
