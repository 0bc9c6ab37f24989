"""Worker for tests/test_sequence_parallel.py, run as ``torchrun --nproc_per_node 2 tests/sp_worker.py`` (gloo).

Every rank computes the reference (the whole packed row, no SP) and then its Ulysses slice (sp = world size);
rank 0 prints one ``SP_RESULT {json}`` line with the largest differences. The row holds a text, a video and an
image sample; the slice boundary cuts a video frame's tokens (both ranks encode that frame), rank 0's slice holds no
image tokens (it runs the dummy ViT input instead), and the row is padded to a multiple of sp.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines.packing import pack_row  # noqa: E402
from keye.attention import varlen_attention  # noqa: E402
from keye.compat import enable_activation_checkpointing  # noqa: E402
from keye.modeling import KeyeVLForConditionalGeneration  # noqa: E402
from keye.processing import KeyeVLProcessor  # noqa: E402
from keye.rope import split_frames  # noqa: E402
from keye.sequence_parallel import init_sequence_parallel, shard_packed_batch, ulysses_attention  # noqa: E402
from tests.spine_fixtures import micro_config, random_clip, random_image  # noqa: E402


def _conv(item: dict | None, question: str, answer: str) -> list[dict]:
    content = [item, {"type": "text", "text": question}] if item else question
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


def build_row():
    processor = KeyeVLProcessor()
    samples = [
        processor.encode_conversation(_conv(None, "Hi there", "Hello there there there there")),
        processor.encode_conversation(
            _conv({"type": "video", "video": random_clip()}, "Describe the clip.", "Random frames, four of them.")
        ),
        processor.encode_conversation(_conv({"type": "image", "image": random_image(56, 84)}, "What is it?", "Noise.")),
    ]
    # 133 tokens: odd, so sharding pads; the middle falls inside the third video frame's tokens.
    return pack_row(samples, sum(len(s) for s in samples))


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def check_attention_gqa_repeat(group: dist.ProcessGroup, rank: int, sp: int) -> float:
    """1 KV head < sp ranks: KV heads are repeated; output and input gradients match full-row attention."""
    g = torch.Generator().manual_seed(1)
    length, dim = 24, 8
    q = torch.randn(length, 4, dim, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(length, 1, dim, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(length, 1, dim, generator=g, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 7, 20, 24], dtype=torch.int32)

    def attend(a, b, c):
        return varlen_attention(a, b, c, cu, causal=True, backend="sdpa")

    ref = attend(q, k, v)
    ref.square().sum().backward()
    ref_grads = [t.grad.clone() for t in (q, k, v)]
    per = length // sp
    lo, hi = rank * per, (rank + 1) * per
    parts = [t.detach()[lo:hi].clone().requires_grad_() for t in (q, k, v)]
    out = ulysses_attention(*parts, group, attend)
    out.square().sum().backward()
    diff = (out - ref[lo:hi]).abs().max().item()
    # q's gradient is local to the slice; k and v feed every rank's queries, so their slice gradients are complete
    # only after the all-to-all backward, which already sums over ranks.
    for part, full in zip(parts, ref_grads):
        diff = max(diff, (part.grad - full[lo:hi]).abs().max().item())
    return diff


def main() -> int:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    sp = dist.get_world_size()
    groups = init_sequence_parallel(sp)
    rank = groups.sp_rank

    torch.manual_seed(0)
    model = KeyeVLForConditionalGeneration(micro_config()).train()
    for p in model.parameters():  # identical weights on every rank
        dist.broadcast(p.data, 0)
    batch = build_row()

    ref = model(**batch.model_inputs())
    ref.loss.backward()
    ref_grads = grads(model)

    shard = shard_packed_batch(batch, rank, sp)
    enable_activation_checkpointing(model)
    out = model(**shard.model_inputs())  # the SP group init_sequence_parallel made
    out.loss.backward()
    sp_grads = grads(model)
    for g in sp_grads.values():  # the row's gradient is the sum of the SP ranks' gradients
        dist.all_reduce(g, group=groups.sp_group)

    # Negative control: the same slices attending only within the slice (segments clipped to it, no all-to-all)
    # must not match the reference; this is what the all-to-all is for.
    with torch.no_grad():
        inputs = shard.model_inputs(groups.sp_group)
        inputs["sequence_parallel"].group = None
        n_local = shard.input_ids.shape[1]
        inputs["cu_seqlens"] = torch.unique((shard.cu_seqlens - rank * n_local).clamp(0, n_local)).to(torch.int32)
        local_sum = model(**inputs, num_items_in_batch=1).loss.reshape(1)
    dist.all_reduce(local_sum)
    offsets = [None] * sp
    dist.all_gather_object(offsets, (shard.image_token_offset, shard.video_token_offset))
    image_tokens = [None] * sp
    dist.all_gather_object(image_tokens, int((shard.input_ids == model.config.image_token_id).sum()))

    frames = split_frames(batch.visual.video_grid_thw)
    frame_tokens = (frames[:, 1] * frames[:, 2] // 4).tolist()
    frame_starts = [sum(frame_tokens[:i]) for i in range(len(frame_tokens))]

    missing = sorted(set(ref_grads) ^ set(sp_grads))
    grad_diff = max((sp_grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads if n in sp_grads)
    grad_scale = max(g.abs().max().item() for g in ref_grads.values())
    local_labels = torch.tensor([shard.num_label_tokens])
    dist.all_reduce(local_labels)
    result = {
        "sp": sp,
        "row_length": batch.input_ids.shape[1],
        "padded_length": shard.row_length,
        "slice_offsets_image_video": offsets,
        "video_frame_starts": frame_starts,
        "image_tokens_per_rank": image_tokens,
        "loss_without_all_to_all": local_sum.item() / int(ref.num_label_tokens),
        "loss_ref": ref.loss.item(),
        "loss_sp": out.loss.item(),
        "loss_diff": abs(out.loss.item() - ref.loss.item()),
        "labels_ref": int(ref.num_label_tokens),
        "labels_sp": int(out.num_label_tokens),
        "labels_sum_of_slices": int(local_labels),
        "grad_max_abs_diff": grad_diff,
        "grad_max_abs": grad_scale,
        "n_params_with_grad": len(ref_grads),
        "grad_key_mismatch": missing,
        "attention_gqa_repeat_diff": check_attention_gqa_repeat(groups.sp_group, rank, sp),
    }
    if rank == 0:
        print("SP_RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
