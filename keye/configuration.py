"""``KeyeVLConfig``: a SigLIP-style native-resolution ViT, the 1.5 projector, and a Qwen3 text config.

Field names follow the released Keye-VL 1.5 checkpoint and transformers' VL models (``vision_config``,
``text_config``, ``image_token_id`` …) so configs round-trip through ``save_pretrained``/``from_pretrained``.
"""

from __future__ import annotations

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


class KeyeVLConfig(PreTrainedConfig):
    """Top-level config: ``vision_config`` (KeyeVisionConfig), ``text_config`` (Qwen3Config), token ids.

    ``mrope_section`` splits the text head's rotary frequencies over the (temporal, height, width) axes and
    must sum to ``head_dim // 2``. ``attn_backend`` picks the varlen attention backend (``auto``,
    ``flash_attn``, ``torch_varlen``, ``sdpa``; see ``keye.attention``).
    """

    model_type = "keye_vl_1_5"
    sub_configs = {"vision_config": KeyeVisionConfig, "text_config": Qwen3Config}
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
            self.vision_config = KeyeVisionConfig(**self.vision_config)
        elif self.vision_config is None:
            self.vision_config = KeyeVisionConfig()
        if isinstance(self.text_config, dict):
            text = dict(self.text_config)
            text.pop("model_type", None)
            self.text_config = Qwen3Config(**text)
        elif self.text_config is None:
            self.text_config = Qwen3Config()
        head_dim = self.text_config.head_dim
        if self.mrope_section is None:
            # Keye-VL 1.5: [16, 24, 24] for head_dim 128; scale the same proportions for other head sizes.
            quarter = head_dim // 8
            self.mrope_section = [
                quarter,
                (head_dim // 2 - quarter) // 2,
                head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2,
            ]
        self.mrope_section = [int(s) for s in self.mrope_section]
        if sum(self.mrope_section) != head_dim // 2 or len(self.mrope_section) != 3:
            raise ValueError(
                f"mrope_section {self.mrope_section} must have 3 parts summing to text head_dim/2 = {head_dim // 2}"
            )
        super().__post_init__(**kwargs)


def _field_names(cls) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)}


def load_model_config(path: str, overrides: list[str] | None = None) -> KeyeVLConfig:
    """A ``KeyeVLConfig`` from a model YAML (``configs/model/*.yaml``) plus ``key.sub=value`` overrides.

    Unknown keys are errors naming the key and the file (transformers configs would silently keep them).
    """
    from omegaconf import OmegaConf

    from keye.typed_config import ConfigError, read_yaml

    data = OmegaConf.create(read_yaml(path))
    if overrides:
        data = OmegaConf.merge(data, OmegaConf.from_dotlist(list(overrides)))
    raw = OmegaConf.to_container(data)
    source = f"{path}{' + overrides' if overrides else ''}"
    schemas = {"": KeyeVLConfig, "vision_config.": KeyeVisionConfig, "text_config.": Qwen3Config}
    for prefix, cls in schemas.items():
        section = raw if not prefix else raw.get(prefix[:-1], {}) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: '{prefix[:-1]}' must be a mapping")
        unknown = sorted(set(section) - _field_names(cls) - {"model_type"})
        if unknown:
            raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' for {cls.__name__}")
    return KeyeVLConfig(**raw)
