"""Model and processor for a run: load (or randomly create) the model, apply stage overrides, freeze parts.

Parts follow the checkpoint's module names: ``visual.*`` (ViT), ``mlp_AR.*`` (projector), ``model.*`` and
``lm_head.*`` (LLM). Stage 1 trains only the projector; later stages train everything (KEYE_FACTS A §4).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from keye.configuration import KeyeVLConfig, load_model_config
from keye.modeling import KeyeVLForConditionalGeneration
from keye.processing import KeyeVLProcessor
from keye.tokenizer import load_tokenizer
from train.config import ModelConfig

PART_PREFIXES = {"vision": ("visual.",), "projector": ("mlp_AR.",), "llm": ("model.", "lm_head.")}


def part_of(name: str) -> str:
    """Which part (vision, projector, llm) a parameter name belongs to."""
    for part, prefixes in PART_PREFIXES.items():
        if name.startswith(prefixes):
            return part
    raise ValueError(f"parameter {name!r} belongs to no known part (expected a prefix among {PART_PREFIXES})")


def model_config(cfg: ModelConfig) -> KeyeVLConfig:
    """The model config from the checkpoint or YAML, with the stage's overrides (RoPE base, context, attention)."""
    if cfg.init is not None:
        if not (Path(cfg.init) / "config.json").is_file():
            raise FileNotFoundError(f"model.init: {cfg.init} is not an HF checkpoint directory (no config.json)")
        config = KeyeVLConfig.from_pretrained(cfg.init)
    else:
        config = load_model_config(cfg.config, cfg.config_overrides)
    text = config.text_config
    if cfg.rope_theta is not None:
        text.rope_parameters = {**(text.rope_parameters or {"rope_type": "default"}), "rope_theta": cfg.rope_theta}
    if cfg.max_position_embeddings is not None:
        text.max_position_embeddings = cfg.max_position_embeddings
    if cfg.attn_backend is not None:
        config.attn_backend = cfg.attn_backend
    return config


def build_model(cfg: ModelConfig, dtype: torch.dtype) -> KeyeVLForConditionalGeneration:
    """Weights from ``cfg.init`` (or random from ``cfg.config``), in ``dtype``, with untrained parts frozen.

    Under ZeRO-3 (an ``HfDeepSpeedConfig`` alive in the caller) transformers partitions the weights while loading.
    """
    config = model_config(cfg)
    if cfg.init is not None:
        model = KeyeVLForConditionalGeneration.from_pretrained(cfg.init, config=config, dtype=dtype)
    else:
        model = KeyeVLForConditionalGeneration._from_config(config, dtype=dtype)
    freeze(model, cfg.trainable)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    return model


def freeze(model: nn.Module, trainable: list[str]) -> dict[str, int]:
    """Set ``requires_grad`` by part; returns trainable parameter counts per part (ZeRO-3 aware)."""
    counts = dict.fromkeys(PART_PREFIXES, 0)
    for name, p in model.named_parameters():
        part = part_of(name)
        p.requires_grad_(part in trainable)
        if part in trainable:
            counts[part] += int(getattr(p, "ds_numel", p.numel()))
    return counts


def build_processor(cfg: ModelConfig) -> KeyeVLProcessor:
    """The checkpoint's processor (tokenizer + budgets), or the default Qwen3 one for a random model."""
    if cfg.init is not None and any((Path(cfg.init) / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        return KeyeVLProcessor.from_pretrained(cfg.init)
    return KeyeVLProcessor(load_tokenizer())
