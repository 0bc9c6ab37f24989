"""Rollouts for RL: G sampled responses per prompt, kept as the exact token ids the policy saw and produced.

A :class:`Rollout` holds one ``EncodedSample`` = prompt ids (as encoded by the same processor as training, media
included) + the generated ids, with ``labels`` equal to ``input_ids`` on policy-sampled tokens and
``IGNORE_INDEX`` on the prompt, sandbox output and anything else the policy did not sample.  The update builds
its inputs from these ids, never by re-tokenising text, so rollout and update see identical multimodal inputs.

Plain prompts go through the generation engine's ``generate_encoded`` (``keye.generation``: transformers or vLLM;
batched); Thyme prompts (``tools``) through ``keye.thyme.ToolLoop``, whose trajectories already carry the exact
sample and policy mask. Engines that report log-probs (vLLM) leave theirs on each rollout, aligned with its
response, for the trainer/engine drift monitor.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_pipelines.encoded import IGNORE_INDEX, EncodedSample
from keye.generation import GenerationEngine
from keye.inference import GenerationSettings
from keye.processing import MERGE
from keye.rope import multimodal_position_ids
from keye.thyme import ToolLoop
from train.rl.config import RolloutConfig

Messages = list[dict[str, Any]]


@dataclass
class Rollout:
    """One sampled response and what the step learned about it."""

    record: Mapping[str, Any]  # the prompt record (solution, hints, …) the reward functions read
    group: int  # index of its prompt within the step
    sample: EncodedSample  # prompt + response ids; labels = ids on policy tokens, IGNORE_INDEX elsewhere
    prompt_length: int
    text: str  # the response as the reward functions see it
    finish_reason: str  # eos, length, invalid_token, or the tool loop's reason
    hint_level: int = 0
    reward: float = 0.0
    reward_terms: dict[str, float] = field(default_factory=dict)
    passed: bool = False
    # [len - prompt_length] fp32: the engine's log-prob of each response token it sampled, NaN elsewhere (sandbox
    # output) or None when the engine reports none
    engine_logprobs: torch.Tensor | None = None

    @property
    def response_mask(self) -> torch.Tensor:
        """``[len - prompt_length]`` bool: which response tokens the policy sampled (and the loss sees)."""
        return self.sample.labels[self.prompt_length :] != IGNORE_INDEX

    @property
    def policy_tokens(self) -> int:
        return int(self.response_mask.sum())


def chat_rollout_sample(prompt: EncodedSample, generated: list[int], eos_id: int, max_new_tokens: int):
    """``(sample, finish_reason)`` for ids from ``generate_encoded`` (which strips the end-of-turn token).

    A response that stopped before the token limit ended on an end token; ``<|im_end|>`` is appended as its
    last policy token so the update also teaches the model to stop.  A response that produced an image/video
    placeholder is cut before it (a placeholder without pixels cannot be run through the model).
    """
    ids = list(generated)
    finish = "length" if len(ids) >= max_new_tokens else "eos"
    token_ids = prompt.token_ids
    bad = next((i for i, t in enumerate(ids) if t in (token_ids.image, token_ids.video)), None)
    if bad is not None:
        ids, finish = ids[:bad], "invalid_token"
    if finish == "eos":
        ids.append(eos_id)
    response = torch.tensor(ids, dtype=torch.long)
    input_ids = torch.cat([prompt.input_ids, response])
    labels = torch.cat([torch.full_like(prompt.input_ids, IGNORE_INDEX), response])
    grids = (prompt.visual.image_grid_thw, prompt.visual.video_grid_thw)
    positions = multimodal_position_ids(input_ids, token_ids.image, token_ids.video, *grids, MERGE)
    return dataclasses.replace(prompt, input_ids=input_ids, labels=labels, position_ids=positions), finish


def response_logprobs(logprobs: Sequence[float] | None, length: int) -> torch.Tensor | None:
    """The engine's log-probs for a chat rollout's ``length`` response tokens (NaN where it reported none: a
    response cut before a placeholder keeps fewer tokens, one ended by the end-of-turn token has its log-prob)."""
    if logprobs is None:
        return None
    out = torch.full((length,), float("nan"))
    n = min(length, len(logprobs))
    out[:n] = torch.tensor(list(logprobs[:n]), dtype=torch.float32)
    return out


def read_prompt_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Prompt records from JSONL files; a record without ``messages`` or ``solution`` is an error naming it."""
    records = []
    for path in paths:
        with Path(path).open() as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                missing = [k for k in ("messages", "solution") if k not in record]
                if missing:
                    raise ValueError(f"{path}:{n}: prompt record {record.get('id', '?')!r} has no {missing[0]!r}")
                records.append(record)
    return records


