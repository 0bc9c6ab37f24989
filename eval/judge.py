"""Optional LLM judge: grades free-form answers (回答正确/回答错误) and rescues unparseable choice answers.

Two backends behind one ``complete(prompt, temperature) -> str``: a local model through the engine interface, or
an OpenAI-compatible ``/chat/completions`` endpoint over ``urllib``. As in the original KC-MMBench grader, an
unparseable verdict is retried (up to ``retries`` times) with a rising temperature.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from typing import Any

from eval.config import EvalConfig, GenerationConfig, JudgeConfig
from eval.engine import load_engine, settings_for

GRADE_PROMPT = (
    "你是一个评估助手。请判断模型回答与标准答案是否一致。\n"
    "问题：{question}\n标准答案：{answer}\n模型回答：{prediction}\n"
    "如果模型回答与标准答案含义一致，只输出“回答正确”；否则只输出“回答错误”。"
)
CHOOSE_PROMPT = (
    "Below is a question and a model's answer. Which of these choices does the answer select: {choices}? "
    "Reply with exactly one choice, or NONE if it selects none.\nQuestion:\n{question}\nAnswer:\n{prediction}"
)


class Judge(ABC):
    """Grades and picks; ``calls`` counts requests so the report can say how much judging happened."""

    def __init__(self, cfg: JudgeConfig) -> None:
        self.cfg = cfg
        self.calls = 0

    @abstractmethod
    def complete(self, prompt: str, temperature: float) -> str:
        """One judge reply to ``prompt``."""

    def _ask(self, prompt: str, parse: Any) -> Any:
        for attempt in range(max(1, self.cfg.retries)):
            self.calls += 1
            value = parse(self.complete(prompt, temperature=0.0 if attempt == 0 else min(1.0, 0.2 * attempt)))
            if value is not None:
                return value
        return None

    def grade(self, question: str, answer: str, prediction: str) -> bool:
        """True iff the judge says 回答正确; an answer it never grades counts as wrong."""

        def parse(text: str) -> bool | None:
            if "回答错误" in text:
                return False
            if "回答正确" in text:
                return True
            return None

        return bool(self._ask(GRADE_PROMPT.format(question=question, answer=answer, prediction=prediction), parse))

    def choose(self, question: str, prediction: str, choices: list[str]) -> str | None:
        def parse(text: str) -> str | None:
            found = [c for c in choices if re.search(rf"(?<![A-Za-z]){re.escape(c)}(?![A-Za-z])", text)]
            return found[0] if len(found) == 1 else ("" if "NONE" in text.upper() else None)

        prompt = CHOOSE_PROMPT.format(choices=", ".join(choices), question=question, prediction=prediction)
        return self._ask(prompt, parse) or None


class EngineJudge(Judge):
    """A local model as judge, through the same engine interface as the model under test."""

    def __init__(self, cfg: JudgeConfig, eval_cfg: EvalConfig) -> None:
        super().__init__(cfg)
        self.eval_cfg = dataclasses.replace(eval_cfg, model=cfg.model, engine=cfg.engine)
        self.engine = load_engine(self.eval_cfg)

    def complete(self, prompt: str, temperature: float) -> str:
        gen = GenerationConfig(
            max_new_tokens=self.cfg.max_new_tokens, temperature=temperature, top_k=1 if temperature == 0 else 20
        )
        conv = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        return self.engine.generate([conv], settings_for(self.eval_cfg, gen))[0]


class OpenAIJudge(Judge):
    """An OpenAI-compatible chat endpoint (``url`` is the base, e.g. ``http://127.0.0.1:8000/v1``)."""

    def complete(self, prompt: str, temperature: float) -> str:
        url = self.cfg.url.rstrip("/")
        if not url.endswith("/chat/completions"):
            url += "/chat/completions"
        body = {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": temperature,
            "max_tokens": self.cfg.max_new_tokens,
        }
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                data = json.loads(resp.read().decode("utf-8"))
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"judge endpoint {url}: request failed: {exc}") from exc
        try:
            return str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"judge endpoint {url}: unexpected response {str(data)[:200]}") from None


def make_judge(cfg: EvalConfig) -> Judge | None:
    kind = cfg.judge.kind
    if kind == "none":
        return None
    if kind == "engine":
        return EngineJudge(cfg.judge, cfg)
    if kind == "openai":
        if not cfg.judge.url:
            raise ValueError("judge.kind=openai needs judge.url (an OpenAI-compatible base URL)")
        return OpenAIJudge(cfg.judge)
    raise ValueError(f"judge.kind must be none, engine or openai, got {kind!r}")
