"""``ToolLoopConfig``: limits and sampling of the Thyme tool loop (KEYE_FACTS B §1.3, §1.6) as one typed dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from keye.sandbox import SandboxConfig


@dataclass
class ToolLoopConfig:
    """Defaults are GRPO-ATS rollouts (text sampled at T=1, code greedy); :meth:`evaluation` is Thyme's eval loop."""

    max_rounds: int = 5  # code blocks executed per trajectory; the next block ends it (finish_reason max_rounds)
    max_images: int = 8  # images in the whole conversation (inputs + sandbox outputs); extra outputs are dropped
    max_new_tokens: int = 2048  # policy tokens per trajectory, over all segments
    max_length: int = 10240  # whole context (prompt + generated + sandbox output); reaching it ends the trajectory
    ats: bool = True  # adaptive temperature: stop at <code>, decode the code at code_temperature
    text_temperature: float = 1.0
    code_temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.05
    retries: int = 0  # failed round -> discard its segments and regenerate, at most this many times per round
    retry_temperature: float = 1.0  # a retried round samples at least this hot (Thyme eval: T raised to 1.0)
    seed: int | None = None  # seeds torch once per run() call
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def __post_init__(self) -> None:
        for name in ("max_rounds", "max_images", "retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"ToolLoopConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_new_tokens < 1 or self.max_length < 1:
            raise ValueError("ToolLoopConfig.max_new_tokens and max_length must be >= 1")

    @classmethod
    def evaluation(cls, **overrides) -> ToolLoopConfig:
        """Thyme's VLMEvalKit loop: near-greedy decoding (greedy here), 5 rounds, failed rounds retried 5 times."""
        base = dict(text_temperature=0.0, code_temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, retries=5)
        return dataclasses.replace(cls(), **{**base, **overrides})
