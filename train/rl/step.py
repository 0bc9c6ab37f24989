"""One GSPO/GRPO step as an object the trainer drives: ``rollout(prompts) -> RolloutBatch``, ``update(batch, …)``.

rollout: G samples per prompt with the current policy (hint in the user turn at the prompt's current level; an
engine holding its own copy of the weights, vLLM, first gets the policy's weights pushed in place),
rewards from a :class:`RewardCombiner`, progressive hinting for all-fail groups (probe from level 1 up, re-roll
the group at the weakest level that succeeds), group-normalised advantages, and old log-probs (plus entropy and
optional reference log-probs) computed in ``no_grad`` on exactly the packed rows the update will use.  When the
engine reports its own log-probs of the sampled tokens, they are kept beside the old log-probs
(``RolloutBatch.engine_logp``) and their mean absolute difference is a step statistic (rollout/trainer drift).

update: ``minibatches`` policy updates per rollout batch (the first is on-policy, so its ratio is exactly 1),
each a sum of packed micro-rows whose losses are normalised by the minibatch's sequence count; the caller's
``optimizer_step_fn`` runs once per minibatch.  Only policy-sampled response tokens (the rollout's mask) enter
the ratio, |y| and the loss.

With DeepSpeed pass the engine as ``model`` (its forward is used, ZeRO-3 gathers included), ``backward_fn =
lambda loss: engine.backward(loss, scale_wrt_gas=False)`` and an ``optimizer_step_fn`` that calls ``engine.step()``
with gradient accumulation equal to the number of micro-rows per minibatch (``RolloutBatch.micro_rows``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from data_pipelines.packing import pack_row
from keye.generation import GenerationEngine
from keye.logprobs import token_logprobs
from keye.loss import shift_labels
from train.rl.advantages import group_advantages
from train.rl.config import RLConfig
from train.rl.hints import HintScheduler, hinted_messages
from train.rl.losses import policy_loss
from train.rl.rewards import RewardCombiner
from train.rl.rollout import Rollout, RolloutSampler

StepFn = Callable[[], Any]
BackwardFn = Callable[[Tensor], Any]


@dataclass
class RolloutBatch:
    """Everything ``update`` needs; tensors are ``[N]`` or ``[N, T]`` over rollouts (grouped by prompt)."""

    rollouts: list[Rollout]
    rewards: Tensor
    advantages: Tensor
    mask: Tensor  # [N, T] bool: response tokens the policy sampled
    old_logp: Tensor  # [N, T] fp32, 0 where mask is 0
    ref_logp: Tensor | None
    minibatches: list[list[list[int]]]  # minibatch -> packed micro-rows -> rollout indices
    stats: dict[str, float] = field(default_factory=dict)
    engine_logp: Tensor | None = None  # [N, T] the engine's log-probs of the same tokens (NaN: none reported)

    @property
    def micro_rows(self) -> list[int]:
        return [len(mb) for mb in self.minibatches]


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _engine_logprobs(rollouts: Sequence[Rollout], width: int) -> Tensor | None:
    """``[N, width]`` engine log-probs of the response tokens (NaN where none), or None when no rollout has any."""
    if all(r.engine_logprobs is None for r in rollouts):
        return None
    out = torch.full((len(rollouts), width), float("nan"))
    for i, r in enumerate(rollouts):
        if r.engine_logprobs is not None:
            out[i, : r.engine_logprobs.numel()] = r.engine_logprobs
    return out


def logprob_drift(trainer_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean and max ``|trainer − engine|`` log-prob over the sampled tokens both have (the rollout/trainer drift
    monitor: weights or prompts that differ between the two show here first), and how many tokens were compared."""
    both = mask & engine_logp.isfinite()
    diff = (trainer_logp - engine_logp).abs()[both]
    if diff.numel() == 0:
        return {"engine_logprob_diff/tokens": 0.0}
    return {
        "engine_logprob_diff/mean": float(diff.mean()),
        "engine_logprob_diff/max": float(diff.max()),
        "engine_logprob_diff/tokens": float(diff.numel()),
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


class RLStep:
    """The RL algorithm around a policy; the trainer supplies prompts, the optimiser step and checkpoints."""

    def __init__(
        self,
        model: nn.Module,
        engine: GenerationEngine,
        cfg: RLConfig | None = None,
        rewards: RewardCombiner | None = None,
        hints: HintScheduler | None = None,
        reference: nn.Module | None = None,
    ) -> None:
        self.model, self.engine = model, engine
        self.cfg = cfg or RLConfig()
        self.rewards = rewards or RewardCombiner(self.cfg.reward)
        h = self.cfg.hints
        self.hints = hints or HintScheduler(k=h.k, min_passes=h.min_passes, max_level=h.max_level)
        self.sampler = RolloutSampler(engine, self.cfg.rollout, seed=self.cfg.seed)
        self.reference = reference
        if self.reference is None and self.cfg.update.kl_reference:
            self.reference = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)
        self.steps = 0
        self.skipped_prompts = 0
        self.weight_sync_seconds = 0.0

    def sync_engine(self) -> None:
        """Push the policy's weights into an engine that holds its own copy (vLLM), in place; the transformers
        engine generates with the policy itself. Under ZeRO-3 ``model`` is the full replica the run has just
        gathered parameter by parameter, so no partition is gathered twice."""
        self.weight_sync_seconds = 0.0
        if getattr(self.engine, "holds_weights", False):
            start = time.perf_counter()
            self.engine.update_weights(_unwrap(self.model).named_parameters())
            self.weight_sync_seconds = time.perf_counter() - start

    @property
    def device(self) -> torch.device:
        return next(_unwrap(self.model).parameters()).device

    def close(self) -> None:
        self.sampler.close()

    # --- rewards and hinting ---------------------------------------------------------------------------------
    def _score(self, rollouts: Sequence[Rollout]) -> None:
        for r in rollouts:
            r.reward, r.reward_terms = self.rewards(r.text, r.record)
            r.passed = r.reward_terms[self.cfg.pass_term] > 0

    def _passes(self, completion: str, record: Mapping[str, Any]) -> bool:
        return self.rewards(completion, record)[1][self.cfg.pass_term] > 0

    def _probe_sampler(self, record: Mapping[str, Any]) -> Callable[[list[dict], int], list[str]]:
        def sample(messages: list[dict], k: int) -> list[str]:
            return [r.text for r in self.sampler.sample([messages], [record], k)[0]]

        return sample

    def _hintable(self, record: Mapping[str, Any]) -> bool:
        return self.cfg.hints.enabled and bool(record.get("hints"))

    def _apply_hints(self, records, levels: list[int], groups: list[list[Rollout]]) -> dict[str, float]:
        """Probe all-fail groups upward and re-roll them at their new level; returns what it did."""
        regen: list[int] = []
        probed = 0
        for i, (record, group) in enumerate(zip(records, groups)):
            if not self._hintable(record):
                continue
            passes = [r.passed for r in group]
            if not any(passes) and levels[i] < self.cfg.hints.max_level:
                probed += 1
            if all(passes) and levels[i] > 0 and self.cfg.hints.reprobe_on_full_pass:
                self.hints.reprobe(record, self._probe_sampler(record), self._passes)
                continue
            new = self.hints.observe(record, passes, self._probe_sampler(record), self._passes, level=levels[i])
            if not any(passes) and new != levels[i] and self.cfg.hints.regenerate:
                levels[i] = new
                regen.append(i)
        if regen:
            msgs = [hinted_messages(records[i]["messages"], records[i]["hints"], levels[i]) for i in regen]
            fresh = self.sampler.sample(msgs, [records[i] for i in regen], self.cfg.rollout.group_size)
            for i, group in zip(regen, fresh):
                for r in group:
                    r.group = i
                self._score(group)
                groups[i] = group
        return {"hint/groups_probed": float(probed), "hint/groups_regenerated": float(len(regen))}

    # --- packing and log-probs -------------------------------------------------------------------------------
    def _partition(self, rollouts: Sequence[Rollout]) -> list[list[list[int]]]:
        """Rollout indices per minibatch, each split into packed micro-rows of at most ``micro_batch_tokens``."""
        u, n = self.cfg.update, len(rollouts)
        if u.shuffle:
            gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.steps)
            order = torch.randperm(n, generator=gen).tolist()
        else:
            order = list(range(n))
        k = min(u.minibatches, n)
        out = []
        for chunk in torch.tensor_split(torch.tensor(order), k):
            rows: list[list[int]] = []
            tokens = 0
            for idx in chunk.tolist():
                length = len(rollouts[idx].sample)
                if rows and tokens + length <= u.micro_batch_tokens:
                    rows[-1].append(idx)
                    tokens += length
                else:
                    rows.append([idx])
                    tokens = length
            out.append(rows)
        return out

    def _row_logprobs(
        self, model: nn.Module, rollouts: Sequence[Rollout], width: int, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``[n, width]`` log-probs of each rollout's response tokens from one packed forward."""
        samples = [r.sample for r in rollouts]
        packed = pack_row(samples, max_seq_len=sum(len(s) for s in samples)).to(self.device)
        targets = shift_labels(packed.labels, packed.cu_seqlens)
        logp, ent = token_logprobs(
            model, packed.model_inputs(), targets, self.cfg.update.logprob_chunk, with_entropy=with_entropy
        )
        offsets = packed.cu_seqlens.tolist()
        rows, ents = [], []
        for r, start in zip(rollouts, offsets):
            # response token t sits at start + prompt_length + t and is predicted one position earlier
            a, b = start + r.prompt_length - 1, start + len(r.sample) - 1
            rows.append(nn.functional.pad(logp[0, a:b], (0, width - (b - a))))
            if ent is not None:
                ents.append(nn.functional.pad(ent[0, a:b], (0, width - (b - a))))
        return torch.stack(rows), (torch.stack(ents) if ent is not None else None)

    @torch.no_grad()
    def _batch_logprobs(self, model: nn.Module, rollouts: Sequence[Rollout], parts, width: int, with_entropy: bool):
        n = len(rollouts)
        logp = torch.zeros(n, width, device=self.device)
        ent = torch.zeros(n, width, device=self.device) if with_entropy else None
        for minibatch in parts:
            for row in minibatch:
                lp, e = self._row_logprobs(model, [rollouts[i] for i in row], width, with_entropy)
                logp[row] = lp
                if ent is not None:
                    ent[row] = e
        return logp, ent

    # --- the two halves of a step ----------------------------------------------------------------------------
    def rollout(self, prompts: Sequence[Mapping[str, Any]]) -> RolloutBatch:
        """Sample, score, hint, and record old log-probs for a batch of prompt records."""
        t_start = time.perf_counter()
        cfg = self.cfg
        self.sampler.generated_tokens, self.sampler.generate_seconds = 0, 0.0
        policy = _unwrap(self.model)
        was_training = policy.training
        policy.eval()
        self.sync_engine()
        records, messages, levels, encoded = [], [], [], []
        skipped = 0
        for record in prompts:
            level = self.hints.level_for(record) if self._hintable(record) else 0
            msgs = hinted_messages(record["messages"], record.get("hints"), level)
            prompt = self.sampler.encode_prompt(msgs, record)
            if len(prompt) > cfg.rollout.max_prompt_tokens:
                skipped += 1
                continue
            records.append(record)
            messages.append(msgs)
            levels.append(level)
            encoded.append(prompt)
        self.skipped_prompts += skipped
        if not records:
            raise ValueError(f"rollout: all {len(prompts)} prompts exceed rl.rollout.max_prompt_tokens")

        groups = self.sampler.sample(messages, records, cfg.rollout.group_size, encoded)
        for group in groups:
            self._score(group)
        t_hint = time.perf_counter()
        hint_stats = self._apply_hints(records, levels, groups)
        hint_seconds = time.perf_counter() - t_hint
        for group, level in zip(groups, levels):
            for r in group:
                r.hint_level = level

        rollouts = [r for group in groups for r in group]
        if callable(getattr(self.engine, "sleep", None)):
            self.engine.sleep()  # vLLM's sleep mode (GPU, rl.rollout.vllm.sleep_level): memory back to the trainer
        batch = self.prepare(rollouts)
        if was_training:
            policy.train()
        stats = self._rollout_stats(batch, records, levels, skipped, hint_stats, time.perf_counter() - t_start)
        stats["time/hint_s"] = hint_seconds
        batch.stats.update(stats)
        return batch

    def prepare(self, rollouts: list[Rollout]) -> RolloutBatch:
        """Advantages, response masks and old (and reference) log-probs for scored rollouts, grouped by ``group``."""
        cfg = self.cfg
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
        group_ids = torch.tensor([r.group for r in rollouts])
        adv = group_advantages(rewards, group_ids=group_ids)
        width = max(1, max(len(r.sample) - r.prompt_length for r in rollouts))
        mask = torch.zeros(len(rollouts), width, dtype=torch.bool)
        for i, r in enumerate(rollouts):
            m = r.response_mask
            mask[i, : m.numel()] = m
        t_lp = time.perf_counter()
        parts = self._partition(rollouts)
        old_logp, entropy = self._batch_logprobs(self.model, rollouts, parts, width, with_entropy=True)
        ref_logp = None
        if self.reference is not None and cfg.loss.kl_coef > 0:
            ref_logp = self._batch_logprobs(self.reference, rollouts, parts, width, with_entropy=False)[0]
        mask_d = mask.to(self.device)
        n_policy = int(mask.sum())
        stats = {
            "zero_adv_group_frac": float(adv.zero_adv_group_frac),
            "entropy": float((entropy * mask_d).sum() / max(n_policy, 1)),
            "time/old_logprob_s": time.perf_counter() - t_lp,
        }
        engine_logp = _engine_logprobs(rollouts, width)
        if engine_logp is not None:
            stats.update(logprob_drift(old_logp.cpu(), engine_logp, mask))
        return RolloutBatch(
            rollouts, rewards, adv.advantages, mask_d, old_logp, ref_logp, parts, stats, engine_logp=engine_logp
        )

    def _rollout_stats(self, batch, records, levels, skipped, hint_stats, rollout_seconds) -> dict[str, float]:
        rollouts = batch.rollouts
        stats: dict[str, float] = {}
        stats["reward/mean"], stats["reward/std"] = _mean_std([r.reward for r in rollouts])
        stats["reward/judge_failures"] = float(self.rewards.take_judge_failures())  # counted, never a silent 0
        for name in rollouts[0].reward_terms:
            m, s = _mean_std([r.reward_terms[name] for r in rollouts])
            stats[f"reward/{name}/mean"], stats[f"reward/{name}/std"] = m, s
        lengths = [r.policy_tokens for r in rollouts]
        stats.update(
            {
                "pass_rate": sum(r.passed for r in rollouts) / len(rollouts),
                "response_length/mean": sum(lengths) / len(lengths),
                "response_length/max": float(max(lengths)),
                "response_length/min": float(min(lengths)),
                "truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
                "prompts": float(len(records)),
                "prompts_skipped": float(skipped),
                "rollouts": float(len(rollouts)),
                "hint/level_mean": sum(levels) / len(levels),
                "hint/groups_hinted": float(sum(1 for lv in levels if lv > 0)),
                "time/rollout_s": rollout_seconds,
                "time/weight_sync_s": self.weight_sync_seconds,
                "time/generate_s": self.sampler.generate_seconds,
                "tokens/generated": float(self.sampler.generated_tokens),
                "tokens/rollout_per_s": self.sampler.generated_tokens / max(self.sampler.generate_seconds, 1e-9),
            }
        )
        stats.update(hint_stats)
        for level in range(1, 6):
            stats[f"hint/groups_L{level}"] = float(sum(1 for lv in levels if lv == level))
        stats.update(self.hints.stats())
        return stats

    def update(
        self,
        batch: RolloutBatch,
        optimizer_step_fn: StepFn,
        backward_fn: BackwardFn | None = None,
        model: nn.Module | None = None,
    ) -> dict[str, float]:
        """``minibatches`` × ``epochs`` policy updates of ``model`` (default: the policy; a run whose rollouts use a
        replica passes the trained module) on ``batch``; mean loss statistics over the minibatches.  Statistics
        stay on the device and are read once, at the end."""
        model = self.model if model is None else model
        backward = backward_fn or (lambda loss: loss.backward())
        _unwrap(model).train()
        width = batch.mask.shape[1]
        adv = batch.advantages.to(self.device)
        has_tokens = batch.mask.any(dim=1).tolist()  # host-side: sequence counts per minibatch and row
        t0 = time.perf_counter()
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        sums: dict[str, Tensor] = {}
        ratio_min, ratio_max, first_dev = zero + math.inf, zero - math.inf, zero
        tokens = 0
        n_updates = 0
        grad_norms: list[Tensor] = []
        for epoch in range(self.cfg.update.epochs):
            for mb_index, minibatch in enumerate(batch.minibatches):
                n_seq = max(1, sum(has_tokens[i] for row in minibatch for i in row))
                mb: dict[str, Tensor] = {}
                for row in minibatch:
                    logp, _ = self._row_logprobs(model, [batch.rollouts[i] for i in row], width)
                    loss, st = policy_loss(
                        logp,
                        batch.old_logp[row],
                        adv[row],
                        batch.mask[row],
                        self.cfg.loss,
                        ref_logp=batch.ref_logp[row] if batch.ref_logp is not None else None,
                        num_sequences=n_seq,
                    )
                    backward(loss)
                    tokens += sum(len(batch.rollouts[i].sample) for i in row)
                    share = sum(has_tokens[i] for i in row) / n_seq  # weight of this row in per-sequence means
                    st = {k: v.double() for k, v in st.items()}
                    lo, hi = st.pop("ratio_min"), st.pop("ratio_max")
                    ratio_min, ratio_max = torch.minimum(ratio_min, lo), torch.maximum(ratio_max, hi)
                    if epoch == 0 and mb_index == 0:
                        first_dev = torch.stack([first_dev, (hi - 1).abs(), (lo - 1).abs()]).max()
                    for key, v in st.items():  # pg_loss, clip_frac, kl are already sums over sequences / n_seq
                        mb[key] = mb.get(key, zero) + (v * share if key in ("ratio_mean", "seq_len_mean") else v)
                norm = optimizer_step_fn()
                if norm is not None:
                    grad_norms.append(torch.as_tensor(norm, dtype=torch.float64, device=self.device))
                for key, value in mb.items():
                    sums[key] = sums.get(key, zero) + value
                n_updates += 1
        host = iter(torch.stack([*sums.values(), ratio_min, ratio_max, first_dev, *grad_norms]).tolist())  # one sync
        seconds = time.perf_counter() - t0
        self.steps += 1
        stats = {f"update/{k}": next(host) / n_updates for k in sums}
        stats.update({"update/ratio_min": next(host), "update/ratio_max": next(host)})
        stats["update/first_minibatch_ratio_dev"] = next(host)
        stats["update/minibatches"] = float(n_updates)
        if norms := list(host):
            stats["update/grad_norm"] = sum(norms) / len(norms)
        stats["time/update_s"] = seconds
        stats["tokens/update_per_s"] = tokens / max(seconds, 1e-9)
        return stats

    def step(self, prompts: Sequence[Mapping[str, Any]], optimizer_step_fn: StepFn, backward_fn=None):
        """``rollout`` then ``update``; the merged stats."""
        batch = self.rollout(prompts)
        return {**batch.stats, **self.update(batch, optimizer_step_fn, backward_fn)}

    # --- resume ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "sampler_calls": self.sampler.calls, "hints": self.hints.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.sampler.calls = int(state["sampler_calls"])
        self.hints.load_state_dict(state["hints"])
