"""Ulysses sequence parallelism (DeepSpeed-Ulysses) for 32K–128K-token packed rows.

Ranks form sequence-parallel (SP) groups of ``sp_size`` consecutive ranks; the ranks holding the same position in
their SP group form a data-parallel (DP) group. All ranks of an SP group train on the same packed row, each holding
a contiguous ``L/sp`` slice of its tokens (``shard_packed_batch``). Every layer is token-wise except attention;
there an all-to-all trades the sequence split for a head split (each rank gets all ``L`` tokens of ``H/sp`` heads),
the ordinary varlen attention runs with the row's full ``cu_seqlens``, and a second all-to-all trades back
(``ulysses_attention``, called by ``keye.attention.keye_attention_forward``). Activation memory per rank is
``1/sp`` of the row's; communication is four all-to-alls of ``L·H·D/sp`` elements per layer (one for q|k|v, one
for the output, the same again in backward).

Choices, and why:

- **ViT on the slice's frames.** Each image and each video frame is its own ViT sequence and merge grid, so a rank
  encodes just the images/frames whose placeholder tokens fall in its slice (``SequenceShard.image_token_offset``
  says where the slice starts in the row's visual tokens; a frame cut by the boundary is encoded by both ranks).
  Exact, no communication, and the ViT (≈ 15% of an 8B step on video rows: 4 patches per visual token) is not
  repeated ``sp`` times.
- **Labels shifted before sharding.** ``shard_packed_batch`` shifts the full row (respecting sample boundaries),
  so the last token of a slice predicts the first token of the next rank's slice without any exchange.
- **KV heads < sp.** Each KV head is repeated ``r = sp / gcd(H_kv, sp)`` times before the all-to-all so every
  rank receives whole GQA groups (query head ``h`` still reads KV head ``h // (H_q/H_kv)``); ``H_q`` must be
  divisible by ``sp`` and by ``r·H_kv``. Qwen3-8B (32 q / 8 kv heads) needs no repeat up to sp = 8.
- **Own all-to-all.** ``torch.distributed.all_to_all_single`` in a small autograd function rather than
  ``deepspeed.sequence.layer``: that one needs ``deepspeed.comm`` initialised and rejects ``H_kv < sp``.

Loss and gradients: each rank computes the cross-entropy of its slice; the sum and the label count are
all-reduced over the SP group, so every rank reports the row's loss. The sum's all-reduce has an identity
backward (the loss is one replicated scalar), so each rank's parameter gradients are its tokens' contribution
and **the row's gradient is the sum of the SP ranks' gradients**. DeepSpeed left with its default data-parallel
group (the whole world) averages gradients over ``dp·sp`` ranks; with ``num_items_in_batch`` = the label tokens
of all ranks' slices (``ShardedBatch.num_label_tokens`` summed over the world: each token counted once), scaling
the loss by the world size makes the update per-token exact. The data sampler must shard by ``dp_rank``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_pipelines.encoded import IGNORE_INDEX, PackedBatch, TokenIds, VisualInputs
from keye.loss import DEFAULT_CHUNK, cross_entropy_sum, shift_labels
from keye.rope import split_frames


# --- process groups ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SequenceParallelGroups:
    """This rank's place in the SP × DP grid. ``sp_group`` is ``None`` when ``sp_size`` is 1 (no SP)."""

    sp_size: int
    sp_rank: int
    dp_size: int
    dp_rank: int
    sp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None


_GROUPS: SequenceParallelGroups | None = None


