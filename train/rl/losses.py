"""Policy-gradient losses for RL post-training: GSPO, GSPO-token and GRPO on padded B×T tensors.

All three share one PPO-style clipped surrogate and one aggregation (seq-mean-token-mean: mean over a sequence's
policy tokens, then over sequences); they differ in where the importance ratio lives:

* ``grpo``: per-token ratio ``π_θ/π_old`` (ε = 0.2 / 0.28).
* ``gspo``: one ratio per sequence, the geometric mean of its token ratios, ``s_i = exp(mean_t(logp − old_logp))``,
  clipped on whole sequences (ε = 3e-4 / 4e-4).  It is broadcast to tokens with the stop-gradient trick
  ``log s_{i,t} = logp − sg(logp) + sg(log s_i)``, which keeps ``s_{i,t} == s_i`` in value and gives every token
  the gradient ``s_i · ∇logp_t`` - exactly the gradient of the sequence-level objective.
* ``gspo_token``: the same ratio with per-token advantages (GSPO paper §2.2).

``mask`` is 1 only on policy-generated tokens: padding, prompt, sandbox output and other tool tokens are 0 and
never reach the ratio, |y|, the loss or the gradient (masked positions may even hold inf/NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_TYPES = ("gspo", "gspo_token", "grpo")
DEFAULT_EPS: dict[str, tuple[float, float]] = {"gspo": (3e-4, 4e-4), "gspo_token": (3e-4, 4e-4), "grpo": (0.2, 0.28)}


@dataclass
class PolicyLossConfig:
    """Schema of ``rl.loss``; ``eps_low``/``eps_high`` left unset take the loss type's published defaults."""

    loss_type: str = "gspo"
    eps_low: float | None = None
    eps_high: float | None = None
    kl_coef: float = 0.0
    log_ratio_clamp: float = 10.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"rl.loss.loss_type: expected one of {LOSS_TYPES}, got {self.loss_type!r}")
        for name in ("eps_low", "eps_high"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"rl.loss.{name}: expected a value in [0, 1), got {value}")
        if self.kl_coef < 0:
            raise ValueError(f"rl.loss.kl_coef: expected >= 0, got {self.kl_coef}")
        if self.log_ratio_clamp <= 0:
            raise ValueError(f"rl.loss.log_ratio_clamp: expected > 0, got {self.log_ratio_clamp}")

    def eps(self) -> tuple[float, float]:
        """(ε_low, ε_high) with unset values filled from :data:`DEFAULT_EPS` for this loss type."""
        lo, hi = DEFAULT_EPS[self.loss_type]
        return (lo if self.eps_low is None else self.eps_low, hi if self.eps_high is None else self.eps_high)


def _check_shapes(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, ref_logp: Tensor | None) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp: expected a [B, T] tensor, got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name}: expected shape {tuple(logp.shape)} like logp, got {tuple(t.shape)}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"advantages: expected shape [B]={tuple(logp.shape[:1])} or [B, T]={tuple(logp.shape)}, "
            f"got {tuple(advantages.shape)}"
        )


def _seq_token_mean(values: Tensor, mask: Tensor, lengths: Tensor, num_sequences: Tensor | float) -> Tensor:
    """Mean over each sequence's masked tokens, summed over sequences and divided by ``num_sequences``."""
    per_seq = torch.where(mask, values, 0.0).sum(dim=1) / lengths.clamp(min=1)
    return per_seq.sum() / num_sequences


