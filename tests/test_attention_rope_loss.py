"""Varlen attention against a dense reference, rotary positions, projector ordering, chunked loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data_pipelines.encoded import IGNORE_INDEX
from keye.attention import resolve_backend, varlen_attention
from keye.loss import chunked_cross_entropy
from keye.rope import MultimodalRotaryEmbedding, multimodal_position_ids
from keye.vision import KeyeProjector


def dense_reference(q, k, v, seq_lens, causal):
    """Plain softmax attention with an explicit block-diagonal (and causal) mask."""
    total = q.shape[0]
    seg = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= torch.arange(total)[:, None] >= torch.arange(total)[None, :]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_varlen_matches_dense_block_diagonal(causal):
    torch.manual_seed(0)
    seq_lens = [5, 3, 5, 1, 7]
    total = sum(seq_lens)
    q, k, v = torch.randn(total, 4, 8), torch.randn(total, 2, 8), torch.randn(total, 2, 8)
    cu = F.pad(torch.cumsum(torch.tensor(seq_lens), 0), (1, 0)).int()
    out = varlen_attention(q, k, v, cu, max(seq_lens), causal=causal, backend="sdpa")
    torch.testing.assert_close(out, dense_reference(q, k, v, seq_lens, causal), atol=1e-5, rtol=1e-5)


def test_backend_resolution_on_cpu():
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("magic", torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError):
        resolve_backend("torch_varlen", torch.device("cpu"), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch_varlen", "flash_attn"])
def test_gpu_backends_match_sdpa(backend, gpu):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    if gpu.type != "cuda":  # the GPU check's dry run: the same code, SDPA against itself
        backend = "sdpa"
    torch.manual_seed(0)
    seq_lens = [64, 17, 128]
    total = sum(seq_lens)
    q, k, v = (torch.randn(total, h, 64, device=gpu, dtype=torch.bfloat16) for h in (8, 2, 2))
    cu = F.pad(torch.cumsum(torch.tensor(seq_lens), 0), (1, 0)).int().to(gpu)
    ref = varlen_attention(q, k, v, cu, 128, causal=True, backend="sdpa")
    out = varlen_attention(q, k, v, cu, 128, causal=True, backend=backend)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_positions_resume_after_a_grid_at_start_plus_max_side():
    img, vid, merge = 151655, 151656, 2
    # text(3) + image 2x3 merged + text(2) + two video frames of 1x2 merged separated by a text token
    ids = torch.tensor([1, 2, 3] + [img] * 6 + [4, 5] + [vid] * 2 + [9] + [vid] * 2 + [7])
    pos = multimodal_position_ids(ids, img, vid, torch.tensor([[1, 4, 6]]), torch.tensor([[2, 2, 4]]), merge)
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    assert pos[:, 3:9].tolist() == [[3] * 6, [3, 3, 3, 4, 4, 4], [3, 4, 5, 3, 4, 5]]
    assert pos[:, 9].tolist() == [6, 6, 6]  # 3 + max(2, 3)
    assert pos[:, 11:13].tolist() == [[8, 8], [8, 8], [8, 9]]  # frame 1 starts after text at 7
    assert pos[:, 13].tolist() == [10, 10, 10]  # 8 + max(1, 2)
    assert pos[:, 14:16].tolist() == [[11, 11], [11, 11], [11, 12]]
    assert pos[:, 16].tolist() == [13, 13, 13]


def test_position_count_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"image placeholder tokens \(5\) do not match"):
        multimodal_position_ids(torch.tensor([151655] * 5), 151655, 151656, torch.tensor([[1, 4, 6]]))


def test_multimodal_rotary_equals_plain_rope_for_text():
    rope = MultimodalRotaryEmbedding(head_dim=32, rope_theta=1e6, mrope_section=[4, 6, 6])
    pos = torch.arange(10)[None]
    cos, sin = rope(torch.zeros(1, 10, 8), pos)
    inv = 1.0 / (1e6 ** (torch.arange(0, 32, 2).float() / 32))
    emb = torch.cat([pos[0, :, None] * inv] * 2, dim=-1)
    torch.testing.assert_close(cos[0], emb.cos())
    torch.testing.assert_close(sin[0], emb.sin())


def test_projector_merge_matches_einops_ordering():
    einops = pytest.importorskip("einops")
    torch.manual_seed(0)
    grids = torch.tensor([[1, 4, 6], [2, 2, 2]])
    d = 5
    feats = torch.randn(int((grids[:, 0] * grids[:, 1] * grids[:, 2]).sum()), d)
    proj = KeyeProjector(d, 7)
    index = proj.merge_index(grids, feats.device)
    merged = feats[index].reshape(-1, 4 * d)
    expected, offset = [], 0
    for t, h, w in grids.tolist():
        block = feats[offset : offset + t * h * w]
        expected.append(
            einops.rearrange(block, "(t h p1 w p2) d -> (t h w) (p1 p2 d)", t=t, h=h // 2, w=w // 2, p1=2, p2=2)
        )
        offset += t * h * w
    torch.testing.assert_close(merged, torch.cat(expected))


def test_chunked_cross_entropy_matches_reference_and_respects_packing():
    torch.manual_seed(0)
    hidden = torch.randn(1, 12, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (1, 12))
    labels[0, :2] = IGNORE_INDEX
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    total, count = chunked_cross_entropy(hidden, weight, labels, cu_seqlens=cu, chunk_size=3)
    # reference: shift within each packed segment only
    logits = hidden[0] @ weight.T
    ref_terms = []
    for s, e in ((0, 5), (5, 12)):
        for t in range(s, e - 1):
            if labels[0, t + 1] != IGNORE_INDEX:
                ref_terms.append(F.cross_entropy(logits[t : t + 1], labels[0, t + 1 : t + 2]))
    ref = torch.stack(ref_terms).sum()
    assert int(count) == len(ref_terms)
    torch.testing.assert_close(total, ref)
    g1 = torch.autograd.grad(total, (hidden, weight))
    g2 = torch.autograd.grad(ref, (hidden, weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
