"""Pack tokenised samples into fixed-length rows (8K…128K tokens) with ``cu_seqlens`` boundaries.

Varlen attention makes a packed row cost what its samples cost, so rows are filled greedily: each row starts with
the oldest waiting sample (nothing starves) and then takes the largest waiting samples that still fit (best fit
over a small look-ahead buffer). The tail of a row is padding, its own segment with ``IGNORE_INDEX`` labels.

Visual tensors must stay consistent with the placeholder tokens: each image (and each video frame) owns one grid
row ``[1, h, w]`` with ``h*w`` patches and ``h*w/merge²`` pad tokens. Truncation therefore cuts only *before* a
visual block, dropping its patches and grid rows with it. Placeholders are found by the ids each sample carries
(``EncodedSample.token_ids``, the processor's); the packer is built with the checkpoint's ids and refuses samples
encoded with others.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset

from data_pipelines.encoded import IGNORE_INDEX, EncodedSample, PackedBatch, TokenIds, VisualInputs

log = logging.getLogger(__name__)

SEQ_LENS = (8192, 32768, 131072)


def split_grid(grid: torch.Tensor) -> torch.Tensor:
    """Run-length merged rows ``[k, h, w]`` → ``k`` rows of ``[1, h, w]`` (one per image or frame)."""
    if grid.numel() == 0 or bool((grid[:, 0] == 1).all()):
        return grid
    # a list comprehension over the (few) grid rows: torch.repeat_interleave costs ~20 ms per call on CPU here
    return torch.tensor([[1, h, w] for t, h, w in grid.tolist() for _ in range(t)], dtype=grid.dtype)


def _units(grid: torch.Tensor | None, merge_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image/frame: grid rows, patch counts and placeholder-token counts."""
    if grid is None or grid.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return torch.zeros(0, 3, dtype=torch.long), empty, empty
    rows = split_grid(grid.long())
    patches = rows.prod(-1)
    return rows, patches, patches // (merge_size * merge_size)


def check_sample(sample: EncodedSample, merge_size: int = 2) -> None:
    """Raise ``ValueError`` if placeholder tokens, grids and patch tensors of ``sample`` disagree."""
    n = len(sample)
    if sample.labels.shape != (n,) or sample.position_ids.shape != (3, n):
        raise ValueError(
            f"sample {sample.sample_id!r}: expected labels [{n}] and position_ids [3, {n}], found "
            f"{list(sample.labels.shape)} and {list(sample.position_ids.shape)}"
        )
    ids = sample.token_ids
    for (name, pixels, grid), token_id in zip(sample.visual.kinds(), (ids.image, ids.video)):
        patches = 0 if grid is None or grid.numel() == 0 else int(grid.long().prod(-1).sum())
        tokens = patches // (merge_size * merge_size)
        n_tokens = int((sample.input_ids == token_id).sum())
        n_pixels = 0 if pixels is None else int(pixels.shape[0])
        if n_tokens != tokens or n_pixels != patches:
            raise ValueError(
                f"sample {sample.sample_id!r}: {name} grids imply {tokens} pad tokens and {patches} patches, "
                f"found {n_tokens} tokens and {n_pixels} patch rows"
            )


def _visual_cut(ids: torch.Tensor, cut: int, token_id: int, tokens: torch.Tensor) -> tuple[int, int]:
    """Move ``cut`` back to the start of a visual unit it would split; returns (cut, units kept)."""
    if tokens.numel() == 0:
        return cut, 0
    positions = (ids == token_id).nonzero().squeeze(1)
    before = int((positions < cut).sum())
    cum = tokens.cumsum(0)
    kept = int((cum <= before).sum())
    kept_tokens = int(cum[kept - 1]) if kept else 0
    if kept_tokens < before:  # the cut falls inside unit ``kept``: cut just before its first token
        cut = int(positions[kept_tokens])
    return cut, kept


