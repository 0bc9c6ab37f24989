"""A GSPO/GRPO run: ``keye train configs/rl/tiny.yaml`` or ``torchrun … -m train configs/rl/gspo_8b.yaml``.

The run config is the trainer's (model, freeze, optim, schedule, distributed, checkpoint, logging, wandb) plus an
``rl:`` section (:class:`train.rl.config.RLConfig`).  Per RL step every rank takes its disjoint slice of the step's
``rl.prompts_per_step`` prompts (which must divide by the world size: the GSPO sequence mean uses each rank's own
sequence count, exact across ranks only when the counts are equal), samples G rollouts per prompt with the current
policy (``ChatEngine``, eval mode, no grad), scores and hints them, and runs ``rl.update.minibatches`` DeepSpeed
optimizer steps over them (``RLStep.update``).  Hint levels are shared between ranks after every step, because a
prompt lands on another rank in the next epoch.

The LR schedule counts RL steps (its warmup is scaled by the optimizer steps per RL step).  Checkpoints hold the
DeepSpeed state plus, per rank, the RNG and ``RLStep.state_dict()`` (step, sampler seed counter, hint levels), so
re-running the same command continues from the newest complete checkpoint with no step redone.  The prompt order
is a function of the step (one seeded permutation per epoch), so it needs no saved state.

Every rank pads its update to the same number of minibatches and micro-rows with no-op rows: ZeRO-2 reduces
gradients at every backward and ZeRO-3 gathers parameters at every forward, collectively.  For the same reason
every training forward runs the vision tower (a zero-weighted dummy input on rows without pixels).

ZeRO-3: generation runs a different number of forwards on every rank, which partitioned parameters cannot serve.
Rollouts and old log-probs therefore run on a full replica of the policy, refreshed from the partitions (one
gathered parameter at a time) before every rollout: one extra copy of the weights per GPU (16 GB for 8B in bf16).

``rl.rollout.engine: vllm``: every rank builds one vLLM engine in its own process (on the job's process group) from
``model.path`` once, and ``RLStep`` pushes the policy's weights into it in place before every rollout, i.e. after
the optimizer steps of the previous RL step and after a resume (from the live module, or under ZeRO-3 from the
replica just gathered). Old log-probs stay the trainer's, on the sampled tokens; the engine's own log-probs of
those tokens are compared with them every step (``engine_logprob_diff/*``) and the push is timed
(``time/weight_sync_s``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from keye.typed_config import ConfigError, config_layers, load_config
from train.config import RatePlan, RunConfig, _rooted, apply_rate_rule, check_run, config_error
from train.rl.config import RLConfig
from train.rl.step import RLStep, RolloutBatch

log = logging.getLogger(__name__)


@dataclass
class RLRunConfig(RunConfig):
    """One RL run: the shared run sections plus ``rl``; saved next to every checkpoint like ``TrainConfig``."""

    stage: str = "rl"
    output_dir: str = "runs/rl"
    max_steps: int = 100  # RL steps (each: rollouts + rl.update.minibatches × epochs optimizer steps)
    rl: RLConfig = field(default_factory=RLConfig)

    @property
    def grad_accum_steps(self) -> int:
        """For ``train.engine.deepspeed_config``: the RL loop marks accumulation boundaries itself."""
        return 1


def _check(cfg: RLRunConfig, source: str) -> None:
    if not cfg.model.path or cfg.model.config:
        raise config_error(
            source,
            "model",
            "model.path (the HF checkpoint of the policy, e.g. the SFT export) and no model.config",
            cfg.model,
        )
    if cfg.distributed.sequence_parallel_size != 1:
        raise config_error(
            source, "distributed.sequence_parallel_size", "1 (RL rollouts are not sequence-parallel)", cfg.distributed
        )
    check_run(cfg, source)
    if not cfg.rl.prompts:
        raise config_error(source, "rl.prompts", "a non-empty list of prompt JSONL files", cfg.rl.prompts)


def load_rl_run_config(path: str | Path, overrides: list[str] | None = None) -> RLRunConfig:
    """The RL run config from YAML + ``key=value`` overrides; relative paths are read against ``paths.root``."""
    return load_rl_run(path, overrides)[0]


def load_rl_run(path: str | Path, overrides: list[str] | None = None) -> tuple[RLRunConfig, RatePlan]:
    """:func:`load_rl_run_config` and the run's learning-rate plan (``train.config.apply_rate_rule``)."""
    source = f"{path}{' + overrides' if overrides else ''}"
    try:
        cfg = load_config(RLRunConfig, path, overrides)
    except ConfigError:
        raise
    except ValueError as exc:  # RLConfig's own checks (group size, pass_term, …)
        raise ConfigError(f"{source}: {exc}") from None
    _check(cfg, source)
    plan = apply_rate_rule(cfg, config_layers(path, overrides))
    if root := cfg.paths.root:
        cfg.model.path = _rooted(cfg.model.path, root)
        cfg.output_dir = _rooted(cfg.output_dir, root)
        cfg.rl.prompts = [_rooted(p, root) for p in cfg.rl.prompts]
        cfg.rl.rollout.media_root = _rooted(cfg.rl.rollout.media_root, root)
    return cfg, plan


