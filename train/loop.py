"""The training loop: one screen that reads top to bottom (nanoGPT-style), composed of the small parts in train/.

Per optimizer step every rank fetches its ``grad_accum_steps`` micro-batches, the ranks agree in one all-reduce on
the step's global label-token count (and on whether to stop), then each micro-batch's loss is its *sum* of token
losses divided by ``count / world`` — DeepSpeed averages gradients over ranks, so the update is exactly the
per-token mean over every label token of the step, however tokens fall across rows, micro-batches and ranks.

The objective decides the ``Task``: ``lm`` (stages 1–3, SFT) or ``siglip`` (stage 0, pairs instead of tokens).
With Ulysses sequence parallelism (``distributed.sequence_parallel_size`` = sp > 1) the ranks of one SP group read
the same rows (data split by data-parallel rank) and each trains on its slice; counting each rank's slice labels
keeps the normalisation above exact, and since every SP rank reports the whole row's loss the logged loss is
divided by sp.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from keye.sequence_parallel import init_sequence_parallel
from train.config import TrainConfig
from train.data import ShardedData, TrainData, configure_processor, label_count
from train.engine import load_model, set_activation_checkpointing
from train.freeze import apply_freeze
from train.metrics import Throughput, flop_params, flop_totals, memory_gb, peak_flops, rate_metrics, step_flops
from train.optim import param_groups
from train.run_context import RunContext, StepResult, StopRequested
from train.siglip import build_tower, pair_data, tower_param_groups

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row); the message says why and where."""


@dataclass
class Task:
    """What differs between objectives: the module DeepSpeed wraps, its data, and how a micro-batch is run."""

    model: torch.nn.Module
    processor: Any
    data: Any  # next() -> micro-batch, state_dict/load_state_dict, skipped(), resume_skipped()
    count: Callable[[Any], torch.Tensor]  # loss items (label tokens, pairs) in a micro-batch
    forward: Callable[[Any, Any, torch.Tensor], torch.Tensor]  # (engine, batch, denom) -> loss
    tokens: Callable[[Any], int]  # tokens processed, for throughput
    groups: list[dict]  # optimizer parameter groups
    loss_replicas: int = 1  # ranks that report the same loss term (the SP group size): the logged mean divides by it
    flops: Callable[[Any], dict[str, float]] | None = None  # model FLOPs of a micro-batch (for MFU), if counted


def lm_task(cfg: TrainConfig, run: RunContext, sp: Any) -> Task:
    """Next-token prediction on packed rows (stages 1–3, SFT), sliced across the SP group when sp > 1."""
    model, processor, device = *load_model(cfg, run.ds_config, run.precision), run.device
    configure_processor(processor, cfg.data)
    apply_freeze(model, cfg.freeze)
    set_activation_checkpointing(model, cfg.activation_checkpointing.vit, cfg.activation_checkpointing.llm)
    data: Any = TrainData(cfg.data, processor, cfg.seed, sp.dp_rank, sp.dp_size, cfg.micro_batch_rows)
    if sp.sp_size > 1:
        data = ShardedData(data, sp.sp_rank, sp.sp_size)

    def forward(engine: Any, batch: Any, denom: torch.Tensor) -> torch.Tensor:
        # ZeRO-3 gathers parameters collectively per module call, so every rank must run the ViT equally often:
        # always_run_vision makes a micro-batch without pixels run it once on a zero-weighted dummy input.
        out = engine(**batch.to(device).model_inputs(), num_items_in_batch=denom, always_run_vision=True)
        return out.loss

    def count(batch: Any) -> torch.Tensor:
        return torch.tensor(batch.num_label_tokens) if sp.sp_size > 1 else label_count(batch)

    params = flop_params(model)

    return Task(
        model=model,
        processor=processor,
        data=data,
        count=count,
        forward=forward,
        tokens=lambda b: int(b.input_ids.numel()),
        groups=param_groups(model, cfg.optim),
        loss_replicas=sp.sp_size,
        flops=lambda b: step_flops(model, b, params),
    )


