"""Model configs from YAML (``configs/model/*.yaml``) with ``key.sub=value`` overrides, checked at load time.

Kept apart from ``keye.configuration`` (which checkpoints carry as remote code and so imports only transformers).
"""

from __future__ import annotations

import dataclasses

from transformers import Qwen3Config

from keye.configuration import KeyeVisionConfig, KeyeVLConfig


def _field_names(cls) -> set[str]:
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
