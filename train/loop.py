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

import contextlib
import logging
import math
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from keye.sequence_parallel import init_sequence_parallel
from keye.typed_config import save_config
from train.checkpoint import export_hf, resume_latest, rng_state, save_checkpoint
from train.config import TrainConfig
from train.data import ShardedData, TrainData, configure_processor, label_count
from train.engine import (
    deepspeed_config,
    init_distributed,
    load_model,
    register_zero3_external_parameters,
    resolve_precision,
    set_activation_checkpointing,
)
from train.freeze import apply_freeze
from train.metrics import MetricLogger, Throughput, memory_gb
from train.optim import build_optimizer, param_groups, scheduler_factory
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
    export: Callable[[Any, Path, int], None]  # (engine, out_dir, rank): HF export
    groups: list[dict]  # optimizer parameter groups
    loss_replicas: int = 1  # ranks that report the same loss term (the SP group size): the logged mean divides by it


def lm_task(
    cfg: TrainConfig, ds_config: dict, precision: str, rank: int, world: int, device: torch.device, sp: Any
) -> Task:
    """Next-token prediction on packed rows (stages 1–3, SFT), sliced across the SP group when sp > 1."""
    model, processor = load_model(cfg, ds_config, precision)
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

    return Task(
        model=model,
        processor=processor,
        data=data,
        count=count,
        forward=forward,
        tokens=lambda b: int(b.input_ids.numel()),
        export=lambda engine, out, r: export_hf(engine, processor, out, r),
        groups=param_groups(model, cfg.optim),
        loss_replicas=sp.sp_size,
    )


def siglip_task(cfg: TrainConfig, ds_config: dict, precision: str, rank: int, world: int, device: torch.device) -> Task:
    """Stage 0: the ViT against a SigLIP text tower with the sigmoid loss (``train/siglip.py``); a micro-batch's
    loss items are its pairs."""
    model, processor = load_model(cfg, ds_config, precision)
    configure_processor(processor, cfg.data)
    model.requires_grad_(False)  # the LLM and projector stay on the host; the tower's parameters are set below
    set_activation_checkpointing(model, cfg.activation_checkpointing.vit, False)
    tower = build_tower(model, cfg.siglip, processor.tokenizer, cfg.seed + 1)
    tower.visual.requires_grad_(True)
    tower.head.requires_grad_(True)
    tower.logit_scale.requires_grad_(True)
    tower.logit_bias.requires_grad_(True)
    data = pair_data(cfg.data, cfg.siglip, processor, tower.tokenizer, cfg.seed, rank, world)

    def forward(engine: Any, batch: Any, denom: torch.Tensor) -> torch.Tensor:
        return engine(**batch.to(device).model_inputs(), num_items_in_batch=denom)

    return Task(
        model=tower,
        processor=processor,
        data=data,
        count=lambda b: torch.tensor(int(b.grid_thw.shape[0])),
        forward=forward,
        tokens=lambda b: int(b.pixel_values.shape[0]),
        export=lambda engine, out, r: export_hf(engine, processor, out, r),
        groups=tower_param_groups(tower, cfg.optim, cfg.siglip.text_lr),
    )


class StopRequested(BaseException):
    """Raised out of a wait for data when a stop signal arrives (``StopFlag.waiting``); a ``BaseException``, like
    ``KeyboardInterrupt``, so that no ``except Exception`` in the data pipeline can swallow it."""


