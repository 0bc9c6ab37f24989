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
from typing import Any

import torch

from keye.compat import enable_activation_checkpointing
from keye.quiet import quiet_stdout
from train.config import TrainConfig, resolve_path
from train.extension_locks import build_lock_guard

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


def init_distributed(backend: str = "auto", timeout_minutes: int = 30, deterministic: bool = False) -> DistInfo:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``…); a plain
    ``keye train`` is a group of one on a free local port."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda and local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} needs GPU {local_rank} but {torch.cuda.device_count()} are visible: start at "
            "most one process per GPU (torchrun --nproc_per_node), or hide the GPUs (CUDA_VISIBLE_DEVICES=) for CPU"
        )
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts: required by the flag
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        if not cuda and int(os.environ["RANK"]) == 0 and not _shm_op_built():
            log.info("building DeepSpeed's CPU allreduce op (first run on this machine only, about a minute)")
        # DeepSpeed JIT-builds its CPU allreduce op here (never wait on a dead build) and print()s "… built
        # successfully" each time it loads it: kept off the console unless verbose (keye.quiet)
        with build_lock_guard(), quiet_stdout():
            deepspeed.init_distributed(
                dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), verbose=False
            )
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def _shm_op_built() -> bool:
    """Whether DeepSpeed's CPU allreduce op is already built in torch's extensions folder (else the first process
    group of this machine builds it)."""
    from train.extension_locks import extensions_root

    root = extensions_root()
    return any(root.glob("deepspeed_shm_comm/*.so")) or any(root.glob("*/deepspeed_shm_comm/*.so"))


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


def load_model(cfg: TrainConfig, ds_config: dict[str, Any], precision: str):
    """The model and processor of ``cfg.model``.

    Every rank loads the whole model on the host (``from_pretrained`` memory-maps the safetensors) and
    ``deepspeed.initialize`` partitions it (ZeRO-3). Building inside ``deepspeed.zero.Init`` and filling the
    shards module by module was tried and measured worse on a 0.96B model with 2 ranks (peak anonymous memory
    per rank 3.0 GB vs 2.1 GB in bf16, 5.8 vs 5.7 GB in fp32, and 1.5-2x slower), so it is not used. Extrapolated
    from those figures (~2.2 bytes per parameter in bf16), an 8B model peaks near 19 GB of host memory per rank."""
    from keye.auto import register
    from keye.configuration import KeyeVLConfig
    from keye.model_config import load_model_config
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
        model = KeyeVLForConditionalGeneration.from_pretrained(path, config=config, dtype=dtype)
        processor = KeyeVLProcessor.from_pretrained(path, model_config=config)  # ids with model.overrides applied
    else:
        config = load_model_config(resolve_path(cfg.model.config), overrides)
        torch.manual_seed(cfg.seed)
        model = KeyeVLForConditionalGeneration(config).to(dtype)
        processor = KeyeVLProcessor(model_config=config)
    if cfg.model.attn_backend:
        model.config.attn_backend = cfg.model.attn_backend
    model.config.use_cache = False
    return model, processor


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
    enable_activation_checkpointing(model)
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
