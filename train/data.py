"""The training input stream: shards → (record, media) → ``EncodedSample`` → packed rows, resumable per rank.

Each rank reads a disjoint slice of the shards (``ShardStream`` splits by rank and dataloader worker); decoding,
the chat template and packing run in the dataloader workers. A sample whose media cannot be decoded or whose
record cannot be encoded is skipped and counted (``map_error/…``); the counts travel inside the loader state and
are read back with :func:`data_stats` at logging intervals.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipelines.media import MediaError
from data_pipelines.packing import Packer
from data_pipelines.reader import MappedStream, Sample, ShardStream, SourceSpec
from keye.encoded import EncodedSample
from keye.processing import KeyeVLProcessor
from train.config import DataConfig


def _bind_media(content: Any, media: dict[str, bytes]) -> Any:
    """The message content with shard member names replaced by the members' bytes."""
    if not isinstance(content, list):
        return content
    out = []
    for item in content:
        kind = item.get("type")
        if kind in ("image", "video"):
            ref = item.get(kind)
            item = dict(item)
            item[kind] = [media[n] for n in ref] if isinstance(ref, list) else media[ref]
        out.append(item)
    return out


class ShardEncoder:
    """``(record, media)`` from a shard → ``EncodedSample`` (picklable, so it runs in dataloader workers)."""

    __name__ = "ShardEncoder"

    def __init__(self, processor: KeyeVLProcessor, default_mode: str | None = None) -> None:
        self.processor, self.default_mode = processor, default_mode

    def __call__(self, sample: Sample) -> EncodedSample:
        record, media = sample
        rid = str(record.get("id", "?"))
        try:
            messages = [{**m, "content": _bind_media(m.get("content"), media)} for m in record["messages"]]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"record {rid!r}: messages do not follow the sample schema ({exc!r})") from None
        return self.processor.encode_conversation(
            messages,
            mode=record.get("mode") or self.default_mode,
            sample_id=rid,
            source=str(record.get("source", "")),
        )


def configure_processor(processor: KeyeVLProcessor, data: DataConfig) -> KeyeVLProcessor:
    """A copy of ``processor`` with the pixel budgets set in ``data`` (unset keys keep the checkpoint's)."""
    cfg = copy.deepcopy(processor.config)
    if data.image_min_pixels is not None:
        cfg.min_pixels = data.image_min_pixels
    if data.image_max_pixels is not None:
        cfg.max_pixels = data.image_max_pixels
    video = {
        "fps": data.video_fps,
        "max_frames": data.video_max_frames,
        "max_pixels": data.video_max_pixels,
        "video_total_pixels": data.video_total_pixels,
    }
    cfg.video = dataclasses.replace(cfg.video, **{k: v for k, v in video.items() if v is not None})
    return KeyeVLProcessor(processor.tokenizer, cfg)


def build_packer(data: DataConfig, processor: KeyeVLProcessor, seed: int, pad_token_id: int) -> Packer:
    """The per-rank dataset: mixed shard stream, encoder, packer (rank and world come from torch.distributed)."""
    sources = [SourceSpec(s.name, s.shards, s.weight) for s in data.sources]
    stream = ShardStream(sources, seed=seed, shuffle_buffer=data.shuffle_buffer)
    encoded = MappedStream(stream, ShardEncoder(processor, data.mode), errors=(ValueError, MediaError, OSError))
    return Packer(encoded, max_seq_len=data.seq_len, pad_token_id=pad_token_id, truncate=data.truncate,
                  lookahead=data.lookahead)  # fmt: skip


def build_loader(data: DataConfig, processor: KeyeVLProcessor, seed: int, pad_token_id: int) -> StatefulDataLoader:
    """One packed row per batch; the loader's ``state_dict`` resumes exactly (per worker)."""
    packer = build_packer(data, processor, seed, pad_token_id)
    workers = data.num_workers
    return StatefulDataLoader(
        packer,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=data.prefetch_factor if workers else None,
        persistent_workers=False,
        pin_memory=False,
    )


def data_stats(state: Any) -> Counter:
    """Sum of every ``stats`` counter found in a (nested) loader state: packer rows, skips, map errors, sources."""
    total: Counter = Counter()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "stats" and isinstance(value, dict):
                    total.update({k: v for k, v in value.items() if isinstance(v, (int, float))})
                else:  # upstream counts live in the packer's anchor (a snapshot a few samples old)
                    walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(state)
    return total
