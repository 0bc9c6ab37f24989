"""Schema of the ``rl:`` section of a training config: rollouts, rewards, loss, hinting (KEYE_FACTS B §2).

Defaults are the paper's GSPO recipe: G=8 rollouts at T=1.0 / top-p 0.9 / top-k 50, seq-mean-token-mean GSPO with
ε = 3e-4 / 4e-4, four minibatch updates per rollout batch, no KL, progressive hinting on all-fail groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keye.generation import VLLMSettings, check_engine
from keye.thyme.config import ToolLoopConfig
from keye.typed_config import ConfigError, from_dict, read_yaml
from train.rl.losses import PolicyLossConfig
from train.rl.rewards import RewardConfig


@dataclass
class RolloutConfig:
    """How rollouts are sampled; ``tools`` routes every prompt through the Thyme loop (records can opt in with
    ``"tools": true``). ``engine``: ``transformers`` (the policy's own ``generate``) or ``vllm`` (built once per run
    from ``model.path``, the policy's weights pushed into it before every rollout; ``vllm`` sets its options)."""

    engine: str = "transformers"
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    group_size: int = 8  # G rollouts per prompt
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    max_new_tokens: int = 3072
    max_prompt_tokens: int = 5120  # longer prompts are skipped (counted), never truncated mid-image
    batch_size: int = 64  # sequences per generate call
    media_root: str | None = None  # where relative image/video paths in the prompt records live
    tools: bool = False
    tool_loop: ToolLoopConfig = field(default_factory=ToolLoopConfig)

    def __post_init__(self) -> None:
        check_engine(self.engine, "rl.rollout.engine")
        if self.group_size < 2:
            raise ValueError(f"rl.rollout.group_size: group advantages need >= 2 rollouts, got {self.group_size}")
        if self.temperature <= 0:
            raise ValueError(f"rl.rollout.temperature: RL rollouts must sample (> 0), got {self.temperature}")
        for name in ("max_new_tokens", "max_prompt_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.rollout.{name}: expected >= 1, got {getattr(self, name)}")


@dataclass
class HintConfig:
    """Progressive prompt hinting: probe all-fail prompts with ``k`` samples from level 1 upward."""

    enabled: bool = True
    k: int = 4
    min_passes: int = 1
    max_level: int = 5
    regenerate: bool = True  # re-roll an all-fail group at its new level in the same step (else: from next visit)
    reprobe_on_full_pass: bool = True  # a hinted group that all passed tries to lower its level


@dataclass
class UpdateConfig:
    """The optimisation side of one RL step."""

    minibatches: int = 4  # policy updates per rollout batch (the first is on-policy, ratio exactly 1)
    epochs: int = 1  # passes over the rollout batch
    micro_batch_tokens: int = 16384  # tokens per packed forward; a minibatch is split into such rows
    logprob_chunk: int = 4096  # rows of [chunk, vocab] logits alive at once
    shuffle: bool = True  # spread each group over the minibatches (seeded)
    kl_reference: bool = False  # keep a frozen copy of the initial policy for KL (needs loss.kl_coef > 0)


@dataclass
class RLConfig:
    """One RL run's algorithm settings; the trainer owns the model, optimiser, data and checkpoints."""

    prompts: list[str] = field(default_factory=list)  # JSONL files of prompt records (messages, solution, hints)
    prompts_per_step: int = 16
    pass_term: str = "accuracy_reward"  # a rollout "passes" when this reward term is > 0 (hinting, pass rate)
    seed: int = 0
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    hints: HintConfig = field(default_factory=HintConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1:
            raise ValueError(f"rl.prompts_per_step: expected >= 1, got {self.prompts_per_step}")
        if self.update.minibatches < 1 or self.update.epochs < 1:
            raise ValueError("rl.update.minibatches and rl.update.epochs must be >= 1")
        if self.update.kl_reference and self.loss.kl_coef <= 0:
            raise ValueError("rl.update.kl_reference is set but rl.loss.kl_coef is 0: set both or neither")
        names = [t.name or t.fn.rpartition(":")[2] for t in self.reward.terms]
        if self.pass_term not in names:
            raise ValueError(f"rl.pass_term: {self.pass_term!r} is not one of the reward terms {names}")


def load_rl_config(path: str | Path, overrides: list[str] | None = None) -> RLConfig:
    """The ``rl:`` section of a run YAML (other sections belong to the trainer), plus ``rl.x=y`` overrides."""
    from omegaconf import OmegaConf

    data = read_yaml(path)
    if "rl" not in data:
        raise ConfigError(f"{path}: no 'rl' section")
    section: Any = data["rl"]
    if overrides:
        bad = [o for o in overrides if "=" not in o or not o.startswith("rl.")]
        if bad:
            raise ConfigError(f"override '{bad[0]}' is not of the form rl.key=value")
        dotlist = OmegaConf.from_dotlist([o[len("rl.") :] for o in overrides])
        section = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(section), dotlist))
    try:
        return from_dict(RLConfig, section, f"{path} (rl)")
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}: {exc}") from None
