"""The one LLM judge client, shared by evaluation and the RL rewards so both ask the same question the same way.

A :class:`Judge` turns ``complete(prompt, temperature) -> reply`` into verdicts. Every question is retried (up
to ``retries`` times, the temperature rising after the first try, as KC-MMBench's grader does) on an
unparseable reply *and* on a failed request; a question that never gets a verdict returns ``None`` and is
counted in ``failures``, so a dead or confused judge shows up in eval's results and in the RL step's metrics
instead of turning silently into "wrong"/0.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# KC-MMBench's grader prompt (Kwai's VLMEvalKit fork): one grading question for eval and the accuracy reward.
GRADE_PROMPT = (
    "你是一个评估助手。请判断模型回答与标准答案是否一致。\n"
    "问题：{question}\n标准答案：{answer}\n模型回答：{prediction}\n"
    "如果模型回答与标准答案含义一致，只输出“回答正确”；否则只输出“回答错误”。"
)
CHOOSE_PROMPT = (
    "Below is a question and a model's answer. Which of these choices does the answer select: {choices}? "
    "Reply with exactly one choice, or NONE if it selects none.\nQuestion:\n{question}\nAnswer:\n{prediction}"
)


class JudgeError(RuntimeError):
    """A judge request that failed (network, HTTP status, malformed response); retried, then counted."""


def parse_grade(reply: str) -> bool | None:
    """回答正确/回答错误 (错误 first: "回答正确与否：回答错误" is wrong), or ``{"Correctness": 0|1}``."""
    if "回答错误" in reply:
        return False
    if "回答正确" in reply:
        return True
    value = parse_json_key(reply, "Correctness")
    return None if value is None else value > 0


def parse_json_key(reply: str, key: str) -> float | None:
    """``key`` of the first flat JSON object in ``reply`` that holds 0 or 1 for it; None when there is none."""
    for m in re.finditer(r"\{[^{}]*\}", reply):
        try:
            value = json.loads(m.group(0)).get(key)
        except (json.JSONDecodeError, AttributeError):
            continue
        if value in (0, 1, "0", "1"):
            return float(value)
    return None


class Judge(ABC):
    """Verdicts from a chat model; ``calls`` counts requests, ``failures`` questions left without a verdict."""

    def __init__(self, retries: int = 5, temperature: float = 0.0) -> None:
        self.retries = max(1, retries)
        self.temperature = temperature
        self.calls = 0
        self.failures = 0
        self.last_error = ""

    @abstractmethod
    def complete(self, prompt: str, temperature: float) -> str:
        """One reply to ``prompt``; raises :class:`JudgeError` when the request fails."""

    def ask(self, prompt: str, parse: Callable[[str], T | None]) -> T | None:
        """The first parseable reply over ``retries`` tries; ``None`` (and one more failure) when there is none."""
        for attempt in range(self.retries):
            temperature = self.temperature if attempt == 0 else min(1.0, max(self.temperature, 0.2 * attempt))
            self.calls += 1
            try:
                value = parse(self.complete(prompt, temperature))
            except JudgeError as exc:
                self.last_error = str(exc)
                continue
            if value is not None:
                return value
            self.last_error = f"no verdict in the judge's replies to: {prompt[:80]!r}"
        self.failures += 1
        return None

    def grade(self, question: str, answer: str, prediction: str) -> bool | None:
        """Does ``prediction`` mean ``answer``? ``None`` when the judge never says."""
        return self.ask(GRADE_PROMPT.format(question=question, answer=answer, prediction=prediction), parse_grade)

    def choose(self, question: str, prediction: str, choices: list[str]) -> str | None:
        """Which of ``choices`` the prediction selects; ``""`` when the judge says none, ``None`` when it never says."""

        def parse(text: str) -> str | None:
            found = [c for c in choices if re.search(rf"(?<![A-Za-z]){re.escape(c)}(?![A-Za-z])", text)]
            if len(found) == 1:
                return found[0]
            return "" if "NONE" in text.upper() else None

        return self.ask(
            CHOOSE_PROMPT.format(choices=", ".join(choices), question=question, prediction=prediction), parse
        )


class CallableJudge(Judge):
    """A plain ``prompt -> reply`` function as a judge (tests, custom reward set-ups); its errors count as failures."""

    def __init__(self, fn: Callable[[str], str], retries: int = 3) -> None:
        super().__init__(retries=retries)
        self.fn = fn

    def complete(self, prompt: str, temperature: float) -> str:
        try:
            return str(self.fn(prompt))
        except (OSError, ValueError, RuntimeError) as exc:
            raise JudgeError(f"judge {self.fn!r}: {exc}") from exc


class OpenAIJudge(Judge):
    """An OpenAI-compatible ``/chat/completions`` endpoint over urllib (no SDK); ``url`` may be the base (``…/v1``).

    The API key is read from the environment variable ``api_key_env`` at each request, never from a config file.
    """

    def __init__(
        self,
        url: str,
        model: str = "",
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_tokens: int = 64,
        retries: int = 5,
        temperature: float = 0.0,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"judge url: expected an http(s):// OpenAI-compatible base URL, got {url!r}")
        super().__init__(retries=retries, temperature=temperature)
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else f"{base}/chat/completions"
        self.model, self.api_key_env, self.timeout_s, self.max_tokens = model, api_key_env, timeout_s, max_tokens

    def complete(self, prompt: str, temperature: float) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": temperature,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                data = json.loads(resp.read().decode("utf-8"))
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            raise JudgeError(f"judge endpoint {self.endpoint}: request failed: {exc}") from exc
        try:
            return str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge endpoint {self.endpoint}: unexpected response {str(data)[:200]}") from None


def as_judge(judge: Judge | Callable[[str], str] | None) -> Judge | None:
    """A :class:`Judge` as is, a ``prompt -> reply`` callable wrapped, ``None`` as ``None``."""
    if judge is None or isinstance(judge, Judge):
        return judge
    if callable(judge):
        return CallableJudge(judge)
    raise TypeError(f"judge: expected a Judge or a callable prompt -> reply, got {type(judge).__name__}")
