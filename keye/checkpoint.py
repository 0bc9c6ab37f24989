"""Checkpoint I/O beyond ``save_pretrained``/``from_pretrained``: building a Keye model from a local Qwen3
checkpoint and a local SigLIP checkpoint, and loading released Keye-VL 1.5 state dicts.

Everything reads local directories (``config.json`` + ``*.safetensors``, sharded or not, or ``pytorch_model.bin``);
nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from keye.configuration import KeyeVisionConfig, KeyeVLConfig

# The released layout's unused 32768-row vision table: vLLM's strict loader expects it, so every checkpoint written
# here carries it as zeros (KeyeVLForConditionalGeneration.save_pretrained, keye.merge); loading drops it.
PACKING_TABLE_KEY = "visual.vision_model.embeddings.packing_position_embedding.weight"
PACKING_TABLE_ROWS = 32768
# Keys present in released or SigLIP checkpoints that the 1.5 architecture does not use (dropped with a report).
UNUSED_KEY_PATTERNS = (
    r"(^|\.)head\.",  # SigLIP attention-pooling head
    r"embeddings\.packing_position_embedding\.",  # Preview checkpoints' unused 32768-entry table
    r"(^|\.)position_ids$",
    r"^text_model\.",  # SigLIP text tower (stage 0 loads it separately)
    r"^logit_scale$",
    r"^logit_bias$",
)


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a local HF checkpoint directory (single or sharded safetensors, or a .bin file)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(directory / shard)))
        return state
    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    binary = directory / "pytorch_model.bin"
    if binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {directory}")


def _is_unused(key: str) -> bool:
    return any(re.search(p, key) for p in UNUSED_KEY_PATTERNS)


def vision_config_from_siglip(vit_dir: str | Path) -> KeyeVisionConfig:
    """KeyeVisionConfig with the shapes of a local SigLIP (vision or dual-tower) checkpoint."""
    raw = json.loads((Path(vit_dir) / "config.json").read_text())
    vision = raw.get("vision_config", raw)
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_channels",
        "image_size",
        "patch_size",
        "hidden_act",
        "layer_norm_eps",
    )
    return KeyeVisionConfig(**{k: vision[k] for k in keys if k in vision})


def load_released_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load a state dict in the released Keye-VL 1.5 layout (``visual.vision_model.*``, ``mlp_AR.*``, ``model.*``,
    ``lm_head.*``). Unused keys (pooling head, packing table) are dropped and returned; any other missing or
    unexpected key raises, naming the keys.
    """
    dropped = [k for k in state_dict if _is_unused(k)]
    kept = {k: v for k, v in state_dict.items() if not _is_unused(k)}
    if "lm_head.weight" not in kept and getattr(model.config, "tie_word_embeddings", False):
        kept["lm_head.weight"] = kept["model.embed_tokens.weight"]
    result = model.load_state_dict(kept, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"state dict does not fit the Keye-VL 1.5 layout: missing {result.missing_keys[:8]} "
            f"({len(result.missing_keys)} in all), unexpected {result.unexpected_keys[:8]} "
            f"({len(result.unexpected_keys)} in all)"
        )
    return dropped


def build_from_components(model_cls, llm_dir: str | Path, vit_dir: str | Path, **config_overrides):
    """A new Keye model: LLM weights from a Qwen3 checkpoint, ViT weights from a SigLIP checkpoint, random projector.

    The SigLIP learned position table is kept at its trained size and interpolated per grid at run time.
    """
    from transformers import Qwen3Config

    text_config = Qwen3Config.from_pretrained(str(llm_dir))
    vision_config = vision_config_from_siglip(vit_dir)
    config = KeyeVLConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), **config_overrides)
    config.tie_word_embeddings = bool(getattr(text_config, "tie_word_embeddings", False))
    model = model_cls(config)

    llm_state = read_state_dict(llm_dir)
    vit_state = read_state_dict(vit_dir)
    state: dict[str, torch.Tensor] = {}
    for key, value in llm_state.items():
        if key.startswith(("model.", "lm_head.")):
            state[key] = value
    for key, value in vit_state.items():
        if _is_unused(key):
            continue
        name = key if key.startswith("vision_model.") else f"vision_model.{key}"
        state[f"visual.{name}"] = value
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("mlp_AR.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"component checkpoints do not fit: missing {missing[:8]} ({len(missing)}), "
            f"unexpected {result.unexpected_keys[:8]} ({len(result.unexpected_keys)}); "
            f"LLM from {llm_dir}, ViT from {vit_dir}"
        )
    return model
