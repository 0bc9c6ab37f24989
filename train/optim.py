"""AdamW parameter groups (one learning rate per module, no decay on norms/biases) and LR schedules.

Schedules are small callables (not lambdas) so ``LambdaLR.state_dict`` saves them and a resumed run continues
on the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from train.config import OptimConfig, ScheduleConfig
from train.freeze import module_of


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters grouped by (module, decay); each group carries ``name`` and its own ``lr``."""
    lrs = {
        "vit": cfg.vit_lr if cfg.vit_lr is not None else cfg.lr,
        "projector": cfg.projector_lr if cfg.projector_lr is not None else cfg.lr,
        "llm": cfg.llm_lr if cfg.llm_lr is not None else cfg.lr,
    }
    groups = grouped_by_part(model, module_of, lrs, cfg.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters: the freeze plan freezes the whole model")
    return groups


def grouped_by_part(
    model: nn.Module, part_of: Callable[[str], str], lrs: dict[str, float], weight_decay: float
) -> list[dict]:
    """Trainable parameters grouped by (``part_of(name)``, decay), the learning rate of their part each; no weight
    decay on 0/1-dimensional tensors, biases and norms."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()
        groups.setdefault((part_of(name), not no_decay), []).append(param)
    return [
        {
            "name": f"{part}/{'decay' if decay else 'no_decay'}",
            "params": params,
            "lr": lrs[part],
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (part, decay), params in sorted(groups.items())
    ]


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW as DeepSpeed's client optimizer: no extension to compile, same on CPU and GPU."""
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


class Schedule:
    """LR multiplier at optimizer step ``step`` (0-based): linear warmup, then cosine / WSD / constant."""

    def __init__(self, cfg: ScheduleConfig, max_steps: int) -> None:
        self.kind, self.warmup, self.min_ratio = cfg.kind, cfg.warmup_steps, cfg.min_lr_ratio
        self.total = max_steps
        self.decay_steps = max(1, round(cfg.decay_ratio * max_steps))

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            progress = min(1.0, (step - self.warmup) / span)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = self.total - self.decay_steps  # wsd
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / self.decay_steps)
        return 1.0 - (1 - self.min_ratio) * progress


def scheduler_factory(cfg: ScheduleConfig, max_steps: int):
    """A callable DeepSpeed calls with its wrapped optimizer, so the schedule drives the real param groups."""

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [Schedule(cfg, max_steps) for _ in optimizer.param_groups])

    return build
