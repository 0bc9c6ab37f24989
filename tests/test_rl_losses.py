"""GSPO / GSPO-token / GRPO losses against explicit per-sequence reference loops (values and gradients)."""

import math

import pytest
import torch

from keye.typed_config import ConfigError, from_dict
from train.rl.losses import PolicyLossConfig, grpo_loss, gspo_loss, gspo_token_loss, policy_loss

DT = torch.float64


def _batch():
    """4 sequences of unequal length with a masked tool span; seq 3 has no policy tokens at all."""
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    logp = -torch.rand(B, T, generator=g, dtype=DT) * 3
    mask = torch.zeros(B, T, dtype=DT)
    mask[0, :6] = 1
    mask[0, 2:4] = 0  # sandbox output span inside a rollout
    mask[1, :3] = 1
    mask[2, :7] = 1
    mask[2, 4] = 0
    # per-sequence drift of the policy: s_0 ~ 1 (inside the clip range), s_1 >> 1, s_2 << 1
    drift = torch.tensor([1e-4, 0.02, -0.03, 0.0], dtype=DT)[:, None]
    old = logp - drift - 1e-5 * torch.randn(B, T, generator=g, dtype=DT)
    adv = torch.tensor([0.7, 1.3, -0.9, 2.0], dtype=DT)
    return logp, old, adv, mask


def _ref_gspo(logp, old, adv, mask, eps_low, eps_high):
    terms = []
    for i in range(logp.shape[0]):
        idx = [t for t in range(logp.shape[1]) if mask[i, t] > 0]
        if not idx:
            continue
        log_s = sum(logp[i, t] - old[i, t] for t in idx) / len(idx)
        s = torch.exp(log_s)
        terms.append(-torch.min(s * adv[i], torch.clamp(s, 1 - eps_low, 1 + eps_high) * adv[i]))
    return sum(terms) / len(terms)


def _ref_grpo(logp, old, adv, mask, eps_low, eps_high):
    terms = []
    for i in range(logp.shape[0]):
        idx = [t for t in range(logp.shape[1]) if mask[i, t] > 0]
        if not idx:
            continue
        tok = []
        for t in idx:
            r = torch.exp(logp[i, t] - old[i, t])
            a = adv[i] if adv.dim() == 1 else adv[i, t]
            tok.append(-torch.min(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a))
        terms.append(sum(tok) / len(tok))
    return sum(terms) / len(terms)


def _grad(fn, logp, *args, **kwargs):
    x = logp.clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach(), x.grad, out[1] if isinstance(out, tuple) else None


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.05, 0.01)])
def test_gspo_matches_reference_loop(eps):
    logp, old, adv, mask = _batch()
    loss, grad, stats = _grad(gspo_loss, logp, old, adv, mask, eps_low=eps[0], eps_high=eps[1])
    ref_loss, ref_grad, _ = _grad(_ref_gspo, logp, old, adv, mask, *eps)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert torch.all(grad[mask == 0] == 0)
    assert stats["seq_len_mean"].item() == pytest.approx((4 + 3 + 6) / 3)


def test_gspo_clipping_zeroes_whole_sequences():
    logp, old, adv, mask = _batch()
    adv = torch.tensor([0.7, 1.3, -0.9, 2.0], dtype=DT)  # s_1 > 1+ε with A>0 and s_2 < 1−ε with A<0: both clipped
    loss, grad, stats = _grad(gspo_loss, logp, old, adv, mask)
    assert torch.all(grad[1] == 0) and torch.all(grad[2] == 0)
    assert torch.all(grad[0][mask[0] > 0] != 0)
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)
    # the same sequence with the advantage's sign flipped is not clipped (PPO's pessimistic bound)
    _, grad_flip, stats_flip = _grad(gspo_loss, logp, old, -adv, mask)
    assert torch.all(grad_flip[1][mask[1] > 0] != 0)
    assert stats_flip["clip_frac"].item() == 0
    # every policy token of an unclipped sequence gets the same gradient: s_i·A_i/|y_i| per sequence (÷ sequences)
    s0 = torch.exp(((logp - old) * mask)[0].sum() / mask[0].sum())
    torch.testing.assert_close(grad[0][mask[0] > 0], (-s0 * adv[0] / 4 / 3).expand(4))


def test_gspo_on_policy_equals_grpo_sequence_mean():
    logp, _, adv, mask = _batch()
    old = logp.detach().clone()
    l_gspo, g_gspo, s_gspo = _grad(gspo_loss, logp, old, adv, mask)
    l_grpo, g_grpo, _ = _grad(grpo_loss, logp, old, adv, mask)
    torch.testing.assert_close(l_gspo, l_grpo)
    torch.testing.assert_close(g_gspo, g_grpo)
    torch.testing.assert_close(l_gspo, -(adv[:3]).mean())
    assert s_gspo["ratio_mean"].item() == pytest.approx(1.0) and s_gspo["clip_frac"].item() == 0


def test_grpo_matches_reference_loop():
    logp, old, adv, mask = _batch()
    old = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1), dtype=DT)  # token clipping
    loss, grad, stats = _grad(grpo_loss, logp, old, adv, mask)
    ref_loss, ref_grad, _ = _grad(_ref_grpo, logp, old, adv, mask, 0.2, 0.28)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert 0 < stats["clip_frac"].item() < 1


