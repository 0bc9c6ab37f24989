"""Ulysses sequence parallelism: sharding a packed row, head/KV bookkeeping, and sp=2 ≡ sp=1 on two gloo ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipelines.encoded import IGNORE_INDEX, PackedBatch, TokenIds
from keye.loss import shift_labels
from keye.modeling import KeyeVLForConditionalGeneration
from keye.sequence_parallel import (
    group_ranks,
    init_sequence_parallel,
    kv_repeats,
    shard_packed_batch,
)
from tests.spine_fixtures import micro_config

ROOT = Path(__file__).resolve().parents[1]
IDS = TokenIds.from_config(micro_config(), pad=151643)
IMG = IDS.image


def _row(lengths: list[int], image_at: tuple[int, int] | None = None) -> PackedBatch:
    total = sum(lengths)
    ids = torch.arange(1000, 1000 + total)[None]
    if image_at:
        ids[0, image_at[0] : image_at[1]] = IMG
    labels = ids.clone()
    labels[0, :2] = IGNORE_INDEX
    cu = torch.cumsum(torch.tensor([0, *lengths]), 0).to(torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None, None].expand(3, 1, -1).clone()
    return PackedBatch(
        input_ids=ids, labels=labels, position_ids=positions, cu_seqlens=cu, token_ids=IDS, num_samples=len(lengths)
    )


def test_group_ranks_consecutive_sp_and_strided_dp():
    sp, dp = group_ranks(8, 4)
    assert sp == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dp == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with pytest.raises(ValueError, match="divide the world size 6"):
        group_ranks(6, 4)


def test_init_without_distributed():
    groups = init_sequence_parallel(1)
    assert (groups.sp_size, groups.dp_size, groups.sp_group) == (1, 1, None)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        init_sequence_parallel(2)


def test_kv_repeats():
    assert kv_repeats(32, 8, 8) == 1  # Qwen3-8B up to sp 8: no repeat
    assert kv_repeats(32, 8, 16) == 2
    assert kv_repeats(16, 8, 4) == 1
    assert kv_repeats(4, 1, 2) == 2
    assert kv_repeats(12, 6, 4) == 2  # 6 KV heads → 12, three query heads per rank
    with pytest.raises(ValueError, match="not divisible by sequence_parallel_size 3"):
        kv_repeats(16, 8, 3)


def test_shards_tile_the_padded_row_and_keep_the_global_shift():
    row = _row([5, 9, 7], image_at=(6, 12))  # 21 tokens, an image block across the cut at 11 (sp=2, padded 22)
    shards = [shard_packed_batch(row, r, 2) for r in range(2)]
    assert [s.row_length for s in shards] == [22, 22]
    assert shards[0].cu_seqlens.tolist() == [0, 5, 14, 21, 22]  # padding is its own segment
    ids = torch.cat([s.input_ids for s in shards], 1)
    assert torch.equal(ids[:, :21], row.input_ids)
    targets = torch.cat([s.shift_labels for s in shards], 1)
    expected = shift_labels(row.labels, row.cu_seqlens)
    assert torch.equal(targets[:, :21], expected) and targets[0, 21] == IGNORE_INDEX
    assert shards[0].shift_labels[0, -1] == row.labels[0, 11]  # the slice's last token predicts the next rank's first
    assert targets[0, 4] == IGNORE_INDEX and targets[0, 13] == IGNORE_INDEX  # never across a sample boundary
    assert torch.equal(torch.cat([s.position_ids for s in shards], 2)[..., :21], row.position_ids)
    assert [s.image_token_offset for s in shards] == [0, 5]
    assert sum(s.num_label_tokens for s in shards) == int((expected != IGNORE_INDEX).sum())


def test_shard_errors():
    row = _row([4, 4])
    with pytest.raises(ValueError, match="one packed row"):
        rows = PackedBatch(row.input_ids.expand(2, -1), row.labels, row.position_ids, row.cu_seqlens, IDS)
        shard_packed_batch(rows, 0, 2)
    with pytest.raises(ValueError, match="sp_rank 2"):
        shard_packed_batch(row, 2, 2)
    with pytest.raises(RuntimeError, match=r"sharded for sp_size 2: call init_sequence_parallel\(2\)"):
        shard_packed_batch(row, 0, 2).model_inputs()


def test_single_slice_path_equals_plain_forward():
    """sp = 1 through the sharded API (pre-shifted labels, SequenceShard embedding) gives the plain loss and grads."""
    from tests.sp_worker import build_row, grads

    torch.manual_seed(0)
    model = KeyeVLForConditionalGeneration(micro_config()).train()
    row = build_row()
    ref = model(**row.model_inputs())
    ref.loss.backward()
    ref_grads = grads(model)
    out = model(**shard_packed_batch(row, 0, 1).model_inputs(None))
    out.loss.backward()
    got = grads(model)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    assert int(out.num_label_tokens) == int(ref.num_label_tokens) > 0
    assert got.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="shift_labels"):
        inputs = shard_packed_batch(row, 0, 1).model_inputs(None)
        model(**inputs, labels=row.labels)


def test_two_ranks_match_one_rank():
    """torchrun, 2 gloo ranks: Ulysses sp=2 gives the sp=1 loss and (summed over ranks) the sp=1 gradients."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "tests" / "sp_worker.py"),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its two workers (their own session)
        stdout, stderr = proc.communicate()
        pytest.fail(f"sp worker timed out\n{stdout[-3000:]}{stderr[-3000:]}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("SP_RESULT ")]
    assert proc.returncode == 0 and lines, stdout[-3000:] + stderr[-3000:]
    r = json.loads(lines[0].removeprefix("SP_RESULT "))
    assert r["padded_length"] == r["row_length"] + 1  # odd row, padded to a multiple of 2
    (img0, vid0), (img1, vid1) = r["slice_offsets_image_video"]
    assert (img0, vid0, img1) == (0, 0, 0) and vid1 not in r["video_frame_starts"]  # the cut splits a frame
    assert r["image_tokens_per_rank"][0] == 0 < r["image_tokens_per_rank"][1]  # rank 0 runs the dummy ViT input
    assert r["labels_sp"] == r["labels_ref"] == r["labels_sum_of_slices"] > 0
    assert r["loss_diff"] < 1e-5
    assert abs(r["loss_without_all_to_all"] - r["loss_ref"]) > 1e-4  # the all-to-all matters
    assert r["grad_key_mismatch"] == [] and r["n_params_with_grad"] > 0
    assert r["grad_max_abs_diff"] < 1e-5 * max(1.0, r["grad_max_abs"])
    assert r["attention_gqa_repeat_diff"] < 1e-10