def group_ranks(world_size: int, sp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Rank lists of the SP groups (consecutive ranks, so a group stays inside a node) and of the DP groups."""
    if sp_size < 1 or world_size % sp_size:
        raise ValueError(f"sequence_parallel_size {sp_size} must be >= 1 and divide the world size {world_size}")
    sp = [list(range(start, start + sp_size)) for start in range(0, world_size, sp_size)]
    dp = [list(range(offset, world_size, sp_size)) for offset in range(sp_size)]
    return sp, dp


def init_sequence_parallel(sp_size: int) -> SequenceParallelGroups:
    """Create the SP and DP groups (every rank must call this, in the same order) and remember them."""
    global _GROUPS
    if not dist.is_available() or not dist.is_initialized():
        if sp_size != 1:
            raise RuntimeError(f"sequence_parallel_size {sp_size} needs torch.distributed to be initialised first")
        _GROUPS = SequenceParallelGroups(1, 0, 1, 0)
        return _GROUPS
    world, rank = dist.get_world_size(), dist.get_rank()
    sp_lists, dp_lists = group_ranks(world, sp_size)
    sp_group = dp_group = None
    if sp_size > 1:
        for ranks in sp_lists:  # new_group is collective: every rank creates every group
            group = dist.new_group(ranks)
            if rank in ranks:
                sp_group = group
        for ranks in dp_lists:
            group = dist.new_group(ranks)
            if rank in ranks:
                dp_group = group
    else:
        dp_group = dist.group.WORLD
    _GROUPS = SequenceParallelGroups(sp_size, rank % sp_size, world // sp_size, rank // sp_size, sp_group, dp_group)
    return _GROUPS


def get_sequence_parallel() -> SequenceParallelGroups | None:
    """The groups set by ``init_sequence_parallel`` (``None`` before it is called)."""
    return _GROUPS


def _size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


# --- all-to-all ----------------------------------------------------------------------------------------------
def _a2a(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-to-all over dim 0 (chunk ``j`` goes to rank ``j``; chunk ``j`` of the result came from rank ``j``)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _SeqToHeads(torch.autograd.Function):
    """``[T_loc, sp, h, D]`` (heads grouped by destination rank) → ``[sp·T_loc, h, D]`` (the whole row)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    """``[sp·T_loc, h, D]`` → ``[T_loc, sp, h, D]``: the inverse of ``_SeqToHeads``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _seq_to_heads(grad, ctx.group), None


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    t_loc, sp, h, d = x.shape
    return _a2a(x.transpose(0, 1), group).view(sp * t_loc, h, d)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    sp = dist.get_world_size(group)
    t, h, d = x.shape
    return _a2a(x.reshape(sp, t // sp, h, d), group).transpose(0, 1)


def kv_repeats(n_heads: int, n_kv_heads: int, sp_size: int) -> int:
    """How often to repeat each KV head so that ``sp_size`` ranks each get whole GQA groups."""
    if n_heads % sp_size:
        raise ValueError(f"{n_heads} attention heads are not divisible by sequence_parallel_size {sp_size}")
    rep = sp_size // math.gcd(n_kv_heads, sp_size)
    if n_heads % (n_kv_heads * rep):
        raise ValueError(
            f"{n_kv_heads} KV heads repeated {rep}x for sequence_parallel_size {sp_size} do not divide "
            f"{n_heads} query heads"
        )
    return rep


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Attention over the full row from this rank's slice: ``q`` ``[T/sp, Hq, D]``, ``k``/``v`` ``[T/sp, Hkv, D]``.

    ``attention(q, k, v)`` sees ``[T, Hq/sp, D]`` and ``[T, Hkv'/sp, D]`` (the whole row, this rank's heads);
    one all-to-all carries q, k and v together, one carries the output back. Returns ``[T/sp, Hq, D]``.
    """
    sp = _size(group)
    n_heads, n_kv = q.shape[1], k.shape[1]
    rep = kv_repeats(n_heads, n_kv, sp)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    hq, hkv = n_heads // sp, k.shape[1] // sp
    packed = torch.cat([t.unflatten(1, (sp, -1)) for t in (q, k, v)], dim=2)  # [T/sp, sp, hq+2hkv, D]
    full = _SeqToHeads.apply(packed, group)
    q_full, k_full, v_full = (t.contiguous() for t in full.split([hq, hkv, hkv], dim=1))
    out = attention(q_full, k_full, v_full)
    return _HeadsToSeq.apply(out.contiguous(), group).flatten(1, 2)


# --- loss ----------------------------------------------------------------------------------------------------
class _AllReduceReplicated(torch.autograd.Function):
    """Sum over the group in forward; identity in backward (the result is one scalar replicated on every rank)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def shifted_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss sum and label count for already-shifted ``targets`` ``[B, L]`` (``keye.loss.cross_entropy_sum``).

    With an SP ``group`` both are summed over it (the sum with an identity backward, see the module docstring).
    """
    total, count = cross_entropy_sum(hidden, weight, targets, chunk_size)
    if _size(group) > 1:
        dist.all_reduce(count, group=group)
        total = _AllReduceReplicated.apply(total.float(), group)
    return total, count


# --- sharding a packed row -----------------------------------------------------------------------------------
@dataclass
class SequenceShard:
    """What the model needs to run on one slice of a row: the SP group, the row's token ids and where the slice's
    visual tokens start in the row's image and video feature sequences."""

    group: dist.ProcessGroup | None
    token_ids: TokenIds
    image_token_offset: int = 0
    video_token_offset: int = 0

    def embed(
        self, model: torch.nn.Module, input_ids: torch.Tensor, visual: VisualInputs, always_run_vision: bool = False
    ) -> torch.Tensor:
        """Token embeddings of the slice, with the features of the visual tokens that fall in it.

        Only the images/frames holding those tokens go through the ViT (a frame cut by the slice boundary is
        encoded by both ranks). Every rank calls the ViT exactly once when the row has pixels (images and videos in one
        call; a dummy 2×2 input when its slice holds none), so ZeRO-3 parameter gathers stay in step across ranks.
        """
        cfg = model.config
        if (cfg.image_token_id, cfg.video_token_id) != (self.token_ids.image, self.token_ids.video):
            raise ValueError(
                f"the row's image/video placeholders are {self.token_ids.image}/{self.token_ids.video} (its "
                f"processor's token ids), the model's config has {cfg.image_token_id}/{cfg.video_token_id}"
            )
        embeds = model.model.embed_tokens(input_ids)
        per_kind = zip(
            visual.kinds(),
            (cfg.image_token_id, cfg.video_token_id),
            (self.image_token_offset, self.video_token_offset),
        )
        wanted = []  # (kind, token mask, pixels, frames, skip, n_local) of the frames holding this slice's tokens
        for (kind, pixels, grid), token_id, offset in per_kind:
            if pixels is None or not pixels.numel():
                continue
            mask = input_ids == token_id
            n_local = int(mask.sum())
            if n_local:
                wanted.append((kind, mask, *_slice_frames(model, pixels, grid, offset, n_local, kind), n_local))
        if not wanted:
            return embeds + model._dummy_visual(embeds) if (always_run_vision or visual.has_pixels) else embeds
        features = model.encode_visual_parts([(pixels, frames) for _, _, pixels, frames, _, _ in wanted])
        for (_, mask, _, _, skip, n_local), feats in zip(wanted, features):
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats[skip : skip + n_local].to(embeds.dtype))
        return embeds