class RolloutSampler:
    """Samples ``n`` responses for each of many conversations, in batches, with per-call seeds."""

    def __init__(self, engine: GenerationEngine, cfg: RolloutConfig, seed: int = 0) -> None:
        self.engine, self.cfg, self.seed = engine, cfg, seed
        self.calls = 0  # generate calls so far: part of each call's seed, saved with the step's state
        self._tool_loop: ToolLoop | None = None
        tok = engine.processor.tokenizer
        self.eos_id = int(tok.convert_tokens_to_ids("<|im_end|>"))
        self.generated_tokens = 0
        self.generate_seconds = 0.0

    @property
    def processor(self):
        return self.engine.processor

    def close(self) -> None:
        if self._tool_loop is not None:
            self._tool_loop.close()
            self._tool_loop = None

    def _next_seed(self) -> int:
        self.calls += 1
        return (self.seed * 1_000_003 + self.calls) % (2**31)

    def uses_tools(self, record: Mapping[str, Any]) -> bool:
        return bool(record.get("tools", self.cfg.tools))

    def encode_prompt(self, messages: Messages, record: Mapping[str, Any]) -> EncodedSample:
        return self.processor.encode_conversation(
            messages,
            mode=record.get("mode"),
            add_generation_prompt=True,
            media_root=self.cfg.media_root,
            sample_id=str(record.get("id", "")),
        )

    def sample(
        self,
        conversations: Sequence[Messages],
        records: Sequence[Mapping[str, Any]],
        n: int,
        encoded: Sequence[EncodedSample | None] | None = None,
    ) -> list[list[Rollout]]:
        """``n`` rollouts per conversation, grouped by conversation (``group`` = its index here).

        ``encoded``: prompts already encoded with :meth:`encode_prompt` (None entries are encoded here).
        """
        if len(conversations) != len(records):
            raise ValueError(f"sample: {len(conversations)} conversations for {len(records)} records")
        out: list[list[Rollout]] = [[] for _ in conversations]
        plain = [i for i, r in enumerate(records) if not self.uses_tools(r)]
        tools = [i for i, r in enumerate(records) if self.uses_tools(r)]
        if plain:
            self._sample_chat(conversations, records, plain, n, out, encoded)
        if tools:
            self._sample_tools(conversations, records, tools, n, out)
        return out

    def _settings(self) -> GenerationSettings:
        return GenerationSettings.from_config(self.cfg, seed=self._next_seed())

    def _sample_chat(self, conversations, records, indices: list[int], n: int, out, encoded=None) -> None:
        prompts = {
            i: (encoded[i] if encoded is not None and encoded[i] is not None else None)
            or self.encode_prompt(conversations[i], records[i])
            for i in indices
        }
        jobs = [(i, prompts[i]) for i in indices for _ in range(n)]
        for start in range(0, len(jobs), self.cfg.batch_size):
            chunk = jobs[start : start + self.cfg.batch_size]
            settings = self._settings()
            t0 = time.perf_counter()
            result = self.engine.generate_encoded([p for _, p in chunk], settings)
            self.generate_seconds += time.perf_counter() - t0
            engine_lps = result.logprobs or [None] * len(chunk)
            for (i, prompt), ids, lps in zip(chunk, result.token_ids, engine_lps, strict=True):
                sample, finish = chat_rollout_sample(prompt, ids, self.eos_id, settings.max_new_tokens)
                response = sample.input_ids[len(prompt) :].tolist()
                text = self.processor.tokenizer.decode(response, skip_special_tokens=True)
                self.generated_tokens += len(response)
                rollout = Rollout(records[i], i, sample, len(prompt), text, finish)
                rollout.engine_logprobs = response_logprobs(lps, len(response))
                out[i].append(rollout)

    def _sample_tools(self, conversations, records, indices: list[int], n: int, out: list[list[Rollout]]) -> None:
        if self._tool_loop is None:
            self._tool_loop = ToolLoop(self.engine, self.cfg.tool_loop)
        by_mode: dict[Any, list[int]] = {}
        for i in indices:
            by_mode.setdefault(records[i].get("mode"), []).append(i)
        for mode, group in by_mode.items():
            jobs = [i for i in group for _ in range(n)]
            for start in range(0, len(jobs), self.cfg.batch_size):
                chunk = jobs[start : start + self.cfg.batch_size]
                cfg = dataclasses.replace(self.cfg.tool_loop, seed=self._next_seed())
                t0 = time.perf_counter()
                trajectories = self._tool_loop.run(
                    [conversations[i] for i in chunk], mode=mode, media_root=self.cfg.media_root, config=cfg
                )
                self.generate_seconds += time.perf_counter() - t0
                for i, traj in zip(chunk, trajectories, strict=True):
                    self.generated_tokens += traj.policy_tokens
                    rollout = Rollout(records[i], i, traj.sample, traj.prompt_length, traj.text, traj.finish_reason)
                    if traj.engine_logprobs is not None:
                        rollout.engine_logprobs = traj.engine_logprobs[traj.prompt_length :]
                    out[i].append(rollout)
