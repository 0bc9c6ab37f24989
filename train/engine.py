"""Distributed setup and the DeepSpeed engine: process group, device, precision, ZeRO config, model loading.

The same code runs an 8B model on many GPUs (nccl, bf16, ZeRO-3, flash-attn) and the tiny model on CPU (gloo,
fp32): the device decides the backend and the dtype unless the config names them.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.config import TrainConfig, resolve_path

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(backend: str = "auto", timeout_minutes: int = 30) -> DistInfo:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``…); a plain
    ``keye train`` is a group of one on a free local port."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), verbose=False
        )
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.distributed.precision != "auto":
        return cfg.distributed.precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(cfg: TrainConfig, world: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON of the run with batch sizes, clipping, precision and ZeRO stage filled in from ``cfg``."""
    path = resolve_path(cfg.distributed.deepspeed_config)
    try:
        with open(path) as fh:
            ds = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"distributed.deepspeed_config {path!r}: cannot read a JSON object ({exc})") from None
    ds["train_micro_batch_size_per_gpu"] = 1  # one (possibly multi-row) packed micro-batch
    ds["gradient_accumulation_steps"] = cfg.grad_accum_steps
    ds["train_batch_size"] = cfg.grad_accum_steps * world
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    zero = ds.setdefault("zero_optimization", {})
    if cfg.distributed.zero_stage is not None:
        zero["stage"] = cfg.distributed.zero_stage
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": False}
    return ds


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def load_model(cfg: TrainConfig, ds_config: dict[str, Any], precision: str, partitioned: bool = True):
    """The model and processor of ``cfg.model``.

    Under ZeRO-3 with a checkpoint (``model.path``) and ``partitioned``, the model is built inside
    ``deepspeed.zero.Init`` (each rank allocates only its shard) and the weights stream in module by module from
    rank 0 (``load_partitioned``): host memory per rank is the shard plus one module, not the whole model (16 GB
    per rank for an 8B model in bf16, 128 GB on an 8-GPU node). Otherwise every rank builds the whole model and
    ``deepspeed.initialize`` partitions it. A model from ``model.config`` (random init) is always built whole.
    """
    from keye.auto import register
    from keye.configuration import KeyeVLConfig, load_model_config
    from keye.modeling import KeyeVLForConditionalGeneration
    from keye.processing import KeyeVLProcessor

    register()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    overrides = list(cfg.model.overrides)
    if cfg.model.path:
        path = resolve_path(cfg.model.path)
        config = KeyeVLConfig.from_pretrained(path)
        if overrides:
            from omegaconf import OmegaConf

            _apply_overrides(config, OmegaConf.to_container(OmegaConf.from_dotlist(overrides)))
        if partitioned and zero_stage(ds_config) == 3:
            import deepspeed
            from transformers.initialization import no_init_weights

            # no random init: every weight is overwritten, and init would index tensors already partitioned away.
            # The dtype comes from the config's bf16 flag (set from `precision`): DeepSpeed 0.19 ignores an explicit
            # dtype on accelerators without fp16 (CPU) and picks bf16.
            with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = KeyeVLForConditionalGeneration(config)
            model.tie_weights()  # from_pretrained ties after loading; here the shared parameter must exist first
            load_partitioned(model, path)
        else:
            model = KeyeVLForConditionalGeneration.from_pretrained(path, config=config, dtype=dtype)
        processor = KeyeVLProcessor.from_pretrained(path)
    else:
        config = load_model_config(resolve_path(cfg.model.config), overrides)
        torch.manual_seed(cfg.seed)
        model = KeyeVLForConditionalGeneration(config).to(dtype)
        processor = KeyeVLProcessor()
    if cfg.model.attn_backend:
        model.config.attn_backend = cfg.model.attn_backend
    model.config.use_cache = False
    return model, processor


def load_partitioned(model: torch.nn.Module, directory: str | Path) -> None:
    """Fill a ZeRO-3-partitioned model from a local safetensors checkpoint, one module at a time.

    Rank 0 reads each tensor lazily from the files; ``GatheredParameters(modifier_rank=0)`` gathers the module's
    parameters, rank 0 writes them, and DeepSpeed broadcasts and re-partitions on exit. Keys the architecture does
    not use are skipped (as ``from_pretrained`` does); a missing or mis-shaped weight raises, naming it.
    """
    import deepspeed
    from safetensors import safe_open

    from keye.checkpoint import _is_unused, checkpoint_index

    index = {k: f for k, f in checkpoint_index(directory).items() if not _is_unused(k)}
    params = dict(model.named_parameters())  # a tied LM head is the embedding's parameter, listed once
    missing = sorted(set(params) - set(index))
    if missing:
        raise ValueError(f"{directory}: checkpoint lacks {missing[:8]} ({len(missing)} in all)")
    unexpected = sorted(set(index) - set(params) - {"lm_head.weight"})
    if unexpected:
        log.warning(
            "%s: %d checkpoint tensors not in the model, skipped: %s", directory, len(unexpected), unexpected[:8]
        )
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    handles: dict[Path, Any] = {}
    key_of = {id(p): k for k, p in params.items()}
    try:
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                if rank != 0:
                    continue
                for param in own:
                    key = key_of[id(param)]
                    if index[key] not in handles:
                        handles[index[key]] = safe_open(str(index[key]), framework="pt")
                    tensor = handles[index[key]].get_tensor(key)
                    if tuple(tensor.shape) != tuple(param.shape):
                        shapes = f"{list(tensor.shape)} in the checkpoint, {list(param.shape)} in the model"
                        raise ValueError(f"{directory}: {key} is {shapes}")
                    param.data.copy_(tensor)
    finally:
        handles.clear()


def _apply_overrides(config: Any, values: dict[str, Any], where: str = "") -> None:
    """Set nested ``model.overrides`` on a transformers config (e.g. ``text_config.rope_parameters.rope_theta``)."""
    for key, value in values.items():
        name = f"{where}{key}"
        if isinstance(config, dict):
            if key not in config:
                raise ValueError(f"model.overrides: unknown key {name!r}")
            if isinstance(value, dict) and isinstance(config[key], dict):
                _apply_overrides(config[key], value, name + ".")
            else:
                config[key] = value
            continue
        if not hasattr(config, key):
            raise ValueError(f"model.overrides: unknown key {name!r}")
        current = getattr(config, key)
        if isinstance(value, dict) and (isinstance(current, dict) or hasattr(current, "to_dict")):
            _apply_overrides(current, value, name + ".")
        else:
            setattr(config, key, value)


def set_activation_checkpointing(model: torch.nn.Module, vit: bool, llm: bool) -> None:
    """Recompute activations of ViT layers and/or LLM decoder layers in the backward pass."""
    if not (vit or llm):
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for prefix, keep in (("visual.", vit), ("model.", llm)):
        if keep:
            continue
        for name, module in model.named_modules():
            if name.startswith(prefix) and hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False


def register_zero3_external_parameters(model: torch.nn.Module) -> None:
    """Tell ZeRO-3 about weights a module reads from a child it never calls, so they are gathered for it: the ViT
    embeddings use their patch-conv and position-table weights functionally, and the chunked loss reads
    ``lm_head.weight`` inside the top module's forward (the stage-0 tower has no LM head)."""
    import deepspeed

    emb = model.visual.vision_model.embeddings
    for param in (*emb.patch_embedding.parameters(), *emb.position_embedding.parameters()):
        deepspeed.zero.register_external_parameter(emb, param)
    if hasattr(model, "lm_head"):
        deepspeed.zero.register_external_parameter(model, model.lm_head.weight)
