"""Reward functions for RL: plain ``fn(completion, sample) -> float``, named ``"module:function"`` in configs.

``sample`` is the RL prompt record (Thyme's schema): ``solution`` (ground truth, may itself be wrapped in
``<answer>``), optional ``question``, ``messages``, ``mode`` (reasoning mode; otherwise read from the user turn's
suffix), ``choices`` (multiple-choice options), ``answer_kind`` (one of :data:`keye.answers.KINDS`; otherwise
inferred from the solution), ``tolerance`` (relative, for numbers) and ``judge`` (a :class:`keye.judge.Judge` or
a ``prompt -> reply`` callable, which the :class:`RewardCombiner` injects when a judge is configured).

Accuracy is :func:`keye.answers.check_answer`, the checker the eval harness scores with, so a benchmark's score
equals the mean accuracy reward on the same outputs. The judge is asked only what the rules cannot decide, and a
question it never answers is counted (:meth:`RewardCombiner.take_judge_failures`, logged by the RL step).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keye.answers import Check, check_answer, clean_answer, infer_kind
from keye.judge import Judge, OpenAIJudge, as_judge, parse_json_key
from keye.plugins import load_callable
from keye.reasoning import mode_of, normalize_mode, response_fits_mode

RewardFn = Callable[[str, Mapping[str, Any]], float]
JudgeFn = Callable[[str], str]
OpenAICompatibleJudge = OpenAIJudge  # the name RL configs and tests know

SANDBOX_ERROR_PREFIXES = ("Sandbox for ", "Error:", "Traceback (most recent call last)", "Execution denied")
_SANDBOX_BLOCK = re.compile(r"<sandbox_output>(.*?)</sandbox_output>", re.DOTALL)
_THINK_BODY = re.compile(r"<think>(.*?)</think>", re.DOTALL)


# ------------------------------------------------------------------------------------------------------- judge
def make_judge(
    spec: Judge | JudgeFn | str | None, model: str = "", timeout_s: float = 60.0, api_key_env: str = "OPENAI_API_KEY"
) -> Judge | None:
    """A judge from a :class:`Judge` or callable (wrapped), an http(s) URL (OpenAI-compatible server) or nothing."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, str):
        if not spec.startswith(("http://", "https://")):
            raise ValueError(f"judge: expected a callable or an http(s):// URL, got {spec!r}")
        return OpenAIJudge(
            spec, model, api_key_env=api_key_env, timeout_s=timeout_s, max_tokens=256, retries=3, temperature=0.1
        )
    return as_judge(spec)


CONSISTENCY_PROMPT = (
    "Below is the end of a model's reasoning and its final answer.\n"
    "Reasoning: {reasoning}\nAnswer: {answer}\n"
    "Does the reasoning support the answer (no contradiction, no leap)? "
    'Reply only with JSON: {{"Consistency": 1}} or {{"Consistency": 0}}.'
)


def _require_judge(sample: Mapping[str, Any], who: str) -> Judge:
    judge = as_judge(sample.get("judge"))
    if judge is None:
        raise ValueError(f"{who}: needs a judge (set rl.reward.judge_url or pass judge= to RewardCombiner)")
    return judge


# ---------------------------------------------------------------------------------------------- reward functions
def _gold(sample: Mapping[str, Any]) -> str:
    gold = sample.get("solution", sample.get("answer"))
    if gold is None:
        raise KeyError(f"reward: sample {sample.get('id', '?')!r} has no 'solution' (or 'answer') field")
    return clean_answer(str(gold))


def sample_mode(sample: Mapping[str, Any]) -> str:
    """The reasoning mode a sample asks for: its ``mode`` field, else the suffix of its last user turn."""
    if sample.get("mode") is not None:
        return normalize_mode(sample["mode"])
    for msg in reversed(sample.get("messages") or []):
        if msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, list):
                texts = [c.get("text", "") for c in content if isinstance(c, Mapping) and c.get("type") == "text"]
                content = texts[-1] if texts else ""
            return mode_of(str(content or ""))
    return "auto"


def _options(sample: Mapping[str, Any]) -> list[str]:
    """``choices`` in letter order (a mapping ``{letter: text}`` is sorted by letter)."""
    choices = sample.get("choices") or sample.get("options")
    if isinstance(choices, Mapping):
        return [str(choices[k]) for k in sorted(choices, key=lambda k: str(k).strip().upper())]
    if isinstance(choices, Sequence) and not isinstance(choices, str):
        return [str(v) for v in choices]
    return []


