"""RL post-training parts that need no model: policy losses (GSPO/GSPO-token/GRPO), group advantages, rewards
and progressive prompt hinting.  The rollout/update loop composes these."""

from train.rl.advantages import GroupAdvantages, group_advantages
from train.rl.hints import HintScheduler, build_ladders, hinted_messages, parse_ladder
from train.rl.losses import PolicyLossConfig, grpo_loss, gspo_loss, gspo_token_loss, policy_loss
from train.rl.rewards import RewardCombiner, RewardConfig, RewardTerm, resolve_reward

__all__ = [
    "GroupAdvantages",
    "HintScheduler",
    "PolicyLossConfig",
    "RewardCombiner",
    "RewardConfig",
    "RewardTerm",
    "build_ladders",
    "group_advantages",
    "grpo_loss",
    "gspo_loss",
    "gspo_token_loss",
    "hinted_messages",
    "parse_ladder",
    "policy_loss",
    "resolve_reward",
]
