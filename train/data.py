"""Training data per rank: shards → records with media bytes → ``EncodedSample`` → packed rows → micro-batches.

Every stage is resumable: the reader and packer states (one per rank, one per dataloader worker) go into each
checkpoint, so a restarted run sees exactly the rows it would have seen. A sample that fails to decode is
counted and skipped, never fatal.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset

from data_pipelines.encoded import IGNORE_INDEX, EncodedSample, PackedBatch, VisualInputs
from data_pipelines.frame_shards import check_manifest_options, is_frames_member, read_frames_member
from data_pipelines.media import VideoClip, VideoOptions
from data_pipelines.packing import Packer
from data_pipelines.reader import MappedStream, ShardStream, SourceSpec, expand_shards
from keye.loss import shift_labels
from keye.processing import KeyeVLProcessor
from train.config import LOADER_WORKERS_PER_GPU, DataConfig, resolve_path

log = logging.getLogger(__name__)


def with_media_bytes(
    record: dict[str, Any], media: dict[str, bytes], video_options: Callable[[dict], VideoOptions] | None = None
) -> list[dict]:
    """The record's messages with member names replaced by the member bytes (frame lists become lists of bytes).

    A frame-shard video (``media_<i>.frames.npz``) becomes its ``VideoClip``, checked against
    ``video_options(item)`` (the processor's options for that item), which such a record therefore needs.
    """
    where = f"record {record.get('id')!r}"

    def member(name: Any) -> bytes:
        if not isinstance(name, str) or name not in media:
            raise ValueError(f"{where}: media member {name!r} not in the sample (members: {sorted(media)})")
        return media[name]

    def video_clip(item: dict, name: str) -> VideoClip:
        if video_options is None:
            raise ValueError(f"{where}: frame-shard video {name!r} read without the run's video options")
        return read_frames_member(member(name), video_options(item), f"{where} {name}")

    messages = []
    for msg in record.get("messages") or []:
        content = msg.get("content")
        if isinstance(content, list):
            items = []
            for item in content:
                kind = item.get("type")
                if kind == "video" and isinstance(item[kind], str) and is_frames_member(item[kind]):
                    item = {**item, kind: video_clip(item, item[kind])}
                elif kind in ("image", "video"):
                    ref = item[kind]
                    item = {**item, kind: [member(n) for n in ref] if isinstance(ref, list) else member(ref)}
                items.append(item)
            msg = {**msg, "content": items}
        messages.append(msg)
    if not messages:
        raise ValueError(f"{where}: no messages")
    return messages


def make_encoder(processor: KeyeVLProcessor, mode: str | None) -> Callable[[tuple[dict, dict]], EncodedSample]:
    """``(record, media) -> EncodedSample``; raises ValueError (counted, skipped) for unusable samples."""

    def encode(sample: tuple[dict, dict]) -> EncodedSample:
        record, media = sample
        messages = with_media_bytes(record, media, processor.video_options)
        out = processor.encode_conversation(
            messages,
            mode=record.get("mode", mode),
            sample_id=str(record.get("id", "")),
            source=str(record.get("source", "")),
        )
        if out.num_label_tokens == 0:
            raise ValueError(f"record {record.get('id')!r}: no assistant tokens to train on")
        return out

    return encode


def configure_processor(processor: KeyeVLProcessor, cfg: DataConfig) -> KeyeVLProcessor:
    """Apply the run's media options (pixel budgets, video sampling) to the processor's config."""
    pc = processor.config
    changes: dict[str, Any] = {}
    if cfg.image_min_pixels is not None:
        changes["min_pixels"] = cfg.image_min_pixels
    if cfg.image_max_pixels is not None:
        changes["max_pixels"] = cfg.image_max_pixels
    if cfg.video:
        changes["video"] = pc.video.with_changes(cfg.video, "data.video")
    processor.config = dataclasses.replace(pc, **changes)
    return processor


def concat_rows(rows: list[PackedBatch]) -> PackedBatch:
    """Several packed rows as one longer varlen row (segments never attend across ``cu_seqlens``)."""
    if len(rows) == 1:
        return rows[0]
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + int(r.input_ids.numel()))
    cu = torch.cat([rows[0].cu_seqlens[:1]] + [r.cu_seqlens[1:] + off for r, off in zip(rows, offsets)])
    return PackedBatch(
        input_ids=torch.cat([r.input_ids.reshape(1, -1) for r in rows], 1),
        labels=torch.cat([r.labels.reshape(1, -1) for r in rows], 1),
        position_ids=torch.cat([r.position_ids.reshape(3, 1, -1) for r in rows], 2),
        cu_seqlens=cu.to(torch.int32),
        token_ids=rows[0].token_ids,  # one packer's rows
        visual=VisualInputs.concat(r.visual for r in rows),
        num_samples=sum(r.num_samples for r in rows),
        sample_ids=[s for r in rows for s in r.sample_ids],
    )


def label_count(batch: PackedBatch) -> torch.Tensor:
    """Label tokens the loss will see (after the shift, never across packed boundaries)."""
    return (shift_labels(batch.labels, batch.cu_seqlens) != IGNORE_INDEX).sum()


def _skip_stats(state: Any, into: Counter) -> None:
    """Sum skip counters found anywhere in a (possibly per-worker) data state."""
    if isinstance(state, dict):
        stats = state.get("stats")
        if isinstance(stats, dict):
            for k, v in stats.items():
                if isinstance(v, int) and (k.startswith(("skipped", "map_error", "corrupt", "missing", "bad_", "no_"))):
                    into[k] += v
        for k, v in state.items():
            if k != "stats":
                _skip_stats(v, into)
    elif isinstance(state, list):
        for v in state:
            _skip_stats(v, into)


class NoUsableData(RuntimeError):
    """A long stretch of records gave no usable sample: the run cannot make progress (one line, with reasons)."""

    def __init__(self, message: str) -> None:
        lines = [line for line in message.strip().splitlines() if line.strip()]
        if len(lines) > 1:  # re-raised from a dataloader worker: the message is its traceback, ours is the last line
            message = lines[-1].split(": ", 1)[-1]
        super().__init__(message)


class ProgressGuard:
    """Counts records read since the last usable sample; past ``limit`` (``data.max_rejected_in_a_row``) the data
    can feed no step, so instead of spinning over repeating shards the run stops, naming the top skip reasons of
    the stages in ``watch`` (their state dicts' skip counters)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.since_used = limit, 0
        self.watch: Any = None

    def read(self) -> None:
        self.since_used += 1
        if self.limit and self.since_used > self.limit:
            raise NoUsableData(self.message())

    def used(self) -> None:
        self.since_used = 0

    def message(self) -> str:
        counts: Counter = Counter()
        if self.watch is not None:
            _skip_stats(self.watch.state_dict(), counts)
        top = "; ".join(f"{reason}: {n}" for reason, n in counts.most_common(3)) or "no skip reason was recorded"
        return (
            f"{self.limit} records in a row gave no usable sample (data.max_rejected_in_a_row), so training cannot "
            f"make progress; top reasons: {top}"
        )


class Tap(IterableDataset):
    """A stateful stream passed through unchanged, calling ``hook()`` for every item (its state is the stream's)."""

    def __init__(self, stream: Iterable, hook: Callable[[], None]) -> None:
        self.stream, self.hook = stream, hook

    def __iter__(self) -> Iterator[Any]:
        for item in self.stream:
            self.hook()
            yield item

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)  # type: ignore[attr-defined]


def guarded(samples: Iterable, guard: ProgressGuard) -> Tap:
    """``samples`` (the last stage that can drop records) reporting each usable sample to ``guard``."""
    guard.watch = samples
    return Tap(samples, guard.used)


class RecordFilter(IterableDataset):
    """Drops ``(record, media)`` samples for which ``reject(record)`` gives a reason, before any media is decoded;
    the drops are counted per reason as ``skipped_<name>/<reason>`` in its (checkpointed) stats."""

    def __init__(self, stream: Iterable, reject: Callable[[dict], str | None], name: str) -> None:
        self.stream, self.reject, self.name = stream, reject, name
        self.stats: Counter = Counter()

    def __iter__(self) -> Iterator[Any]:
        for sample in self.stream:
            reason = self.reject(sample[0])
            if reason is None:
                yield sample
                continue
            self.stats[f"skipped_{self.name}/{reason[:120]}"] += 1
            log.debug("skipping record %r: %s", sample[0].get("id"), reason)

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "stats": dict(self.stats)}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])  # type: ignore[attr-defined]
        self.stats = Counter(state["stats"])