def truncate_sample(sample: EncodedSample, max_len: int, merge_size: int = 2) -> EncodedSample | None:
    """The first ``<= max_len`` tokens of ``sample`` without splitting an image's or frame's tokens.

    Returns ``None`` when nothing trainable (no label token) survives the cut.
    """
    if len(sample) <= max_len:
        return sample
    visual, ids = sample.visual, sample.token_ids
    img_rows, img_patches, img_tokens = _units(visual.image_grid_thw, merge_size)
    vid_rows, vid_patches, vid_tokens = _units(visual.video_grid_thw, merge_size)
    cut, n_img, n_vid = max_len, 0, 0
    while True:  # moving the cut before one modality's block can only move it earlier; stops within a few steps
        new_cut, n_img = _visual_cut(sample.input_ids, cut, ids.image, img_tokens)
        new_cut, n_vid = _visual_cut(sample.input_ids, new_cut, ids.video, vid_tokens)
        if new_cut == cut:
            break
        cut = new_cut
    if cut == 0 or not bool((sample.labels[:cut] != IGNORE_INDEX).any()):
        return None

    def keep(pixels: torch.Tensor | None, grid: torch.Tensor | None, rows, patches, n: int):
        if grid is None or n == rows.shape[0]:
            return pixels, grid
        return (pixels[: int(patches[:n].sum())] if pixels is not None else None), rows[:n].to(grid.dtype)

    pixel_values, image_grid = keep(visual.pixel_values, visual.image_grid_thw, img_rows, img_patches, n_img)
    pixel_videos, video_grid = keep(visual.pixel_values_videos, visual.video_grid_thw, vid_rows, vid_patches, n_vid)
    return dataclasses.replace(
        sample,
        input_ids=sample.input_ids[:cut],
        labels=sample.labels[:cut],
        position_ids=sample.position_ids[:, :cut],
        visual=VisualInputs(pixel_values, image_grid, pixel_videos, video_grid),
        meta={**sample.meta, "truncated_from": len(sample)},
    )