# --------------------------------------------------------------------------------------------- prompts and ranks
def step_prompt_indices(num_records: int, step: int, per_step: int, seed: int, rank: int, world: int) -> list[int]:
    """Record indices of this rank's share of RL step ``step``: the run walks through one seeded permutation of
    the records per epoch, ``per_step`` at a time, and rank r takes the r-th contiguous ``per_step / world``."""
    if per_step % world:
        raise ValueError(f"rl.prompts_per_step={per_step} is not divisible by the world size {world}")
    share = per_step // world
    out = []
    for g in range(step * per_step + rank * share, step * per_step + (rank + 1) * share):
        epoch, pos = divmod(g, num_records)
        out.append(_epoch_order(num_records, seed, epoch)[pos])
    return out


@functools.lru_cache(maxsize=2)
def _epoch_order(num_records: int, seed: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(num_records, generator=gen).tolist())


def share_hint_levels(step: RLStep, prompts: list[dict], world: int) -> None:
    """Give every rank the hint levels this step set on the others (each prompt was handled by one rank)."""
    if world == 1:
        return
    hints = step.hints
    mine = {
        str(r["id"]): (hints.levels.get(str(r["id"])), str(r["id"]) in hints.unsolved) for r in prompts if "id" in r
    }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    for part in gathered:
        for pid, (level, unsolved) in part.items():
            if level is None:
                hints.levels.pop(pid, None)
            else:
                hints.levels[pid] = level
            (hints.unsolved.add if unsolved else hints.unsolved.discard)(pid)


_SUMMED = (
    "prompts",
    "prompts_skipped",
    "rollouts",
    "tokens/",
    "hint/groups_",
    "update/pad_rows",
    "engine_logprob_diff/tokens",
)


def reduce_stats(stats: dict[str, float], world: int) -> dict[str, float]:
    """Step statistics over all ranks: counts and throughputs summed, extremes kept, everything else averaged."""
    if world == 1:
        return dict(stats)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, stats)
    out = {}
    for key in sorted(set().union(*gathered)):
        values = [float(g[key]) for g in gathered if key in g]
        if key.startswith(_SUMMED):
            out[key] = sum(values)
        elif key.endswith(("_max", "/max")):
            out[key] = max(values)
        elif key.endswith(("_min", "/min")):
            out[key] = min(values)
        else:
            out[key] = sum(values) / len(values)
    return out


def equalise_work(batch: RolloutBatch, device: torch.device) -> int:
    """Pad ``batch.minibatches`` with no-op micro-rows so every rank runs the same number of optimizer steps and
    the same number of micro-rows in each (ZeRO-2 reduces gradients at every backward, ZeRO-3 gathers parameters
    at every forward, both collectively).

    A no-op row is the shortest rollout again with an all-zero response mask: it counts in no sequence mean and
    adds no gradient.  Returns the number of rows added."""
    counts = batch.micro_rows
    k = torch.tensor([len(counts)], device=device)
    dist.all_reduce(k, op=dist.ReduceOp.MAX)
    target = torch.zeros(int(k), dtype=torch.long, device=device)
    target[: len(counts)] = torch.tensor(counts, device=device)
    dist.all_reduce(target, op=dist.ReduceOp.MAX)
    want = [int(t) for t in target.tolist()]
    missing = sum(want) - sum(counts)
    if missing == 0:
        return 0
    shortest = min(range(len(batch.rollouts)), key=lambda i: len(batch.rollouts[i].sample))
    batch.rollouts.append(batch.rollouts[shortest])
    noop = len(batch.rollouts) - 1
    batch.advantages = torch.cat([batch.advantages, batch.advantages.new_zeros(1)])
    batch.mask = torch.cat([batch.mask, batch.mask.new_zeros(1, batch.mask.shape[1])])
    batch.old_logp = torch.cat([batch.old_logp, batch.old_logp.new_zeros(1, batch.old_logp.shape[1])])
    if batch.ref_logp is not None:
        batch.ref_logp = torch.cat([batch.ref_logp, batch.ref_logp.new_zeros(1, batch.ref_logp.shape[1])])
    while len(batch.minibatches) < len(want):
        batch.minibatches.append([])
    for minibatch, n in zip(batch.minibatches, want):
        minibatch.extend([noop] for _ in range(n - len(minibatch)))
    return missing