def mode_rejection(record: dict) -> str | None:
    """Why an SFT record's response does not fit its reasoning mode (``train.sft_mix.filter_by_mode``)."""
    from train.sft_mix import filter_by_mode

    return filter_by_mode(record)


def record_stream(cfg: DataConfig, seed: int, rank: int, world: int, guard: ProgressGuard) -> IterableDataset:
    """This data-parallel rank's ``(record, media)`` stream: mixed shard sources, mode-checked when configured;
    every record read counts towards ``guard``."""
    sources = [SourceSpec(s.name, [resolve_path(p) for p in s.shards], s.weight) for s in cfg.sources]
    stream: IterableDataset = Tap(
        ShardStream(sources, seed, cfg.shuffle_buffer, cfg.shuffle, cfg.epochs, rank=rank, world_size=world),
        guard.read,
    )
    if cfg.check_modes:
        stream = RecordFilter(stream, mode_rejection, "mode")
    return stream


WORKER_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def limit_worker_threads(worker_id: int = 0) -> None:
    """Data-loader worker start-up: one intra-op thread per library, so ``W`` workers use about ``W`` cores.

    Left alone, torch (one OpenMP thread per core), OpenCV's pool (Slow-Fast HSV conversion) and OpenMP/MKL/BLAS in
    libraries loaded later each start a thread per core in every worker, and ``W`` workers then run ``W`` x cores
    threads against each other and the trainer. FFmpeg decodes with ``VideoOptions.decode_threads``, which follows
    torch's thread count unless a config sets it, so one thread here; a video read overlaps its decoding with its
    tensor work on a second thread (``data_pipelines.overlap``).
    """
    import cv2

    for var in WORKER_THREAD_VARS:
        os.environ[var] = "1"
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def loader_workers(configured: int | None) -> int:
    """``data.num_workers``, or when it is ``None`` the default of ``train.config.DataConfig``: the workers one GPU
    needs, within the CPUs this rank's share of the machine leaves after its own process."""
    if configured is not None:
        return configured
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_rank = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(LOADER_WORKERS_PER_GPU, per_rank - 1))


