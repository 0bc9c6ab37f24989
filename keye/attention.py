"""Variable-length attention: one function, three backends.

Packed rows and ViT inputs carry ``cu_seqlens`` (offsets of independent segments in a flat token axis);
attention never crosses a segment boundary. Backends, fastest first:

- ``flash_attn``: ``flash_attn_varlen_func`` (CUDA, fp16/bf16, when the ``flash-attn`` package is installed);
- ``torch_varlen``: PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (CUDA);
- ``sdpa``: block-diagonal attention through ``scaled_dot_product_attention``, batching segments of equal
  length so that no ``T×T`` mask is ever materialised (works everywhere, including CPU).

``keye_attention_forward`` adapts this to transformers' ``AttentionInterface`` so that the Qwen3 decoder
layers (reused unchanged) attend within packed samples.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from keye.compat import torch_varlen_kwargs
from keye.sequence_parallel import ulysses_attention

BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa")
ATTN_IMPLEMENTATION = "keye_varlen"  # the name registered with transformers' AttentionInterface


@functools.cache
def _flash_attn_func():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:  # (a try block also keeps transformers' remote-code import check from requiring flash-attn)
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen_func():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the concrete backend for ``backend`` (``auto`` = fastest available on this device and dtype)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}', expected one of {BACKENDS}")
    cuda_half = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if backend == "auto":
        if cuda_half and _flash_attn_func() is not None:
            return "flash_attn"
        if cuda_half and _torch_varlen_func() is not None:
            return "torch_varlen"
        return "sdpa"
    if backend == "flash_attn" and (_flash_attn_func() is None or not cuda_half):
        raise RuntimeError("attention backend 'flash_attn' needs the flash-attn package and CUDA fp16/bf16 tensors")
    if backend == "torch_varlen" and (_torch_varlen_func() is None or not cuda_half):
        raise RuntimeError("attention backend 'torch_varlen' needs torch.nn.attention.varlen and CUDA fp16/bf16")
    return backend


def _sdpa_block_diagonal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int], causal: bool, scale: float | None
) -> torch.Tensor:
    """Block-diagonal attention: segments of equal length are stacked into one SDPA batch."""
    n_heads, n_kv = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    starts = [0]
    for n in seq_lens[:-1]:
        starts.append(starts[-1] + n)
    by_len: dict[int, list[int]] = {}
    for start, n in zip(starts, seq_lens):
        if n > 0:
            by_len.setdefault(n, []).append(start)
    for n, group in by_len.items():
        idx = (torch.tensor(group, device=q.device)[:, None] + torch.arange(n, device=q.device)[None, :]).reshape(-1)
        qs, ks, vs = (
            t.index_select(0, idx).view(len(group), n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v)
        )
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=n_kv != n_heads)
        out.index_copy_(0, idx, o.transpose(1, 2).reshape(-1, n_heads, q.shape[2]))
    return out


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    fn = _torch_varlen_func()
    gqa = k.shape[1] != q.shape[1]
    kwargs = torch_varlen_kwargs(fn, causal, gqa)
    if gqa and "enable_gqa" not in kwargs:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, **kwargs)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    causal: bool,
    scale: float | None = None,
    backend: str = "auto",
    seq_lens: list[int] | None = None,
) -> torch.Tensor:
    """Attention within segments. ``q``: ``[T, Hq, D]``, ``k``/``v``: ``[T, Hkv, D]``; returns ``[T, Hq, D]``.

    ``seq_lens`` (host copy of the segment lengths) saves a device sync per call for the SDPA backend.
    """
    chosen = resolve_backend(backend, q.device, q.dtype)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if chosen == "sdpa":
        if seq_lens is None:
            seq_lens = torch.diff(cu_seqlens).tolist()
        return _sdpa_block_diagonal(q, k, v, seq_lens, causal, scale)
    if max_seqlen is None:
        max_seqlen = int(torch.diff(cu_seqlens).max())
    if chosen == "flash_attn":
        return _flash_attn_func()(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal
        )
    return _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale)


def keye_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: varlen over ``cu_seq_lens_q`` when given, else masked SDPA.

    ``query``: ``[B, H, L, D]``; returns ``[B, L, H, D]`` as transformers' attention functions do.
    """
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        kwargs.pop("sliding_window", None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if dropout:
        raise ValueError("attention dropout is not supported on packed (cu_seqlens) inputs")
    bsz, n_heads, length, head_dim = query.shape
    q = query.transpose(1, 2).reshape(bsz * length, n_heads, head_dim)
    k = key.transpose(1, 2).reshape(bsz * length, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(bsz * length, value.shape[1], head_dim)
    backend = kwargs.get("keye_attn_backend") or getattr(module.config, "keye_attn_backend", "auto")

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return varlen_attention(
            q,
            k,
            v,
            cu_seqlens,
            kwargs.get("max_length_q"),
            causal=True,
            scale=scaling,
            backend=backend,
            seq_lens=kwargs.get("keye_seq_lens"),
        )

    # --- Ulysses sequence parallelism: q/k/v hold this rank's slice of one row (keye/sequence_parallel.py) ---
    sp_group = kwargs.get("keye_sp_group")
    if sp_group is not None:
        if bsz != 1:
            raise ValueError(f"sequence-parallel attention takes one packed row, got {bsz}")
        out = ulysses_attention(q, k, v, sp_group, attend)
    else:
        out = attend(q, k, v)
    return out.view(bsz, length, n_heads, head_dim), None


def register_with_transformers() -> None:
    """Make ``attn_implementation='keye_varlen'`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, keye_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