def pack_row(samples: list[EncodedSample], max_seq_len: int, pad_to_multiple_of: int | None = None) -> PackedBatch:
    """Concatenate ``samples`` into one row ``[1, L]`` padded to ``max_seq_len`` (or to a multiple of
    ``pad_to_multiple_of``, capped at ``max_seq_len``) with their padding token; the padding is its own
    ``cu_seqlens`` segment."""
    if not samples:
        raise ValueError("pack_row needs at least one sample")
    token_ids = samples[0].token_ids
    if any(s.token_ids != token_ids for s in samples):
        found = {s.sample_id: s.token_ids for s in samples if s.token_ids != token_ids}
        raise ValueError(f"samples of one row were encoded with different token ids: {token_ids} and {found}")
    lengths = [len(s) for s in samples]
    total = sum(lengths)
    if total > max_seq_len:
        raise ValueError(f"samples {[s.sample_id for s in samples]} hold {total} tokens, row is {max_seq_len}")
    target = max_seq_len
    if pad_to_multiple_of:
        target = min(max_seq_len, -(-total // pad_to_multiple_of) * pad_to_multiple_of)
    pad = target - total
    ids = [s.input_ids.long() for s in samples]
    labels = [s.labels.long() for s in samples]
    pos_dtype = samples[0].position_ids.dtype
    positions = [s.position_ids.to(pos_dtype) for s in samples]
    if pad:
        lengths.append(pad)
        ids.append(torch.full((pad,), token_ids.pad, dtype=torch.long))
        labels.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
        positions.append(torch.arange(pad, dtype=pos_dtype).expand(3, pad))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return PackedBatch(
        input_ids=torch.cat(ids)[None],
        labels=torch.cat(labels)[None],
        position_ids=torch.cat(positions, 1)[:, None, :],
        cu_seqlens=cu,
        token_ids=token_ids,
        visual=VisualInputs.concat(s.visual for s in samples),
        num_samples=len(samples),
        sample_ids=[s.sample_id for s in samples],
    )


class Packer(IterableDataset):
    """Stream of ``PackedBatch`` rows from a stream of ``EncodedSample``.

    ``samples`` is re-iterable (e.g. ``MappedStream(ShardStream(...), encode)``); if it has ``state_dict``, the
    packer's state stores the upstream state taken just before the oldest sample still waiting in the look-ahead
    buffer, so a restore replays only the few samples since then (otherwise it replays from the start). Samples
    longer than a row are truncated (``truncate=True``) or skipped; both are counted in ``stats``.

    ``token_ids`` are the checkpoint's (``KeyeVLProcessor.token_ids``): a sample encoded with other ids is an error,
    not a skip (its placeholders would not be found).
    """

    def __init__(
        self,
        samples: Iterable[EncodedSample],
        max_seq_len: int = 8192,
        *,
        token_ids: TokenIds,
        truncate: bool = False,
        lookahead: int = 16,
        pad_to_multiple_of: int | None = None,
        merge_size: int = 2,
    ) -> None:
        if max_seq_len < 1 or lookahead < 1:
            raise ValueError(f"max_seq_len and lookahead must be >= 1, got {max_seq_len} and {lookahead}")
        self.samples, self.max_seq_len, self.token_ids = samples, max_seq_len, token_ids
        self.truncate, self.lookahead, self.pad_to_multiple_of = truncate, lookahead, pad_to_multiple_of
        self.merge_size = merge_size
        self.stats: Counter = Counter()
        self._stateful = hasattr(samples, "state_dict") and hasattr(samples, "load_state_dict")
        self._buffer: list[tuple[int, EncodedSample, Any]] = []  # (pull index, sample, upstream state before pull)
        self._pulled = 0
        self._pending: dict[str, Any] | None = None
        self._live = False

    @property
    def fill_ratio(self) -> float:
        """Real (non-pad) tokens over all row tokens emitted so far."""
        return self.stats["real_tokens"] / self.stats["row_tokens"] if self.stats["row_tokens"] else 0.0

    def _admit(self, sample: EncodedSample, count: bool) -> EncodedSample | None:
        if sample.token_ids != self.token_ids:
            raise ValueError(
                f"sample {sample.sample_id!r} was encoded with token ids {sample.token_ids}, but the packer was built "
                f"with {self.token_ids}: encode with the processor of the checkpoint being trained"
            )
        stats = self.stats if count else Counter()
        try:
            check_sample(sample, self.merge_size)
        except ValueError as exc:
            stats["skipped_inconsistent"] += 1
            log.warning("packer: skipping %s", exc)
            return None
        if len(sample) <= self.max_seq_len:
            return sample
        if not self.truncate:
            stats["skipped_overlong"] += 1
            log.warning(
                "packer: skipping sample %r of %d tokens (row %d)", sample.sample_id, len(sample), self.max_seq_len
            )
            return None
        out = truncate_sample(sample, self.max_seq_len, self.merge_size)
        stats["truncated" if out is not None else "skipped_no_labels_after_truncation"] += 1
        return out

    def _pull(self, it: Iterator[EncodedSample], keep: bool = True, count: bool = True) -> bool:
        """Pull one sample into the buffer; ``False`` when upstream is exhausted."""
        snapshot = self.samples.state_dict() if self._stateful else None  # type: ignore[attr-defined]
        sample = next(it, None)
        if sample is None:
            return False
        index = self._pulled
        self._pulled += 1
        if keep and (admitted := self._admit(sample, count)) is not None:
            self._buffer.append((index, admitted, snapshot))
        return True

    def __iter__(self) -> Iterator[PackedBatch]:
        state, self._pending = self._pending, None
        self._buffer, self._pulled, self._live = [], 0, True
        if state is None:
            self.stats.clear()
            return self._generate(iter(self.samples))
        if self._stateful and state["anchor"] is not None:
            self.samples.load_state_dict(state["anchor"])  # type: ignore[attr-defined]
        it = iter(self.samples)
        self._pulled = state["pulled"] - state["replay"]
        keep = set(state["keep"])
        for r in range(state["replay"]):  # deterministic upstream: same samples, same admission decisions
            if not self._pull(it, keep=r in keep, count=False):
                raise RuntimeError(f"packer resume: upstream ended after {r} of {state['replay']} replayed samples")
        self.stats = Counter(state["stats"])
        self.stats["resume_replayed"] += state["replay"]
        return self._generate(it)

    def _generate(self, it: Iterator[EncodedSample]) -> Iterator[PackedBatch]:
        done = False

        def fill() -> None:
            nonlocal done
            while not done and len(self._buffer) < self.lookahead:
                done = not self._pull(it)

        while True:
            fill()
            if not self._buffer:
                break
            row = [self._buffer.pop(0)[1]]
            space = self.max_seq_len - len(row[0])
            while space > 0:
                fill()
                fits = [(len(s), -k) for k, (_, s, _) in enumerate(self._buffer) if len(s) <= space]
                if not fits:
                    break
                k = -max(fits)[1]
                row.append(self._buffer.pop(k)[1])
                space -= len(row[-1])
            batch = pack_row(row, self.max_seq_len, self.pad_to_multiple_of)
            self.stats["rows"] += 1
            self.stats["samples"] += len(row)
            self.stats["real_tokens"] += sum(len(s) for s in row)
            self.stats["row_tokens"] += int(batch.input_ids.shape[1])
            yield batch
        self._live = False

    def state_dict(self) -> dict[str, Any]:
        if not self._live:
            if self._pending is not None:
                return self._pending
            return {"anchor": None, "replay": 0, "keep": [], "pulled": 0, "stats": {}}
        if not self._stateful:  # no upstream state: replay everything from the start
            first, anchor = 0, None
        elif self._buffer:
            first, anchor = self._buffer[0][0], self._buffer[0][2]
        else:
            first, anchor = self._pulled, self.samples.state_dict()  # type: ignore[attr-defined]
        return {
            "anchor": anchor,
            "replay": self._pulled - first,
            "keep": [index - first for index, _, _ in self._buffer],
            "pulled": self._pulled,
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes effect at the next ``iter()``."""
        self._pending = state
        self._live = False