def _masked_stats(values: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Mean/min/max over masked entries without a host sync; 1.0 (a neutral ratio) when nothing is masked in."""
    values = values.detach()
    count = mask.sum()
    some = count > 0
    mean = torch.where(mask, values, 0.0).sum() / count.clamp(min=1)
    vmin = torch.where(mask, values, torch.inf).amin()
    vmax = torch.where(mask, values, -torch.inf).amax()
    one = torch.ones((), dtype=values.dtype, device=values.device)
    return {
        "mean": torch.where(some, mean, one),
        "min": torch.where(some, vmin, one),
        "max": torch.where(some, vmax, one),
    }


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: PolicyLossConfig | None = None,
    ref_logp: Tensor | None = None,
    num_sequences: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped policy loss of ``cfg.loss_type`` and detached stats (no host syncs).

    ``num_sequences`` is the divisor of the sequence mean; by default the number of sequences in this batch with
    at least one policy token.  Pass the global count when accumulating micro-batches or reducing across ranks
    so that every sequence carries the same weight however the batch was split.
    Stats: ``clip_frac`` (seq-mean-token-mean of the clipped indicator - for GSPO the fraction of clipped
    sequences), ``ratio_mean/min/max``, ``seq_len_mean`` (mean |y|), ``pg_loss``, and ``kl`` when KL is used.
    """
    cfg = cfg or PolicyLossConfig()
    _check_shapes(logp, old_logp, advantages, mask, ref_logp)
    valid = mask.bool()
    lengths = valid.sum(dim=1).to(logp.dtype)
    has_tokens = lengths > 0
    if num_sequences is None:
        num_sequences = has_tokens.sum().clamp(min=1).to(logp.dtype)
    eps_low, eps_high = cfg.eps()
    clamp = cfg.log_ratio_clamp

    token_log_ratio = torch.where(valid, logp - old_logp, 0.0)
    if cfg.loss_type == "grpo":
        log_ratio = token_log_ratio.clamp(-clamp, clamp)
        ratio_for_stats = log_ratio.detach().exp()
        stats_mask = valid
    else:
        log_seq_ratio = token_log_ratio.sum(dim=1) / lengths.clamp(min=1)  # log s_i, [B]
        safe_logp = torch.where(valid, logp, 0.0)
        log_ratio = safe_logp - safe_logp.detach() + log_seq_ratio.detach()[:, None]
        log_ratio = log_ratio.clamp(max=clamp)
        ratio_for_stats = log_seq_ratio.detach().clamp(max=clamp).exp()[:, None]
        stats_mask = has_tokens[:, None]

    adv = advantages.to(logp.dtype)
    if adv.dim() == 2:
        adv = torch.where(valid, adv, 0.0)
        if cfg.loss_type == "gspo":  # a sequence-level objective: one advantage per sequence
            adv = (adv.sum(dim=1) / lengths.clamp(min=1))[:, None]
    else:
        adv = adv[:, None]

    ratio = torch.where(valid, log_ratio, 0.0).exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    pg_loss = _seq_token_mean(per_token, valid, lengths, num_sequences)
    is_clipped = (clipped > unclipped).to(logp.dtype)

    ratio_stats = _masked_stats(ratio_for_stats.expand_as(stats_mask), stats_mask)
    stats: dict[str, Tensor] = {
        "pg_loss": pg_loss.detach(),
        "clip_frac": _seq_token_mean(is_clipped.detach(), valid, lengths, num_sequences),
        "ratio_mean": ratio_stats["mean"],
        "ratio_min": ratio_stats["min"],
        "ratio_max": ratio_stats["max"],
        "seq_len_mean": lengths.sum() / has_tokens.sum().clamp(min=1),
    }
    loss = pg_loss
    if ref_logp is not None and cfg.kl_coef > 0:
        # k3 estimator of KL(π_θ || π_ref): exp(ref − logp) − (ref − logp) − 1, clamped like verl's low_var_kl.
        delta = torch.where(valid, ref_logp - logp, 0.0).clamp(-20.0, 20.0)
        kl_tok = (delta.exp() - delta - 1.0).clamp(-10.0, 10.0)
        kl = _seq_token_mean(kl_tok, valid, lengths, num_sequences)
        loss = loss + cfg.kl_coef * kl
        stats["kl"] = kl.detach()
    return loss, stats


def gspo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, **kwargs) -> tuple[Tensor, dict]:
    """GSPO with its published defaults; keyword arguments as for :class:`PolicyLossConfig` and :func:`policy_loss`."""
    return _typed("gspo", logp, old_logp, advantages, mask, **kwargs)


def gspo_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, **kwargs) -> tuple[Tensor, dict]:
    """GSPO-token: sequence ratio, per-token advantages allowed."""
    return _typed("gspo_token", logp, old_logp, advantages, mask, **kwargs)


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, **kwargs) -> tuple[Tensor, dict]:
    """GRPO: token-level ratio, ε = 0.2 / 0.28, seq-mean-token-mean."""
    return _typed("grpo", logp, old_logp, advantages, mask, **kwargs)


def _typed(loss_type: str, logp, old_logp, advantages, mask, **kwargs) -> tuple[Tensor, dict]:
    cfg_keys = {"eps_low", "eps_high", "kl_coef", "log_ratio_clamp"}
    cfg = PolicyLossConfig(loss_type=loss_type, **{k: kwargs.pop(k) for k in list(kwargs) if k in cfg_keys})
    return policy_loss(logp, old_logp, advantages, mask, cfg, **kwargs)