class DeepSpeedUpdate:
    """``backward_fn`` / ``optimizer_step_fn`` for ``RLStep.update``: each minibatch is one DeepSpeed optimizer
    step accumulated over its micro-rows (the boundary is set explicitly on the last row, since the row count
    varies per minibatch); losses are already normalised, so no scaling by the accumulation count."""

    def __init__(self, engine: Any, batch: RolloutBatch, epochs: int) -> None:
        self.engine = engine
        self.plan = [len(mb) for _ in range(epochs) for mb in batch.minibatches]
        self.minibatch, self.row = 0, 0

    def backward(self, loss: torch.Tensor) -> None:
        self.row += 1
        self.engine.set_gradient_accumulation_boundary(self.row == self.plan[self.minibatch])
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> Any:
        """One optimizer step; its gradient norm (a tensor or float: ``RLStep.update`` reads it with its stats)."""
        if self.row != self.plan[self.minibatch]:
            raise RuntimeError(
                f"RL update: minibatch {self.minibatch} ran {self.row} micro-rows, expected {self.plan[self.minibatch]}"
            )
        self.engine.step()
        self.minibatch, self.row = self.minibatch + 1, 0
        return self.engine.get_global_grad_norm()


class AlwaysRunVision(torch.nn.Module):
    """The DeepSpeed engine as ``RLStep``'s policy, with every forward running the vision tower (on a
    zero-weighted dummy input when a micro-row has no pixels, as the trainer does): ranks whose rows lack images
    would otherwise give the projector no gradient and reduce differently shaped buckets (ZeRO-2), or skip the
    ViT's collective parameter gathers (ZeRO-3)."""

    def __init__(self, engine: Any) -> None:
        super().__init__()
        self.module = engine

    def forward(self, **inputs: Any) -> Any:
        return self.module(**inputs, always_run_vision=True)