class StreamData:
    """This rank's micro-batches from a stateful stream of batch units (``group`` units per micro-batch, joined by
    ``combine``), read in-process or by ``num_workers`` dataloader processes (``None``: ``loader_workers``' default),
    each holding ``prefetch_factor`` units ready, with an exact ``state_dict``."""

    def __init__(
        self,
        units: IterableDataset,
        num_workers: int | None,
        group: int = 1,
        combine: Callable[[list[Any]], Any] | None = None,
        reader: ShardStream | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        num_workers = loader_workers(num_workers)
        self.units, self.group, self.num_workers = units, group, num_workers
        self.combine = combine or (lambda items: items[0])
        self.reader = reader
        self.loader: Any = units
        if num_workers > 0:
            from torchdata.stateful_dataloader import StatefulDataLoader

            self.loader = StatefulDataLoader(
                units,
                batch_size=None,
                num_workers=num_workers,
                persistent_workers=True,
                prefetch_factor=prefetch_factor,
                worker_init_fn=limit_worker_threads,
            )
        self._it: Iterator[Any] | None = None
        self.resumed = False

    def next(self) -> Any:
        """The next micro-batch; raises ``StopIteration`` when finite sources are done."""
        if self._it is None:
            if self.num_workers > 0:
                import cv2

                # a worker forked while this process's OpenCV pool has threads hangs resizing it (measured): the
                # trainer decodes nothing itself once workers do, so its OpenCV goes single-threaded before they start
                cv2.setNumThreads(1)
            self._it = iter(self.loader)
        items = []
        for _ in range(self.group):
            item = next(self._it, None)
            if item is None:
                break
            items.append(item)
        if not items:
            raise StopIteration
        return self.combine(items)

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "num_workers": self.num_workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_workers") != self.num_workers:
            raise ValueError(
                f"data state was saved with data.num_workers={state.get('num_workers')}, this run has "
                f"{self.num_workers}; exact resume needs the same number of workers"
            )
        self.loader.load_state_dict(state["loader"])
        self._it, self.resumed = None, True

    def skipped(self) -> dict[str, int]:
        """Samples skipped so far (bad media, over-long, wrong mode, …) by reason; read from the states, so
        workers count too."""
        counts: Counter = Counter()
        _skip_stats(self.loader.state_dict(), counts)
        return dict(counts)

    def resume_skipped(self) -> int:
        """Tar groups passed over to get back into position after a resume (0 in a fresh run)."""
        if self.num_workers == 0 and self.reader is not None:
            return int(self.reader.stats.get("resume_skipped", 0))
        found: Counter = Counter()

        def walk(s: Any) -> None:
            if isinstance(s, dict):
                if isinstance(s.get("stats"), dict) and "resume_skipped" in s["stats"]:
                    found["n"] += int(s["stats"]["resume_skipped"])
                for v in s.values():
                    walk(v)
            elif isinstance(s, list):
                for v in s:
                    walk(v)

        walk(self.loader.state_dict())
        return int(found["n"])


def reader_of(stream: Any) -> ShardStream | None:
    while stream is not None and not isinstance(stream, ShardStream):
        stream = getattr(stream, "stream", None)
    return stream


class TrainData(StreamData):
    """Packed LM rows: records → ``EncodedSample`` → packed rows, ``micro_batch_rows`` rows per micro-batch."""

    def __init__(
        self, cfg: DataConfig, processor: KeyeVLProcessor, seed: int, rank: int, world: int, micro_batch_rows: int = 1
    ) -> None:
        for source in cfg.sources:  # frame shards bake in their video options: a different run's fails here
            check_manifest_options(expand_shards([resolve_path(p) for p in source.shards]), processor.config.video)
        guard = ProgressGuard(cfg.max_rejected_in_a_row)
        records = record_stream(cfg, seed, rank, world, guard)
        mapped = MappedStream(records, make_encoder(processor, cfg.mode), errors=(ValueError, OSError))
        self.packer = Packer(
            guarded(mapped, guard),
            cfg.max_seq_len,
            token_ids=processor.token_ids,  # the model's (KeyeVLProcessor.from_pretrained reads its config.json)
            truncate=cfg.truncate,
            lookahead=cfg.lookahead,
            pad_to_multiple_of=cfg.pad_to_multiple_of,
        )
        super().__init__(
            self.packer, cfg.num_workers, micro_batch_rows, concat_rows, reader_of(records), cfg.prefetch_factor
        )


class ShardedData:
    """Micro-batches of ``data`` cut to this rank's sequence-parallel slice (``keye.sequence_parallel``): the
    ranks of one SP group read the same rows (``data`` is split by data-parallel rank) and each keeps its part."""

    def __init__(self, data: StreamData, sp_rank: int, sp_size: int) -> None:
        self.data, self.sp_rank, self.sp_size = data, sp_rank, sp_size

    def next(self) -> Any:
        from keye.sequence_parallel import shard_packed_batch

        return shard_packed_batch(self.data.next(), self.sp_rank, self.sp_size)

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.load_state_dict(state)

    def skipped(self) -> dict[str, int]:
        return self.data.skipped()

    def resume_skipped(self) -> int:
        return self.data.resume_skipped()
