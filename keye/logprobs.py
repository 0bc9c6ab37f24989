"""Per-token log-probabilities (and entropies) of chosen tokens without materialising full-vocabulary logits.

RL needs ``log π(y_t | …)`` for every response token; a 32K-token row times a 152K vocabulary is 20 GB of fp32
logits, so the final hidden states are projected through ``lm_head`` only at the scored positions and only
``chunk_size`` rows at a time (each chunk recomputed in the backward pass).  The hidden states are taken from the
text model with a forward hook, so the model runs its ordinary ``forward`` - through a DeepSpeed engine too, whose
ZeRO-3 hooks then gather ``lm_head`` for the per-chunk calls like for any module call.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from data_pipelines.encoded import IGNORE_INDEX

DEFAULT_CHUNK = 4096


def _unwrap(model: nn.Module) -> nn.Module:
    """The ``KeyeVLForConditionalGeneration`` inside a DeepSpeed engine or DDP wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def final_hidden_states(model: nn.Module, inputs: Mapping[str, Tensor | None]) -> Tensor:
    """``[B, L, H]`` output of the text model's final norm for ``inputs`` (model kwargs, no labels)."""
    core = _unwrap(model)
    captured: list[Tensor] = []
    handle = core.model.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
    try:
        model(**{k: v for k, v in inputs.items() if k != "labels"}, return_logits=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one pass through the text model, saw {len(captured)}")
    return captured[0]


def _chunk_logp(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _chunk_logp_entropy(head: nn.Module, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    logits = head(hidden).float()
    lse = logits.logsumexp(-1)
    probs = (logits - lse[:, None]).exp()
    entropy = lse - (probs * logits).sum(-1)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - lse, entropy


def logprobs_from_hidden(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``log_softmax(head(hidden))[target]`` at positions whose target is not ``IGNORE_INDEX`` (0 elsewhere).

    ``hidden`` ``[B, L, H]``, ``targets`` ``[B, L]`` (the token each position predicts). Returns fp32 ``[B, L]``
    log-probs and, with ``with_entropy``, the entropy of each scored position's distribution (no gradient).
    """
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden states {tuple(hidden.shape[:2])}")
    flat_t = targets.reshape(-1)
    index = (flat_t != IGNORE_INDEX).nonzero().squeeze(-1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    t = flat_t.index_select(0, index)
    grad = torch.is_grad_enabled() and h.requires_grad
    logps, ents = [], []
    for start in range(0, h.shape[0], chunk_size):
        hc, tc = h[start : start + chunk_size], t[start : start + chunk_size]
        if with_entropy and not grad:
            lp, ent = _chunk_logp_entropy(head, hc, tc)
            logps.append(lp)
            ents.append(ent)
            continue
        if with_entropy:
            with torch.no_grad():
                ents.append(_chunk_logp_entropy(head, hc.detach(), tc)[1])
        if grad:
            logps.append(checkpoint(_chunk_logp, head, hc, tc, use_reentrant=False))
        else:
            logps.append(_chunk_logp(head, hc, tc))
    out = hidden.new_zeros(flat_t.shape, dtype=torch.float32)
    if logps:
        out = out.index_put((index,), torch.cat(logps))
    entropy = None
    if with_entropy:
        entropy = torch.zeros(flat_t.shape, dtype=torch.float32, device=hidden.device)
        if ents:
            entropy[index] = torch.cat(ents)
        entropy = entropy.view_as(targets)
    return out.view_as(targets), entropy


def token_logprobs(
    model: nn.Module,
    inputs: Mapping[str, Tensor | None],
    targets: Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[B, L]`` of ``targets`` under ``model`` for the batch ``inputs`` (see :func:`logprobs_from_hidden`).

    ``inputs`` are ``forward`` keyword arguments (e.g. ``PackedBatch.model_inputs()``; ``labels`` is ignored);
    ``targets[b, p]`` is the token position ``p`` predicts (``keye.loss.shift_labels`` of the labels).
    Differentiable when grad is enabled; the entropy never is.
    """
    hidden = final_hidden_states(model, inputs)
    head = _unwrap(model).lm_head
    return logprobs_from_hidden(head, hidden, targets.to(hidden.device), chunk_size, with_entropy)