def check_sample(completion: str, sample: Mapping[str, Any]) -> Check:
    """:func:`keye.answers.check_answer` for an RL record: its solution, choices, answer kind, tolerance, judge."""
    gold, options = _gold(sample), _options(sample)
    return check_answer(
        completion,
        gold,
        sample.get("answer_kind") or infer_kind(gold, options),
        options=options,
        question=str(sample.get("question", "")),
        judge=as_judge(sample.get("judge")),
        tolerance=float(sample.get("tolerance", 1e-4)),
    )


def accuracy_reward(completion: str, sample: Mapping[str, Any]) -> float:
    """1.0 when the answer is correct by :func:`keye.answers.check_answer` (rules, then the judge), else 0.0."""
    return 1.0 if check_sample(completion, sample).correct else 0.0


def judge_accuracy_reward(completion: str, sample: Mapping[str, Any]) -> float:
    """Correctness from the judge alone (for open-ended answers rules cannot check)."""
    judge = _require_judge(sample, "judge_accuracy_reward")
    pred = clean_answer(completion)
    if not pred:
        return 0.0
    return 1.0 if judge.grade(str(sample.get("question", "")), _gold(sample), pred) else 0.0


def format_reward(completion: str, sample: Mapping[str, Any]) -> float:
    """1.0 when the completion follows its mode's grammar (:func:`keye.reasoning.response_fits_mode`), else 0.0."""
    return 0.0 if response_fits_mode(completion, sample_mode(sample)) else 1.0


def format_penalty(completion: str, sample: Mapping[str, Any]) -> float:
    """Keye's internal convention: 0 when the format fits the mode, −1 when it does not."""
    return format_reward(completion, sample) - 1.0


def _units(text: str) -> list[str]:
    """Words for alphabetic scripts, single characters for CJK, so repeats are found in both."""
    return re.findall(
        r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]|[^\W\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]+|[^\w\s]", text
    )


def repetition_penalty(completion: str, sample: Mapping[str, Any], ngram: int = 6, threshold: float = 0.3) -> float:
    """In [−1, 0]: 0 until the share of repeated ``ngram``-grams exceeds ``threshold``, then linearly to −1."""
    units = _units(completion)
    total = len(units) - ngram + 1
    if total <= 1:
        return 0.0
    grams = {tuple(units[i : i + ngram]) for i in range(total)}
    repeated = 1.0 - len(grams) / total
    if repeated <= threshold:
        return 0.0
    return -min(1.0, (repeated - threshold) / (1.0 - threshold))


def code_success_reward(completion: str, sample: Mapping[str, Any]) -> float:
    """Fraction of ``<sandbox_output>`` blocks that are not sandbox errors (0.0 when no code ran)."""
    blocks = _SANDBOX_BLOCK.findall(completion)
    if not blocks:
        return 0.0
    ok = sum(1 for b in blocks if not b.strip().startswith(SANDBOX_ERROR_PREFIXES))
    return ok / len(blocks)


def consistency_reward(completion: str, sample: Mapping[str, Any]) -> float:
    """Judge: does the end of the thinking (last 500 characters) support the answer?  0/1."""
    judge = _require_judge(sample, "consistency_reward")
    thinking = _THINK_BODY.findall(completion)
    answer = clean_answer(completion)
    if not thinking or not answer:
        return 0.0
    prompt = CONSISTENCY_PROMPT.format(reasoning=thinking[-1][-500:], answer=answer)
    return judge.ask(prompt, lambda reply: parse_json_key(reply, "Consistency")) or 0.0


def thyme_reward(completion: str, sample: Mapping[str, Any]) -> float:
    """Thyme: acc + 0.5·fmt + 0.5·cons·1[acc > 0] (max 2.0); cons is 0 without a judge; fmt is think-mode format."""
    acc = accuracy_reward(completion, sample)
    fmt = 0.0 if response_fits_mode(completion, "think") else 1.0
    cons = consistency_reward(completion, sample) if (acc > 0 and sample.get("judge") is not None) else 0.0
    return acc + 0.5 * fmt + 0.5 * cons


BUILTIN_REWARDS: dict[str, RewardFn] = {
    fn.__name__: fn
    for fn in (
        accuracy_reward,
        judge_accuracy_reward,
        format_reward,
        format_penalty,
        repetition_penalty,
        code_success_reward,
        consistency_reward,
        thyme_reward,
    )
}


