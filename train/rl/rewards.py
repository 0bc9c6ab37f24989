"""Reward functions for RL: plain ``fn(completion, sample) -> float``, named ``"module:function"`` in configs.

``sample`` is the RL prompt record (Thyme's schema): ``solution`` (ground truth, may itself be wrapped in
``<answer>``), optional ``question``, ``messages``, ``mode`` (reasoning mode; otherwise read from the user turn's
suffix), ``choices`` (multiple-choice options), ``tolerance`` (relative, for numbers) and ``judge`` (a callable
``prompt -> reply`` that the :class:`RewardCombiner` injects when a judge is configured).

Accuracy is rule-based first (choice letters, numbers with tolerance, ``math_verify`` when importable, normalised
string equality) and falls back to the judge only when the rules say "not equal" and a judge exists - Thyme's order.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keye.plugins import load_callable
from keye.reasoning import extract_final_answer, mode_of, normalize_mode, response_fits_mode

RewardFn = Callable[[str, Mapping[str, Any]], float]
JudgeFn = Callable[[str], str]

# math-verify handles LaTeX/sympy equivalence; without it we fall back to numbers + normalised strings.  It is
# imported on first use because it pulls in sympy (~0.7 s), which a trainer importing only the losses should not pay.
HAVE_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None

SANDBOX_ERROR_PREFIXES = ("Sandbox for ", "Error:", "Traceback (most recent call last)", "Execution denied")
_ANSWER_PREFIX = re.compile(
    r"^\s*(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|choice)\b(?:\s+is)?\s*[:：]?\s*", re.IGNORECASE
)
_CHOICE = re.compile(r"^\(?([A-Z])\)?(?:[.:)\s]|$)")
_SANDBOX_BLOCK = re.compile(r"<sandbox_output>(.*?)</sandbox_output>", re.DOTALL)
_THINK_BODY = re.compile(r"<think>(.*?)</think>", re.DOTALL)


# ----------------------------------------------------------------------------------------------- answer checking
def clean_answer(text: str) -> str:
    """Final answer of a completion (or a ground truth) without phrases like "The answer is"."""
    ans = extract_final_answer(text)
    ans = _ANSWER_PREFIX.sub("", ans, count=1).strip()
    m = re.fullmatch(r"\\text\{(.*)\}", ans, re.DOTALL)
    return (m.group(1) if m else ans).strip()


def _norm_str(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def _choice_letter(s: str) -> str | None:
    m = _CHOICE.match(s.strip())
    return m.group(1) if m else None


def _to_number(s: str) -> float | None:
    s = s.strip().strip("$").replace("\\%", "").rstrip("%").rstrip(".").strip()
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    m = re.fullmatch(r"([-+]?\d+)\s*/\s*(\d+)", s)
    if m and int(m.group(2)) != 0:
        return int(m.group(1)) / int(m.group(2))
    try:
        return float(s)
    except ValueError:
        return None


def _choice_texts(sample: Mapping[str, Any]) -> dict[str, str]:
    """``choices`` as {letter: text}; a list is lettered A, B, C…"""
    choices = sample.get("choices") or sample.get("options")
    if isinstance(choices, Mapping):
        return {str(k).strip().upper(): str(v) for k, v in choices.items()}
    if isinstance(choices, Sequence) and not isinstance(choices, str):
        return {chr(ord("A") + i): str(v) for i, v in enumerate(choices)}
    return {}


def math_verify_equal(gold: str, pred: str) -> bool:
    """``math_verify`` equivalence; False when it is not installed or cannot parse either side."""
    if not HAVE_MATH_VERIFY:
        return False
    from math_verify import parse, verify

    # math_verify's timeouts use signal.alarm, which only works on the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None

    def wrap(s: str) -> str:
        return s if ("$" in s or "\\boxed" in s) else f"${s}$"

    try:
        g = parse(wrap(gold), parsing_timeout=timeout)
        p = parse(wrap(pred), parsing_timeout=timeout)
        return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=timeout))
    except Exception:  # math_verify raises on pathological input; that is simply "not verified"
        return False


def rule_match(pred: str, gold: str, sample: Mapping[str, Any] | None = None) -> bool:
    """Rule-based equality of two cleaned answers: choice letter, number within tolerance, string, math_verify."""
    sample = sample or {}
    if not pred or not gold:
        return False
    choices = _choice_texts(sample)
    gold_letter = _choice_letter(gold) if (choices or re.fullmatch(r"\(?[A-Z]\)?\.?", gold)) else None
    if gold_letter is not None:
        pred_letter = _choice_letter(pred)
        if pred_letter is not None:
            return pred_letter == gold_letter
        correct_text = choices.get(gold_letter)
        return correct_text is not None and _norm_str(pred) == _norm_str(correct_text)
    g_num, p_num = _to_number(gold), _to_number(pred)
    if g_num is not None and p_num is not None:
        tol = float(sample.get("tolerance", 1e-4))
        return abs(p_num - g_num) <= tol * max(1.0, abs(g_num))
    if _norm_str(pred) == _norm_str(gold):
        return True
    return math_verify_equal(gold, pred)


# ------------------------------------------------------------------------------------------------------- judge
class OpenAICompatibleJudge:
    """An LLM judge behind an OpenAI-compatible ``/chat/completions`` endpoint, called with urllib (no SDK)."""

    def __init__(
        self,
        url: str,
        model: str = "",
        temperature: float = 0.1,
        max_tokens: int = 256,
        timeout_s: float = 60.0,
        api_key: str = "",
    ) -> None:
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else f"{base}/chat/completions"
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.timeout_s, self.api_key = timeout_s, api_key

    def __call__(self, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.endpoint, json.dumps(body).encode(), headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            data = json.loads(resp.read().decode())
        try:
            return str(data["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise ValueError(
                f"judge at {self.endpoint}: expected choices[0].message.content, got {data!r:.200}"
            ) from None


def make_judge(spec: JudgeFn | str | None, model: str = "", timeout_s: float = 60.0) -> JudgeFn | None:
    """A judge from a callable (used as is), an http(s) URL (OpenAI-compatible server) or nothing."""
    if spec is None or spec == "":
        return None
    if callable(spec):
        return spec
    if isinstance(spec, str) and spec.startswith(("http://", "https://")):
        return OpenAICompatibleJudge(spec, model=model, timeout_s=timeout_s)
    raise ValueError(f"judge: expected a callable or an http(s):// URL, got {spec!r}")


def ask_judge(judge: JudgeFn, prompt: str, key: str, retries: int = 3) -> float | None:
    """Ask for JSON ``{key: 0|1}``; retried on unparsable replies or network errors, ``None`` if never answered."""
    for _ in range(max(1, retries)):
        try:
            reply = judge(prompt)
        except (urllib.error.URLError, OSError, ValueError):
            continue
        for m in re.finditer(r"\{[^{}]*\}", reply):
            try:
                value = json.loads(m.group(0)).get(key)
            except (json.JSONDecodeError, AttributeError):
                continue
            if value in (0, 1, "0", "1"):
                return float(value)
    return None


CORRECTNESS_PROMPT = (
    "You are grading an answer to a question against the reference answer.\n"
    "Question: {question}\nReference answer: {solution}\nModel answer: {answer}\n"
    'Is the model answer correct? Reply only with JSON: {{"Correctness": 1}} or {{"Correctness": 0}}.'
)
CONSISTENCY_PROMPT = (
    "Below is the end of a model's reasoning and its final answer.\n"
    "Reasoning: {reasoning}\nAnswer: {answer}\n"
    "Does the reasoning support the answer (no contradiction, no leap)? "
    'Reply only with JSON: {{"Consistency": 1}} or {{"Consistency": 0}}.'
)


def _require_judge(sample: Mapping[str, Any], who: str) -> JudgeFn:
    judge = sample.get("judge")
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


def accuracy_reward(completion: str, sample: Mapping[str, Any]) -> float:
    """1.0 when the final answer matches ``solution`` by rule (or, failing that, by the judge), else 0.0."""
    pred, gold = clean_answer(completion), _gold(sample)
    if not pred:
        return 0.0
    if rule_match(pred, gold, sample):
        return 1.0
    judge = sample.get("judge")
    if judge is None:
        return 0.0
    prompt = CORRECTNESS_PROMPT.format(question=sample.get("question", ""), solution=gold, answer=pred)
    return ask_judge(judge, prompt, "Correctness") or 0.0


def judge_accuracy_reward(completion: str, sample: Mapping[str, Any]) -> float:
    """Correctness from the judge alone (for open-ended answers rules cannot check)."""
    judge = _require_judge(sample, "judge_accuracy_reward")
    pred = clean_answer(completion)
    if not pred:
        return 0.0
    prompt = CORRECTNESS_PROMPT.format(question=sample.get("question", ""), solution=_gold(sample), answer=pred)
    return ask_judge(judge, prompt, "Correctness") or 0.0


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
    return ask_judge(judge, prompt, "Consistency") or 0.0


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


class RewardCombiner:
    """Weighted sum of reward terms; returns the total and each term's raw (unweighted) value."""

    def __init__(self, cfg: RewardConfig | None = None, judge: JudgeFn | str | None = None) -> None:
        cfg = cfg or RewardConfig()
        if not cfg.terms:
            raise ValueError("rl.reward.terms: expected at least one reward term, got none")
        self.judge = make_judge(judge if judge is not None else cfg.judge_url, cfg.judge_model, cfg.judge_timeout_s)
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
