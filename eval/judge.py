"""The eval harness's judge: :mod:`keye.judge`'s client built from ``EvalConfig.judge``, or a local model.

Grading, retries and failure counting are :class:`keye.judge.Judge`'s (shared with the RL rewards); this module
only adds the local-model backend, which needs the eval engine seam, and the config-to-judge factory.
"""

from __future__ import annotations

import dataclasses

from eval.config import EvalConfig, GenerationConfig, JudgeConfig
from eval.engine import load_engine, settings_for
from keye.judge import CHOOSE_PROMPT, GRADE_PROMPT, Judge, JudgeError, OpenAIJudge

__all__ = ["CHOOSE_PROMPT", "GRADE_PROMPT", "EngineJudge", "Judge", "OpenAIJudge", "make_judge"]


class EngineJudge(Judge):
    """A local model as judge, through the same engine interface as the model under test."""

    def __init__(self, cfg: JudgeConfig, eval_cfg: EvalConfig) -> None:
        super().__init__(retries=cfg.retries)
        self.cfg = cfg
        self.eval_cfg = dataclasses.replace(eval_cfg, model=cfg.model, engine=cfg.engine)
        self.engine = load_engine(self.eval_cfg)

    def complete(self, prompt: str, temperature: float) -> str:
        gen = GenerationConfig(
            max_new_tokens=self.cfg.max_new_tokens, temperature=temperature, top_k=1 if temperature == 0 else 20
        )
        conv = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        try:
            return self.engine.generate([conv], settings_for(self.eval_cfg, gen))[0]
        except (RuntimeError, ValueError, OSError) as exc:
            raise JudgeError(f"judge model {self.cfg.model or self.cfg.engine}: {exc}") from exc


def make_judge(cfg: EvalConfig) -> Judge | None:
    kind = cfg.judge.kind
    if kind == "none":
        return None
    if kind == "engine":
        return EngineJudge(cfg.judge, cfg)
    if kind == "openai":
        if not cfg.judge.url:
            raise ValueError("judge.kind=openai needs judge.url (an OpenAI-compatible base URL)")
        j = cfg.judge
        return OpenAIJudge(
            j.url,
            j.model,
            api_key_env=j.api_key_env,
            timeout_s=j.timeout_s,
            max_tokens=j.max_new_tokens,
            retries=j.retries,
        )
    raise ValueError(f"judge.kind must be none, engine or openai, got {kind!r}")