# ----------------------------------------------------------------------------------------------------- combiner
def resolve_reward(name: str) -> RewardFn:
    """``"package.module:function"`` (or a built-in's bare name) to the function."""
    if ":" not in name:
        if name in BUILTIN_REWARDS:
            return BUILTIN_REWARDS[name]
        raise ValueError(f"reward {name!r}: expected 'module:function' or one of {sorted(BUILTIN_REWARDS)}")
    return load_callable(name, "reward")


@dataclass
class RewardTerm:
    """One weighted reward; ``gated`` terms are zeroed where the config's gate term is <= 0 (Thyme's rule)."""

    fn: str = "accuracy_reward"
    weight: float = 1.0
    name: str = ""
    gated: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardConfig:
    """Schema of ``rl.reward``: the default is Thyme's acc + 0.5·fmt (+ 0.5·cons when a judge is set)."""

    terms: list[RewardTerm] = field(
        default_factory=lambda: [RewardTerm("accuracy_reward", 1.0), RewardTerm("format_reward", 0.5)]
    )
    gate: str = ""
    judge_url: str = ""
    judge_model: str = ""
    judge_timeout_s: float = 60.0
    judge_api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the judge's API key


class RewardCombiner:
    """Weighted sum of reward terms; returns the total and each term's raw (unweighted) value."""

    def __init__(self, cfg: RewardConfig | None = None, judge: Judge | JudgeFn | str | None = None) -> None:
        cfg = cfg or RewardConfig()
        if not cfg.terms:
            raise ValueError("rl.reward.terms: expected at least one reward term, got none")
        spec = judge if judge is not None else cfg.judge_url
        self.judge = make_judge(spec, cfg.judge_model, cfg.judge_timeout_s, cfg.judge_api_key_env)
        self._judge_failures_taken = 0
        self.terms: list[tuple[str, float, bool, RewardFn]] = []
        for term in cfg.terms:
            fn = resolve_reward(term.fn)
            if term.kwargs:
                fn = functools.partial(fn, **dict(term.kwargs))
            name = term.name or term.fn.rpartition(":")[2]
            if any(name == t[0] for t in self.terms):
                raise ValueError(f"rl.reward.terms: two terms are named {name!r}; give one a distinct 'name'")
            self.terms.append((name, float(term.weight), term.gated, fn))
        names = [t[0] for t in self.terms]
        if cfg.gate and cfg.gate not in names:
            raise ValueError(f"rl.reward.gate: {cfg.gate!r} is not one of the term names {names}")
        if any(t[2] for t in self.terms) and not cfg.gate:
            raise ValueError("rl.reward: some terms are gated but rl.reward.gate names no term")
        self.gate = cfg.gate

    def take_judge_failures(self) -> int:
        """Questions the judge left without a verdict since the last call (those rewards counted as 0)."""
        if self.judge is None:
            return 0
        new = self.judge.failures - self._judge_failures_taken
        self._judge_failures_taken = self.judge.failures
        return new

    def __call__(self, completion: str, sample: Mapping[str, Any]) -> tuple[float, dict[str, float]]:
        if self.judge is not None and sample.get("judge") is None:
            sample = {**sample, "judge": self.judge}
        values: dict[str, float] = {}
        gate_open = True
        if self.gate:  # evaluate the gate first so gated (often judge-backed) terms are not paid for needlessly
            name, _, _, fn = next(t for t in self.terms if t[0] == self.gate)
            values[name] = float(fn(completion, sample))
            gate_open = values[name] > 0
        for name, _, gated, fn in self.terms:
            if name in values:
                continue
            values[name] = float(fn(completion, sample)) if (gate_open or not gated) else 0.0
        total = sum(weight * values[name] for name, weight, _, _ in self.terms)
        return total, {name: values[name] for name, _, _, _ in self.terms}

    def score_batch(
        self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]
    ) -> tuple[list[float], dict[str, list[float]]]:
        """Totals and per-term columns for a batch of rollouts (sample i belongs to completion i)."""
        if len(completions) != len(samples):
            raise ValueError(f"score_batch: {len(completions)} completions but {len(samples)} samples")
        totals: list[float] = []
        columns: dict[str, list[float]] = {name: [] for name, _, _, _ in self.terms}
        for completion, sample in zip(completions, samples):
            total, parts = self(completion, sample)
            totals.append(total)
            for name, value in parts.items():
                columns[name].append(value)
        return totals, columns
