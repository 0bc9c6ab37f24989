"""DeepSpeed engine for a run: the generated DeepSpeed config, the engine, and HF-format export.

DeepSpeed is the only training engine: ZeRO-2/3 + bf16 on GPUs (NCCL) and the same engine with ZeRO-0..3 + fp32
on CPU (gloo), so the tiny CPU runs exercise the code path of the 8B runs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from keye.processing import KeyeVLProcessor
from keye.typed_config import save_config
from train.config import RunConfig
from train.distributed import DistInfo, barrier


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: RunConfig, dtype: torch.dtype) -> dict[str, Any]:
    """DeepSpeed's JSON config from the run config; ``cfg.deepspeed`` is merged on top (expert knobs)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "contiguous_gradients": True, "overlap_comm": True}
    if cfg.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=1e5)
    generated = {
        "train_micro_batch_size_per_gpu": 1,  # one packed row; its length is the batch size
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }
    return _merge(generated, dict(cfg.deepspeed))


def zero3_context(ds_config: dict[str, Any]) -> object | None:
    """Under ZeRO-3 an ``HfDeepSpeedConfig`` must be alive while the model loads so transformers partitions it."""
    if ds_config["zero_optimization"]["stage"] != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def create_engine(model: torch.nn.Module, optimizer, scheduler_factory, ds_config: dict[str, Any]):
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler_factory, config=ds_config, dist_init_required=False
    )
    return engine, scheduler


def full_state_dict(engine, dist: DistInfo) -> dict[str, torch.Tensor] | None:
    """All weights on rank 0's CPU (gathered parameter by parameter under ZeRO-3); ``None`` on other ranks."""
    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    if not zero3:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if dist.is_main else None
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if dist.is_main:
                state[name] = param.detach().cpu().clone()
    if dist.is_main:
        for name, buf in module.named_buffers():
            if name in module.state_dict():
                state[name] = buf.detach().cpu().clone()
    return state if dist.is_main else None


def export_hf(engine, processor: KeyeVLProcessor, cfg: RunConfig, out: str | Path, dist: DistInfo) -> Path:
    """Write an HF-format checkpoint (config, safetensors, processor files, run config) that ``from_pretrained`` loads."""
    out = Path(out)
    state = full_state_dict(engine, dist)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        engine.module.save_pretrained(str(out), state_dict=state)
        processor.save_pretrained(out)
        save_config(cfg, out / "train_config.yaml")
    barrier()
    return out
