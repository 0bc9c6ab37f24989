"""Group-normalised advantages (GRPO/GSPO): A_i = (r_i − mean_group r) / (std_group r + eps).

A group is the G rollouts of one prompt.  A group whose rewards are all equal carries no learning signal; its
advantages are exactly zero (never NaN, never ±tiny from rounding in the mean), and the fraction of such groups is
reported because it is the quantity progressive hinting tries to drive down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GroupAdvantages:
    """Advantages in rollout order plus what a trainer logs about the groups."""

    advantages: Tensor  # [N], same order as the rewards
    zero_adv_group_frac: Tensor  # scalar: groups whose rewards were all equal
    group_mean: Tensor  # [num_groups]
    group_std: Tensor  # [num_groups]


def group_advantages(
    rewards: Tensor,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    eps: float = 1e-6,
    scale_by_std: bool = True,
    equal_tol: float = 1e-8,
) -> GroupAdvantages:
    """Advantages for consecutive groups of ``group_size`` or for arbitrary ``group_ids`` (ragged groups).

    ``rewards`` is [N] (or [num_groups, G]).  The std is the unbiased one (as TRL/verl/Thyme use); a group of one
    rollout, or whose reward spread is below ``equal_tol``, gets zero advantages.  ``scale_by_std=False`` gives the
    Dr.GRPO variant (centre only).
    """
    flat = rewards.reshape(-1).to(torch.float32)
    n = flat.numel()
    if group_ids is None:
        if group_size is None:
            if rewards.dim() != 2:
                raise ValueError(
                    f"group_advantages: pass group_size or group_ids for rewards of shape {tuple(rewards.shape)}"
                )
            group_size = rewards.shape[1]
        if group_size < 1 or n % group_size:
            raise ValueError(f"group_advantages: {n} rewards do not split into groups of group_size={group_size}")
        inverse = torch.arange(n, device=flat.device) // group_size
    else:
        if group_ids.numel() != n:
            raise ValueError(f"group_advantages: {group_ids.numel()} group ids for {n} rewards")
        _, inverse = torch.unique(group_ids.reshape(-1), return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if n else 0
    counts = torch.zeros(num_groups, device=flat.device).index_add_(0, inverse, torch.ones_like(flat))
    sums = torch.zeros(num_groups, device=flat.device).index_add_(0, inverse, flat)
    mean = sums / counts.clamp(min=1)
    centred = flat - mean[inverse]
    sq = torch.zeros(num_groups, device=flat.device).index_add_(0, inverse, centred * centred)
    std = (sq / (counts - 1).clamp(min=1)).sqrt()
    spread = torch.full((num_groups,), -torch.inf, device=flat.device).scatter_reduce(0, inverse, flat, "amax")
    spread = spread - torch.full((num_groups,), torch.inf, device=flat.device).scatter_reduce(0, inverse, flat, "amin")
    flat_group = (spread <= equal_tol) | (counts < 2)
    adv = centred / (std[inverse] + eps) if scale_by_std else centred
    adv = torch.where(flat_group[inverse], torch.zeros_like(adv), adv)
    frac = flat_group.float().mean() if num_groups else torch.zeros(())
    return GroupAdvantages(adv.reshape(rewards.shape), frac, mean, std)