@torch.no_grad()
def rollout_replica(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """A whole (unpartitioned) model of the same config for rollouts. Built without weight init: ``sync_replica``
    fills every weight from the partitions before each rollout."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        replica = type(model)(model.config)
    if model.config.tie_word_embeddings:
        replica.tie_weights()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return replica.to(dtype).requires_grad_(False).eval()


def sync_replica(module: torch.nn.Module, replica: torch.nn.Module) -> None:
    """Copy ZeRO-3-partitioned weights into the full rollout replica, gathering one parameter at a time."""
    import deepspeed

    target = dict(replica.named_parameters())
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            target[name].data.copy_(param.data)


def rollout_vllm_engine(cfg: RLRunConfig, processor: Any, precision: str, rank: int) -> Any:
    """This rank's vLLM engine, built once from the policy's export (``model.path``) in the trainer's precision,
    long enough for a prompt plus its answer (or a whole Thyme trajectory); seeded per rank."""
    from keye.generation.vllm_engine import VLLMEngine

    rollout = cfg.rl.rollout
    settings = rollout.vllm
    if not settings.max_model_len:
        longest = rollout.max_prompt_tokens + rollout.max_new_tokens
        if rollout.tools:
            longest = max(longest, rollout.tool_loop.max_length)
        settings = dataclasses.replace(settings, max_model_len=longest)
    return VLLMEngine.from_pretrained(
        cfg.model.path,
        dtype="bfloat16" if precision == "bf16" else "float32",
        settings=settings,
        seed=cfg.rl.seed + 100_003 * rank,
        processor=processor,
    )


# ------------------------------------------------------------------------------------------------------ the run
def run_rl(cfg: RLRunConfig) -> dict[str, Any]:
    """Run (or resume) the RL run described by ``cfg``; returns a summary on every rank."""
    from keye.inference import ChatEngine
    from train.engine import load_model, set_activation_checkpointing, zero_stage
    from train.freeze import apply_freeze
    from train.metrics import memory_gb
    from train.optim import param_groups
    from train.rl.rollout import read_prompt_records
    from train.run_context import RunContext, StepResult

    missing = [p for p in cfg.rl.prompts if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"rl.prompts: prompt file {missing[0]!r} not found (of {cfg.rl.prompts})")
    run = RunContext(cfg)
    rank, world, device, precision = run.rank, run.world, run.device, run.precision
    if cfg.rl.prompts_per_step % world:
        raise ValueError(
            f"rl.prompts_per_step={cfg.rl.prompts_per_step} must be divisible by the world size {world} "
            "(each rank takes an equal share, which keeps the GSPO sequence mean exact across ranks)"
        )
    records = read_prompt_records(cfg.rl.prompts)
    if not records:
        raise ValueError(f"rl.prompts {cfg.rl.prompts}: no prompt records")
    zero3 = zero_stage(run.ds_config) == 3
    model, processor = load_model(cfg, run.ds_config, precision)
    model.config.use_cache = True  # generation uses the KV cache; training forwards pass use_cache=False
    apply_freeze(model, cfg.freeze)
    set_activation_checkpointing(model, cfg.activation_checkpointing.vit, cfg.activation_checkpointing.llm)
    replica = rollout_replica(model, precision) if zero3 else None

    updates = cfg.rl.update.minibatches * cfg.rl.update.epochs  # optimizer steps per RL step
    engine = run.build(model, param_groups(model, cfg.optim), processor, updates_per_step=updates)
    if zero3:
        replica.to(device)
    trained = AlwaysRunVision(engine)
    policy = replica if zero3 else trained  # rollouts + old log-probs; the update always trains `trained`
    if cfg.rl.rollout.engine == "vllm":
        chat = rollout_vllm_engine(cfg, processor, precision, rank)
    else:
        chat = ChatEngine(replica if zero3 else engine.module, processor, str(device))
    # per-rank sampling seeds: the ranks sample different prompts and must not share their noise
    rl_step = RLStep(policy, chat, dataclasses.replace(cfg.rl, seed=cfg.rl.seed + 100_003 * rank))
    run.closing += [rl_step.close, getattr(chat, "close", lambda: None)]

    saved = run.resume()
    if run.resumed_from is not None:
        rl_step.load_state_dict(saved["rl"])
        run.logger.event(
            "resumed",
            step=run.step,
            checkpoint_step=run.resumed_from,
            rl_steps=rl_step.steps,
            sampler_calls=rl_step.sampler.calls,
            hint_levels=len(rl_step.hints.levels),
        )
    run.state = lambda: {"rl": rl_step.state_dict()}

    def rl_step_fn(step: int) -> StepResult:
        flag = torch.tensor(float(run.stop.raised), device=device)
        dist.all_reduce(flag)
        if flag > 0:  # every rank takes the same branch, so they checkpoint together
            return "signal"
        t0 = time.perf_counter()
        indices = step_prompt_indices(len(records), step, cfg.rl.prompts_per_step, cfg.rl.seed, rank, world)
        prompts = [records[i] for i in indices]
        if zero3:
            sync_replica(engine.module, replica)
        batch = rl_step.rollout(prompts)
        pad_rows = equalise_work(batch, device)
        ds_update = DeepSpeedUpdate(engine, batch, cfg.rl.update.epochs)
        stats = {**batch.stats, **rl_step.update(batch, ds_update.step, ds_update.backward, model=trained)}
        share_hint_levels(rl_step, prompts, world)
        stats.update(
            {
                "update/pad_rows": float(pad_rows),
                "lr": float(run.optimizer.param_groups[0]["lr"]),
                "step_time_s": time.perf_counter() - t0,
                "memory_gb": memory_gb(device),
                "sampler_calls": float(rl_step.sampler.calls),
                "loss": stats.get("update/pg_loss", float("nan")),  # the progress bar shows "loss"
            }
        )
        return lambda: reduce_stats(stats, world)

    return run.loop(rl_step_fn)