def siglip_task(cfg: TrainConfig, run: RunContext) -> Task:
    """Stage 0: the ViT against a SigLIP text tower with the sigmoid loss (``train/siglip.py``); a micro-batch's
    loss items are its pairs."""
    model, processor, device = *load_model(cfg, run.ds_config, run.precision), run.device
    configure_processor(processor, cfg.data)
    model.requires_grad_(False)  # the LLM and projector stay on the host; the tower's parameters are set below
    set_activation_checkpointing(model, cfg.activation_checkpointing.vit, False)
    tower = build_tower(model, cfg.siglip, processor.tokenizer, cfg.seed + 1)
    tower.visual.requires_grad_(True)
    tower.head.requires_grad_(True)
    tower.logit_scale.requires_grad_(True)
    tower.logit_bias.requires_grad_(True)
    data = pair_data(cfg.data, cfg.siglip, processor, tower.tokenizer, cfg.seed, run.rank, run.world)

    def forward(engine: Any, batch: Any, denom: torch.Tensor) -> torch.Tensor:
        return engine(**batch.to(device).model_inputs(), num_items_in_batch=denom)

    return Task(
        model=tower,
        processor=processor,
        data=data,
        count=lambda b: torch.tensor(int(b.grid_thw.shape[0])),
        forward=forward,
        tokens=lambda b: int(b.pixel_values.shape[0]),
        groups=tower_param_groups(tower, cfg.optim, cfg.siglip.text_lr),
    )


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training described by ``cfg``; returns a summary on every rank."""
    run = RunContext(cfg)
    world, device = run.world, run.device
    sp = init_sequence_parallel(cfg.distributed.sequence_parallel_size)
    task = siglip_task(cfg, run) if cfg.objective == "siglip" else lm_task(cfg, run, sp)
    engine = run.build(task.model, task.groups, task.processor)
    saved = run.resume()
    counters = {"nonfinite_steps": 0, "nonfinite_in_a_row": 0}
    if run.resumed_from is not None:
        task.data.load_state_dict(saved["data"])
        counters.update(saved.get("counters", {}))
    run.state = lambda: {"data": task.data.state_dict(), "counters": dict(counters)}
    run.extra = lambda: {"nonfinite_steps": counters["nonfinite_steps"]}
    peak = peak_flops(cfg.logging.peak_tflops, device) if task.flops else None

    meter = Throughput()
    interval = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum and label tokens of the applied steps

    def log_values() -> dict[str, Any]:
        counts = torch.tensor([meter.tokens, *meter.flops.values()], device=device, dtype=torch.float64)
        sums = torch.cat([interval[:1], counts])
        dist.all_reduce(sums)
        step_time = meter.step_time()
        rates = rate_metrics(
            float(sums[1]), dict(zip(meter.flops, sums[2:].tolist())), step_time * meter.steps, world, peak
        )
        values = {
            "loss": float(sums[0] / world / task.loss_replicas / meter.applied) if meter.applied else float("nan"),
            "grad_norm": _float(engine.get_global_grad_norm()),
            "lr": float(run.optimizer.param_groups[0]["lr"]),
            **{f"lr/{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(run.optimizer.param_groups)},
            **rates,
            "label_tokens": float(interval[1]),
            "step_time_s": step_time,
            "samples_skipped": sum(task.data.skipped().values()),
            "nonfinite_steps": counters["nonfinite_steps"],
            "memory_gb": memory_gb(device),
        }
        interval.zero_()
        meter.reset()
        return values

    def train_step(step: int) -> StepResult:
        before_fetch = task.data.state_dict()  # a stop before this step must not lose its micro-batches
        batches, exhausted = [], False
        try:
            with run.stop.waiting():
                for _ in range(cfg.grad_accum_steps):
                    batches.append(task.data.next())
        except StopIteration:
            exhausted = True
        except StopRequested:
            batches = []  # the checkpoint below keeps the data position from before this step
        if step == run.resumed_from:  # the first step of a resumed run
            skipped = torch.tensor(float(task.data.resume_skipped()), device=device)
            dist.all_reduce(skipped)
            run.logger.event(
                "resumed", step=step, checkpoint_step=run.resumed_from, samples_skipped_to_resume=int(skipped)
            )
        local = sum((task.count(b).to(device) for b in batches), torch.zeros((), device=device, dtype=torch.long))
        flags = torch.tensor([float(run.stop.raised), float(exhausted)], device=device, dtype=torch.float64)
        agree = torch.cat([local.double()[None], flags])
        dist.all_reduce(agree)
        if agree[1] > 0 or agree[2] > 0:  # host sync, once per step: every rank must take the same branch
            run.checkpoint({"data": before_fetch, "counters": dict(counters)})
            return "signal" if agree[1] > 0 else "data_exhausted"
        global_count = agree[0]
        denom = (global_count / world).clamp(min=1.0 / world).float()

        step_loss = torch.zeros((), device=device, dtype=torch.float64)
        for batch in batches:
            loss = task.forward(engine, batch, denom)
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
            step_loss += loss.detach().double()
            meter.tokens += task.tokens(batch)
            if peak:
                totals = flop_totals(task.flops(batch))
                meter.flops = {k: v + totals[k] for k, v in meter.flops.items()}
        meter.steps += 1

        if engine.was_step_applied():
            counters["nonfinite_in_a_row"] = 0
            interval.add_(torch.stack([step_loss, global_count]))
            meter.applied += 1
        else:
            counters["nonfinite_steps"] += 1
            counters["nonfinite_in_a_row"] += 1
            run.logger.event("nonfinite_step_skipped", step=step + 1, in_a_row=counters["nonfinite_in_a_row"])
            if counters["nonfinite_in_a_row"] >= cfg.max_nonfinite_steps:
                raise TrainingAborted(
                    f"{counters['nonfinite_in_a_row']} optimizer steps in a row (up to step {step + 1}) had a "
                    f"non-finite loss or gradient norm (max_nonfinite_steps={cfg.max_nonfinite_steps}); "
                    "check the data, lower optim.lr or use fp32"
                )
        return log_values

    return run.loop(train_step)


def _float(x: Any) -> float:
    if x is None:
        return float("nan")
    value = float(x)
    return value if math.isfinite(value) else float("nan")