class StopFlag:
    """Set by SIGTERM/SIGINT; the ranks agree on it at the next step so they all checkpoint together.

    While the loop waits for data (``with flag.waiting():``) a signal also interrupts the wait, so a run whose data
    is slow or never comes still stops promptly; ``signum`` gives the run's exit status (128 + signum).
    """

    def __init__(self) -> None:
        self.raised = False
        self.signum: int | None = None
        self.in_wait = False
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised, self.signum = True, signum
        if self.in_wait:
            self.in_wait = False
            raise StopRequested

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """A block that a stop signal may interrupt (with ``StopRequested``)."""
        if self.raised:
            raise StopRequested
        self.in_wait = True
        try:
            yield
        finally:
            self.in_wait = False

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training described by ``cfg``; returns a summary on every rank."""
    info = init_distributed(cfg.distributed.backend, cfg.distributed.timeout_minutes, cfg.distributed.deterministic)
    rank, world, device = info.rank, info.world, info.device
    sp = init_sequence_parallel(cfg.distributed.sequence_parallel_size)
    precision = resolve_precision(cfg, device)
    ds_config = deepspeed_config(cfg, world, precision)
    torch.manual_seed(cfg.seed)
    if cfg.objective == "siglip":
        task = siglip_task(cfg, ds_config, precision, rank, world, device)
    else:
        task = lm_task(cfg, ds_config, precision, rank, world, device, sp)

    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=task.model,
        optimizer=build_optimizer(task.groups, cfg.optim),
        lr_scheduler=scheduler_factory(cfg.schedule, cfg.max_steps),
        config=ds_config,
        dist_init_required=False,
    )
    zero3 = engine.zero_optimization_partition_weights()
    if zero3:
        register_zero3_external_parameters(engine.module)
    ckpt_root, step, resumed_from, state = resume_latest(engine, cfg, rank, world)
    out_dir = ckpt_root.parent
    if resumed_from is not None:
        task.data.load_state_dict(state["data"])

    logger = MetricLogger(cfg, rank, step, resumed_from is not None)
    stop = StopFlag()
    stop.install()
    counters = {"nonfinite_steps": 0, "nonfinite_in_a_row": 0}
    if resumed_from is not None:
        counters.update(state.get("counters", {}))

    def checkpoint(at: int, data_state: dict | None = None) -> None:
        data_state = data_state if data_state is not None else task.data.state_dict()
        rank_state = {"step": at, "rng": rng_state(), "data": data_state, "counters": dict(counters)}
        path = save_checkpoint(
            engine,
            ckpt_root,
            at,
            rank_state,
            task.processor,
            lambda p: save_config(cfg, p),
            rank,
            cfg.checkpoint.keep_last,
            cfg.checkpoint.export_hf,
        )
        logger.event("checkpoint", step=at, path=str(path))

    meter = Throughput()
    interval_loss = torch.zeros((), device=device, dtype=torch.float64)
    interval_labels = torch.zeros((), device=device, dtype=torch.float64)
    interval_steps = 0
    last_saved = step if resumed_from is not None else None
    stopped_by = "max_steps"
    first = True
    try:
        while step < cfg.max_steps:
            before_fetch = task.data.state_dict()  # a stop before this step must not lose its micro-batches
            batches, exhausted = [], False
            try:
                with stop.waiting():
                    for _ in range(cfg.grad_accum_steps):
                        batches.append(task.data.next())
            except StopIteration:
                exhausted = True
            except StopRequested:
                batches = []  # the checkpoint below keeps the data position from before this step
            if first and resumed_from is not None:
                logger.event(
                    "resumed",
                    step=step,
                    checkpoint_step=resumed_from,
                    samples_skipped_to_resume=_sum(task.data.resume_skipped(), device),
                )
            first = False
            local = (
                torch.stack([task.count(b).to(device) for b in batches]).sum()
                if batches
                else torch.zeros((), device=device, dtype=torch.long)
            )
            agree = torch.stack(
                [
                    local.double(),
                    torch.tensor(float(stop.raised), device=device, dtype=torch.float64),
                    torch.tensor(float(exhausted), device=device, dtype=torch.float64),
                ]
            )
            dist.all_reduce(agree)
            if agree[1] > 0 or agree[2] > 0:  # host sync, once per step: every rank must take the same branch
                stopped_by = "signal" if agree[1] > 0 else "data_exhausted"
                if last_saved != step:
                    checkpoint(step, before_fetch)
                    last_saved = step
                break
            global_count = agree[0]
            denom = (global_count / world).clamp(min=1.0 / world).float()

            step_loss = torch.zeros((), device=device, dtype=torch.float64)
            for batch in batches:
                loss = task.forward(engine, batch, denom)
                engine.backward(loss, scale_wrt_gas=False)
                engine.step()
                step_loss += loss.detach().double()
                meter.tokens += task.tokens(batch)
            step += 1
            meter.steps += 1
            logger.advance()

            if engine.was_step_applied():
                counters["nonfinite_in_a_row"] = 0
                interval_loss += step_loss
                interval_labels += global_count
                interval_steps += 1
            else:
                counters["nonfinite_steps"] += 1
                counters["nonfinite_in_a_row"] += 1
                logger.event("nonfinite_step_skipped", step=step, in_a_row=counters["nonfinite_in_a_row"])
                if counters["nonfinite_in_a_row"] >= cfg.max_nonfinite_steps:
                    raise TrainingAborted(
                        f"{counters['nonfinite_in_a_row']} optimizer steps in a row (up to step {step}) had a "
                        f"non-finite loss or gradient norm (max_nonfinite_steps={cfg.max_nonfinite_steps}); "
                        "check the data, lower optim.lr or use fp32"
                    )

            if step % cfg.logging.every_steps == 0 or step == cfg.max_steps:
                sums = torch.stack(
                    [interval_loss, torch.tensor(float(meter.tokens), device=device, dtype=torch.float64)]
                )
                dist.all_reduce(sums)
                rates = meter.rates()
                values = {
                    "loss": float(sums[0] / world / task.loss_replicas / max(interval_steps, 1))
                    if interval_steps
                    else float("nan"),
                    "grad_norm": _float(engine.get_global_grad_norm()),
                    "lr": float(optimizer.param_groups[0]["lr"]),
                    **{f"lr/{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)},
                    "tokens_per_s": float(sums[1]) / max(rates["step_time_s"] * meter.steps, 1e-9),
                    "label_tokens": float(interval_labels),
                    "step_time_s": rates["step_time_s"],
                    "samples_skipped": sum(task.data.skipped().values()),
                    "nonfinite_steps": counters["nonfinite_steps"],
                    "memory_gb": memory_gb(device),
                }
                logger.log(step, values)
                interval_loss.zero_()
                interval_labels.zero_()
                interval_steps = 0
                meter.reset()

            if step % cfg.checkpoint.every_steps == 0:
                checkpoint(step)
                last_saved = step
        if last_saved != step:
            checkpoint(step)
        if stopped_by != "signal":  # a stop signal leaves little time: the checkpoint above is what matters
            task.export(engine, out_dir / "hf", rank)
            dist.barrier()
        logger.event(
            "finished", console=False, step=step, stopped_by=stopped_by, nonfinite_steps=counters["nonfinite_steps"]
        )
    finally:
        stop.restore()
        logger.close()
    return {
        "step": step,
        "stopped_by": stopped_by,
        "signal": stop.signum if stopped_by == "signal" else None,
        "output_dir": str(out_dir),
        "export": str(out_dir / "hf"),
        "nonfinite_steps": counters["nonfinite_steps"],
        "rank": rank,
        "world": world,
    }


def _sum(value: int, device: torch.device) -> int:
    t = torch.tensor(float(value), device=device)
    dist.all_reduce(t)
    return int(t)


def _float(x: Any) -> float:
    if x is None:
        return float("nan")
    value = float(x)
    return value if math.isfinite(value) else float("nan")
