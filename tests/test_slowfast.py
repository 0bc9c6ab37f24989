"""Slow-Fast typing and token budget, on constructed frames (no decoding)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from data_pipelines.media import FAST, SLOW
from data_pipelines.resize import tokens_for
from data_pipelines.slowfast import (
    SlowFastSelector,
    budget_sizes,
    frame_features,
    select_frame_types,
    similarity,
    slow_token_limit,
)


def _scene(seed: int, h: int = 112, w: int = 168) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bh, bw = -(-h // 8), -(-w // 8)
    on = (torch.rand(bh, bw, generator=g) < 0.3).to(torch.uint8)
    col = torch.randint(64, 256, (3, bh, bw), generator=g, dtype=torch.uint8) * on
    return col.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :h, :w].contiguous()


def _complement(patch: torch.Tensor) -> torch.Tensor:
    """Grey where the patch is black, black where it is lit: HSV cosine 0 with the original."""
    return torch.where(patch.sum(0, keepdim=True) > 0, 0, 200).to(torch.uint8).expand(3, -1, -1)


def test_static_is_one_slow_then_fast():
    frames = _scene(0).expand(10, -1, -1, -1).contiguous()
    assert select_frame_types(frames) == [SLOW] + [FAST] * 9


def test_cut_every_k_frames_gives_slow_at_each_cut():
    k, n = 4, 20
    frames = torch.stack([_scene(i // k) for i in range(n)])
    frames[:, :, :8, :8] = 255  # a small change inside each scene must stay fast
    assert select_frame_types(frames) == [SLOW if i % k == 0 else FAST for i in range(n)]
    # computing features in chunks does not change decisions
    assert select_frame_types(frames, chunk=1) == select_frame_types(frames, chunk=7)


def test_compares_with_last_slow_not_previous_frame():
    """Each frame changes 6 new patches of 100: 94% like its predecessor, 88% like the frame two back."""
    frames = [_scene(1, 280, 280)]
    for step in range(4):
        f = frames[-1].clone()
        for p in range(6 * step, 6 * step + 6):
            r, c = divmod(p, 10)
            sl = (slice(None), slice(28 * r, 28 * r + 28), slice(28 * c, 28 * c + 28))
            f[sl] = _complement(f[sl])
        frames.append(f)
    assert select_frame_types(torch.stack(frames), min_frame_similarity=0.9) == [SLOW, FAST, SLOW, FAST, SLOW]


def test_black_frames_are_fast_and_black_patches_excluded():
    black = torch.zeros(3, 3, 56, 56, dtype=torch.uint8)
    assert select_frame_types(black) == [SLOW, FAST, FAST]
    assert math.isnan(similarity(frame_features(black[0]), frame_features(black[1])))


def test_threshold_compares_like_the_original():
    """9 of 10 similar patches is 0.9 in float32 = 0.89999998 < 0.9: the original calls that slow."""
    ref = _scene(2, 28, 280)
    other = ref.clone()
    other[:, :, :28] = _complement(ref[:, :, :28])
    feats = [frame_features(ref), frame_features(other)]
    sim = similarity(*feats)
    assert sim == pytest.approx(0.9, abs=1e-6)
    sel = SlowFastSelector(0.9)
    assert [sel.add(f) for f in feats] == [SLOW, SLOW]
    assert sel.frame_types == [SLOW, SLOW] and sel.num_slow == 2


def test_worked_example_1080p():
    slow, fast = budget_sizes(1080, 1920, 30, 90)
    assert slow == (560, 1008) and tokens_for(*slow) == 720
    assert fast == (308, 532) and tokens_for(*fast) == 209
    assert 30 * 720 + 90 * 209 == 40410
    slow, fast = budget_sizes(1080, 1920, 200, 400)
    assert tokens_for(*slow) == 190 and tokens_for(*fast) == 50


@pytest.mark.parametrize("hw", [(1080, 1920), (1920, 1080), (480, 640), (64, 64)])
def test_budget_stays_within_total(hw):
    for s, f in itertools.product([1, 10, 100, 600], [0, 50, 700]):
        slow, fast = budget_sizes(*hw, s, f)
        assert s * tokens_for(*slow) + f * tokens_for(*fast) <= 65536 or tokens_for(*slow) == 48
        assert tokens_for(*fast) <= max(tokens_for(*slow), 48)


def test_search_returns_first_infeasible():
    limit = slow_token_limit(1, 0, total_pixels=100 * 784)
    assert limit == 101 * 784  # 100 tokens fit, 101 do not: the original returns 101
    assert slow_token_limit(0, 0) == 768 * 784