def _slice_frames(
    model: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor, offset: int, n_tokens: int, kind: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pixels and frame grids of the frames holding the row's visual tokens ``[offset, offset + n_tokens)``, and how
    many leading tokens of their features to skip (each image or video frame is its own ViT sequence and its own
    2×2 merge grid, so frames are independent and only these need encoding)."""
    merge = model.config.vision_config.spatial_merge_size
    frames = split_frames(grid)
    patches = (frames[:, 1] * frames[:, 2]).tolist()
    tok_start, patch_start, first, skip = 0, 0, None, 0
    for i, n_patch in enumerate(patches):
        n_tok = n_patch // (merge * merge)
        if first is None and tok_start + n_tok > offset:
            first, skip, p0 = i, offset - tok_start, patch_start
        tok_start += n_tok
        patch_start += n_patch
        if first is not None and tok_start >= offset + n_tokens:
            return pixels[p0:patch_start], frames[first : i + 1], skip
    raise ValueError(
        f"{kind} tokens {offset}..{offset + n_tokens} of this slice exceed the row's {tok_start} {kind} tokens"
    )


@dataclass
class ShardedBatch:
    """One rank's slice of a packed row (``B`` = 1): tokens ``[sp_rank·L/sp, (sp_rank+1)·L/sp)`` of the row padded
    to a multiple of ``sp_size``. ``cu_seqlens`` and the visual inputs are the whole row's."""

    input_ids: torch.Tensor  # [1, L/sp]
    shift_labels: torch.Tensor  # [1, L/sp] next-token targets, shifted on the full row
    position_ids: torch.Tensor  # [3, 1, L/sp]
    cu_seqlens: torch.Tensor  # [n+1], offsets in the padded row
    visual: VisualInputs
    token_ids: TokenIds
    image_token_offset: int
    video_token_offset: int
    sp_rank: int
    sp_size: int
    row_length: int
    num_samples: int = 0
    sample_ids: list[str] = field(default_factory=list)

    @property
    def num_label_tokens(self) -> int:
        """Label tokens in this slice (summed over all ranks, every token of every row counts once)."""
        return int((self.shift_labels != IGNORE_INDEX).sum())

    def model_inputs(self, group: dist.ProcessGroup | None = None) -> dict:
        """Keyword arguments for ``KeyeVLForConditionalGeneration.forward``; ``group`` is the SP group (by default
        the one ``init_sequence_parallel`` made)."""
        if group is None and self.sp_size > 1:
            groups = get_sequence_parallel()
            if groups is None or groups.sp_group is None:
                raise RuntimeError(
                    f"batch was sharded for sp_size {self.sp_size}: call init_sequence_parallel({self.sp_size}) "
                    "or pass the SP group"
                )
            group = groups.sp_group
        if _size(group) != self.sp_size:
            raise ValueError(f"batch was sharded for sp_size {self.sp_size}, the SP group has {_size(group)} ranks")
        return {
            "input_ids": self.input_ids,
            "shift_labels": self.shift_labels,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
            **self.visual.as_kwargs(),
            "sequence_parallel": SequenceShard(group, self.token_ids, self.image_token_offset, self.video_token_offset),
        }

    def to(self, device: torch.device | str) -> ShardedBatch:
        moved = {
            k: (v.to(device) if isinstance(v, (torch.Tensor, VisualInputs)) else v) for k, v in self.__dict__.items()
        }
        return ShardedBatch(**moved)


def pad_row_to_multiple(batch: PackedBatch, multiple: int) -> PackedBatch:
    """``batch`` with its row extended to a multiple of ``multiple`` tokens of its padding token; the extension is
    its own segment."""
    length = batch.input_ids.shape[1]
    pad = -length % multiple
    if not pad:
        return batch
    ids = F.pad(batch.input_ids, (0, pad), value=batch.token_ids.pad)
    labels = F.pad(batch.labels, (0, pad), value=IGNORE_INDEX)
    extra = torch.arange(pad, dtype=batch.position_ids.dtype, device=batch.position_ids.device)
    positions = torch.cat([batch.position_ids, extra.expand(3, 1, pad)], dim=2)
    cu = batch.cu_seqlens
    cu = torch.cat([cu, cu.new_tensor([length + pad])])
    return dataclasses.replace(
        batch, input_ids=ids, labels=labels, position_ids=positions, cu_seqlens=cu, sample_ids=list(batch.sample_ids)
    )


def shard_packed_batch(batch: PackedBatch, sp_rank: int, sp_size: int) -> ShardedBatch:
    """This rank's contiguous slice of a one-row ``PackedBatch`` (padded to a multiple of ``sp_size``); the slice's
    visual token offsets count the row's placeholders (``batch.token_ids``)."""
    if batch.input_ids.shape[0] != 1:
        raise ValueError(f"sequence parallelism shards one packed row, got a batch of {batch.input_ids.shape[0]} rows")
    if not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_rank {sp_rank} is outside [0, {sp_size})")
    if int(batch.cu_seqlens[-1]) != batch.input_ids.shape[1]:
        raise ValueError(
            f"cu_seqlens ends at {int(batch.cu_seqlens[-1])} but the row holds {batch.input_ids.shape[1]} tokens"
        )
    row = pad_row_to_multiple(batch, sp_size)
    length = row.input_ids.shape[1]
    per = length // sp_size
    lo, hi = sp_rank * per, (sp_rank + 1) * per
    targets = shift_labels(row.labels, row.cu_seqlens)
    before = row.input_ids[0, :lo]
    return ShardedBatch(
        input_ids=row.input_ids[:, lo:hi],
        shift_labels=targets[:, lo:hi],
        position_ids=row.position_ids[:, :, lo:hi],
        cu_seqlens=row.cu_seqlens,
        visual=row.visual,
        token_ids=row.token_ids,
        image_token_offset=int((before == row.token_ids.image).sum()),
        video_token_offset=int((before == row.token_ids.video).sum()),
        sp_rank=sp_rank,
        sp_size=sp_size,
        row_length=length,
        num_samples=row.num_samples,
        sample_ids=list(row.sample_ids),
    )
