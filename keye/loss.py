"""Next-token cross-entropy computed in chunks, so the logits of a 128K-token row never exist in full.

Only positions with a label are projected to the vocabulary; each chunk is recomputed in the backward pass
(activation checkpointing), so peak memory is one chunk of logits. Returns a *sum* and a *count* so the
trainer can divide by the global label-token count across micro-batches, accumulation steps and ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data_pipelines.encoded import IGNORE_INDEX

DEFAULT_CHUNK = 4096


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for next-token prediction: ``labels`` shifted left by one, never across a packed boundary."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        # The last token of each packed segment must not predict the first token of the next one.
        flat = targets.view(-1)
        ends = cu_seqlens[1:].long() - 1
        flat[ends[ends < flat.numel()]] = IGNORE_INDEX
    return targets


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token losses and label count for already-shifted ``targets`` (``[B, L]``, ``IGNORE_INDEX`` skipped).

    Without any label the sum is ``hidden.sum() * 0``, so the backward still reaches every layer (collective
    backward passes such as sequence parallelism's all-to-all need every rank to take part).
    """
    flat = targets.reshape(-1)
    index = (flat != IGNORE_INDEX).nonzero().squeeze(-1)
    count = torch.tensor(index.numel(), device=hidden.device)
    if index.numel() == 0:
        return hidden.sum() * 0.0, count
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    t = flat.index_select(0, index)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        hc, tc = h[start : start + chunk_size], t[start : start + chunk_size]
        if torch.is_grad_enabled() and (hc.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss, hc, weight, tc, use_reentrant=False)
        else:
            total = total + _chunk_loss(hc, weight, tc)
    return total, count


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token losses and number of label tokens. ``hidden`` ``[B, L, H]``, ``labels`` ``[B, L]``."""
    return cross_entropy_sum(hidden, weight, shift_labels(labels, cu_seqlens), chunk_size)
