"""AdamW parameter groups (per-part learning rates; no decay on norms, biases, embeddings) and the LR schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from train.build import part_of
from train.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters grouped by (part, decay); each group's ``lr`` is ``cfg.lr`` × the part's scale."""
    scale = {"vision": cfg.vision_lr_scale, "projector": cfg.projector_lr_scale, "llm": cfg.llm_lr_scale}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "norm" not in name.lower() and "embed" not in name.lower()
        groups.setdefault((part_of(name), decay), []).append(p)
    if not groups:
        raise ValueError("no trainable parameters: check model.trainable")
    return [
        {
            "params": params,
            "lr": cfg.lr * scale[part],
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        fused=device.type == "cuda",
    )


def lr_factor(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of each group's base LR at optimizer step ``s``: linear warm-up, then cosine/linear/constant."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape

    return factor


def build_scheduler(cfg: OptimConfig, total_steps: int) -> Callable[[torch.optim.Optimizer], object]:
    """A factory DeepSpeed calls with its (possibly ZeRO-wrapped) optimizer; it steps it once per optimizer step."""
    factor = lr_factor(cfg, total_steps)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