def test_gspo_token_with_per_token_advantages():
    logp, old, adv, mask = _batch()
    # constant per-token advantages: identical to GSPO in value and gradient
    l_tok, g_tok, _ = _grad(gspo_token_loss, logp, old, adv[:, None].expand_as(logp).clone(), mask)
    l_seq, g_seq, _ = _grad(gspo_loss, logp, old, adv, mask)
    torch.testing.assert_close(l_tok, l_seq)
    torch.testing.assert_close(g_tok, g_seq)
    # plain GSPO given [B, T] advantages stays sequence-level: one (masked-mean) advantage per sequence
    noisy = adv[:, None] + torch.where(mask > 0, 0.0, 100.0)  # junk outside the mask must not leak in
    l_bt, g_bt, _ = _grad(gspo_loss, logp, old, noisy, mask)
    torch.testing.assert_close(l_bt, l_seq)
    torch.testing.assert_close(g_bt, g_seq)
    # varying per-token advantages: each token's surrogate uses s_i with its own advantage
    adv_t = torch.linspace(-1, 1, logp.numel(), dtype=DT).reshape(logp.shape)

    def ref(x, old, adv_t, mask):
        terms = []
        for i in range(x.shape[0]):
            idx = [t for t in range(x.shape[1]) if mask[i, t] > 0]
            if not idx:
                continue
            s_sg = torch.exp(sum(x[i, t] - old[i, t] for t in idx).detach() / len(idx))
            toks = []
            for t in idx:
                s_t = s_sg * torch.exp(x[i, t] - x[i, t].detach())
                a = adv_t[i, t]
                toks.append(-torch.min(s_t * a, torch.clamp(s_t, 1 - 3e-4, 1 + 4e-4) * a))
            terms.append(sum(toks) / len(toks))
        return sum(terms) / len(terms)

    l_tok, g_tok, _ = _grad(gspo_token_loss, logp, old, adv_t, mask)
    l_ref, g_ref, _ = _grad(ref, logp, old, adv_t, mask)
    torch.testing.assert_close(l_tok, l_ref)
    torch.testing.assert_close(g_tok, g_ref)


@pytest.mark.parametrize("loss_type", ["gspo", "gspo_token", "grpo"])
def test_masked_positions_never_matter(loss_type):
    logp, old, adv, mask = _batch()
    ref_logp = logp - 0.05
    cfg = PolicyLossConfig(loss_type=loss_type, kl_coef=0.1)
    l1, g1, s1 = _grad(policy_loss, logp, old, adv, mask, cfg, ref_logp=ref_logp)
    junk = torch.where(mask > 0, 0.0, torch.tensor(float("nan"), dtype=DT))
    junk[1, 5] = float("inf")
    l2, g2, s2 = _grad(policy_loss, logp + junk, old - junk, adv, mask, cfg, ref_logp=ref_logp + junk)
    assert torch.isfinite(l2)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    assert torch.all(g2[mask == 0] == 0)
    for key in s1:
        torch.testing.assert_close(s1[key], s2[key], msg=key)


def test_empty_sequence_contributes_nothing():
    logp, old, adv, mask = _batch()
    full, g_full, _ = _grad(gspo_loss, logp, old, adv, mask)
    part, g_part, _ = _grad(gspo_loss, logp[:3], old[:3], adv[:3], mask[:3])
    torch.testing.assert_close(full, part)
    torch.testing.assert_close(g_full[:3], g_part)
    assert torch.all(g_full[3] == 0)
    # a batch of nothing but empty sequences is a finite zero with neutral stats
    loss, grad, stats = _grad(gspo_loss, logp[3:], old[3:], adv[3:], mask[3:])
    assert loss.item() == 0 and torch.all(grad == 0)
    assert all(math.isfinite(v.item()) for v in stats.values())


def test_num_sequences_makes_microbatches_add_up():
    logp, old, adv, mask = _batch()
    full, g_full, _ = _grad(gspo_loss, logp, old, adv, mask)
    x = logp.clone().requires_grad_(True)
    total = sum(gspo_loss(x[sl], old[sl], adv[sl], mask[sl], num_sequences=3)[0] for sl in (slice(0, 2), slice(2, 4)))
    total.backward()
    torch.testing.assert_close(total.detach(), full)
    torch.testing.assert_close(x.grad, g_full)


def test_k3_kl_term():
    logp, old, adv, mask = _batch()
    ref_logp = logp + 0.1 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    base, _, _ = _grad(gspo_loss, logp, old, adv, mask)
    loss, _, stats = _grad(gspo_loss, logp, old, adv, mask, ref_logp=ref_logp, kl_coef=0.5)
    kls = []
    for i in range(3):
        idx = [t for t in range(logp.shape[1]) if mask[i, t] > 0]
        d = [ref_logp[i, t] - logp[i, t] for t in idx]
        kls.append(sum(math.exp(v) - v - 1 for v in d) / len(d))
    assert stats["kl"].item() == pytest.approx(sum(kls) / 3)
    assert (loss - base).item() == pytest.approx(0.5 * sum(kls) / 3)


def test_log_ratio_clamp_keeps_huge_drift_finite():
    logp, old, adv, mask = _batch()
    loss, grad, stats = _grad(gspo_loss, logp, old - 50.0, -adv, mask)
    assert torch.isfinite(loss) and torch.all(torch.isfinite(grad))
    assert stats["ratio_max"].item() == pytest.approx(math.exp(10.0))


def test_config_defaults_and_errors():
    assert PolicyLossConfig().eps() == (3e-4, 4e-4)
    assert PolicyLossConfig(loss_type="grpo").eps() == (0.2, 0.28)
    cfg = from_dict(PolicyLossConfig, {"loss_type": "grpo", "eps_high": 0.3, "kl_coef": 0.01})
    assert cfg.eps() == (0.2, 0.3) and cfg.kl_coef == 0.01
    with pytest.raises((ValueError, ConfigError), match="loss_type"):
        from_dict(PolicyLossConfig, {"loss_type": "ppo"})
    with pytest.raises(ValueError, match="advantages: expected shape"):
        logp, old, adv, mask = _batch()
        policy_loss(logp, old, adv[:2], mask)
