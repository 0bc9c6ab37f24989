"""Streaming reader over webdataset shards: rank/worker splitting, shuffle buffer, weighted mixing, exact resume.

Why not webdataset's own pipeline: its shuffle buffer and shard iterators keep no resumable position. Here every
random choice is either a pure function of ``(seed, epoch)`` (shard order) or drawn from a ``random.Random`` whose
state is saved, and every sample carries a reference ``(epoch, shard_pos, group_index)``. A saved state is therefore
small (cursor + buffer references + RNG states); restoring it re-reads only the referenced samples (tar headers of
the rest are skipped, not decoded) and the stream continues with exactly the samples it would have produced.

Samples are ``(record: dict, media: dict[member_name, bytes])``. Corrupt members, unreadable JSON and tars that
end early are counted in ``stats`` and skipped.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import posixpath
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

log = logging.getLogger(__name__)

Sample = tuple[dict[str, Any], dict[str, bytes]]
Ref = tuple[int, int, int]  # (epoch, position in this split's shard list, sample group index inside the tar)
STATE_VERSION = 1


@dataclass
class SourceSpec:
    """One data source to mix: its shards (paths, brace patterns, directories or ``manifest.json``) and weight."""

    name: str
    shards: str | Sequence[str]
    weight: float = 1.0


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from brace patterns (``d/shard-{000000..000009}.tar``), globs, directories or manifests."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[str] = []
    for item in items:
        for pattern in braceexpand(str(item)):
            p = Path(pattern)
            if p.is_dir():
                found = sorted(str(x) for x in p.glob("*.tar"))
            elif p.name == "manifest.json" and p.is_file():
                found = [str(p.parent / s["path"]) for s in json.loads(p.read_text())["shards"]]
            elif any(c in pattern for c in "*?["):
                found = sorted(glob.glob(pattern))
            else:
                found = [pattern]
            if not found:
                raise FileNotFoundError(f"shard spec {pattern!r} (from {str(item)!r}) matches no .tar files")
            out.extend(found)
    missing = [s for s in out if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) do not exist, first: {missing[0]}")
    return out


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename."""
    dirname, base = posixpath.split(name)
    key, _, suffix = base.partition(".")
    return posixpath.join(dirname, key), suffix


def _has_trailing_data(fileobj: Any, offset: int) -> bool:
    """True if non-zero bytes follow where tarfile stopped (it ends silently at a corrupt header)."""
    fileobj.seek(offset)
    while chunk := fileobj.read(1 << 16):
        if chunk.count(0) != len(chunk):
            return True
    return False


def iter_tar_groups(
    path: str, start: int, want: Callable[[int], bool], stats: Counter
) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield ``(group_index, key, {suffix: bytes})`` for groups ``>= start`` that ``want``; others are not read.

    A tar that ends early or has a corrupt header is counted as ``corrupt_tar``; the group being read is dropped.
    """
    index, key, members = -1, None, {}
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                k, suffix = _split_key(info.name)
                if k != key:
                    if key is not None and index >= start and want(index):
                        yield index, key, members
                    index, key, members = index + 1, k, {}
                if index >= start and want(index):
                    # closed here, not by the file's finalizer, which would drop a stop signal's exception
                    with tf.extractfile(info) as fh:  # a regular file: never None
                        members[suffix] = fh.read()
            if _has_trailing_data(raw, tf.offset):
                raise tarfile.ReadError(f"corrupt header at byte {tf.offset}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        stats["corrupt_tar"] += 1
        log.warning("shard %s: %s after group %d; skipping the rest of this shard", path, exc, index)
        return
    if key is not None and index >= start and want(index):
        yield index, key, members


def decode_group(members: dict[str, bytes], where: str, stats: Counter) -> Sample | None:
    """Turn a tar group into ``(record, media)``; ``None`` (counted) if its JSON or a referenced member is bad."""
    if "json" not in members:
        stats["no_json"] += 1
        log.warning("%s: sample has no .json member (members: %s)", where, sorted(members))
        return None
    try:
        record = json.loads(members.pop("json"))
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    except ValueError as exc:
        stats["bad_json"] += 1
        log.warning("%s: unreadable record JSON: %s", where, exc)
        return None
    for msg in record.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        for item in content if isinstance(content, list) else []:
            kind = item.get("type") if isinstance(item, dict) else None
            ref = item.get(kind) if kind in ("image", "video") else None
            names = ref if isinstance(ref, list) else [ref] if isinstance(ref, str) else []
            absent = [n for n in names if not members.get(n)]
            if absent:
                stats["missing_member"] += 1
                log.warning("%s (id %r): media member(s) %s missing or empty", where, record.get("id"), absent)
                return None
    return record, members


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class _SourceReader:
    """One source on one split: cursor over its shards across epochs plus its own shuffle buffer."""

    def __init__(self, spec: SourceSpec, shards: list[str], seed: int, split: int, nsplits: int, stream: ShardStream):
        self.name, self.all_shards, self.seed = spec.name, shards, seed
        self.split, self.nsplits = split, nsplits
        self.epochs, self.shuffle, self.capacity = stream.epochs, stream.shuffle, max(1, stream.shuffle_buffer)
        self.stats = stream.stats
        self.epoch = self.shard_pos = self.offset = self.epoch_yield = 0
        self.exhausted = False
        self.buffer: list[tuple[Ref, Sample]] = []
        self.rng = random.Random(f"keye-shuffle:{seed}:{spec.name}:{split}/{nsplits}")
        self._raw: Iterator[tuple[Ref, Sample]] | None = None

    def shard_plan(self, epoch: int) -> tuple[list[str], bool]:
        """This split's shards for ``epoch`` and whether it must also split samples (fewer shards than splits)."""
        order = list(self.all_shards)
        if self.shuffle:
            random.Random(f"keye-shards:{self.seed}:{self.name}:{epoch}").shuffle(order)
        if len(order) >= self.nsplits:
            return order[self.split :: self.nsplits], False
        return order, True

    def _want(self, by_sample: bool) -> Callable[[int], bool]:
        return (lambda i: i % self.nsplits == self.split) if by_sample else (lambda i: True)

    def _read(self) -> Iterator[tuple[Ref, Sample]]:
        while self.epochs is None or self.epoch < self.epochs:
            shards, by_sample = self.shard_plan(self.epoch)
            while self.shard_pos < len(shards):
                path = shards[self.shard_pos]
                for index, key, members in iter_tar_groups(path, self.offset, self._want(by_sample), self.stats):
                    self.offset = index + 1
                    sample = decode_group(members, f"{path}:{key}", self.stats)
                    if sample is not None:
                        self.epoch_yield += 1
                        yield (self.epoch, self.shard_pos, index), sample
                self.shard_pos, self.offset = self.shard_pos + 1, 0
            if self.epoch_yield == 0:
                log.warning("source %r has no readable samples on split %d/%d", self.name, self.split, self.nsplits)
                break
            self.epoch, self.shard_pos, self.epoch_yield = self.epoch + 1, 0, 0
        self.exhausted = True

    def _pull(self) -> tuple[Ref, Sample] | None:
        if self._raw is None:
            self._raw = self._read()
        return next(self._raw, None)

    def next(self) -> Sample | None:
        """Next sample of this source (shuffled), or ``None`` once its epochs are done."""
        while len(self.buffer) < self.capacity and not self.exhausted:
            item = self._pull()
            if item is None:
                break
            self.buffer.append(item)
        if not self.buffer:
            return None
        j = self.rng.randrange(len(self.buffer)) if self.capacity > 1 else 0
        _, sample = self.buffer[j]
        item = None if self.exhausted else self._pull()
        if item is not None:
            self.buffer[j] = item
        else:
            self.buffer[j] = self.buffer[-1]
            self.buffer.pop()
        return sample

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "offset": self.offset,
            "epoch_yield": self.epoch_yield,
            "exhausted": self.exhausted,
            "buffer": [list(ref) for ref, _ in self.buffer],
            "rng": _rng_state(self.rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Restore the cursor and re-read the buffered samples; returns how many tar groups were passed over."""
        self.epoch, self.shard_pos, self.offset = state["epoch"], state["shard_pos"], state["offset"]
        self.epoch_yield, self.exhausted = state["epoch_yield"], state["exhausted"]
        _set_rng_state(self.rng, state["rng"])
        refs = [tuple(r) for r in state["buffer"]]
        found: dict[Ref, Sample] = {}
        skipped = 0
        for epoch, shard_pos in sorted({(e, p) for e, p, _ in refs}):
            shards, _ = self.shard_plan(epoch)
            wanted = {i for e, p, i in refs if (e, p) == (epoch, shard_pos)}
            path = shards[shard_pos]
            for index, key, members in iter_tar_groups(path, 0, wanted.__contains__, self.stats):
                sample = decode_group(members, f"{path}:{key}", self.stats)
                if sample is not None:
                    found[(epoch, shard_pos, index)] = sample
            skipped += max(wanted) + 1 - len(wanted)
        lost = [r for r in refs if r not in found]
        if lost:
            raise RuntimeError(f"source {self.name!r}: cannot re-read buffered samples {lost[:3]} (shards changed?)")
        self.buffer = [(r, found[r]) for r in refs]
        self._raw = None
        return skipped + self.offset


class ShardStream(IterableDataset):
    """Mixed, shuffled, resumable stream of ``(record, media)`` from one or more shard sources.

    ``sources``: a shard spec (one source named ``default``) or a list of ``SourceSpec``. Each rank and dataloader
    worker reads a disjoint slice (whole shards, or every n-th sample when there are fewer shards than slices).
    ``epochs=None`` cycles forever; otherwise each source stops after ``epochs`` passes and mixing renormalises
    over the sources still running. ``state_dict``/``load_state_dict`` resume exactly (also per worker under
    torchdata's ``StatefulDataLoader``); ``resume_skipped`` tells how many samples were passed over to get back.
    """

    def __init__(
        self,
        sources: str | Sequence[str] | Sequence[SourceSpec],
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle: bool = True,
        epochs: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if isinstance(sources, (str, os.PathLike)) or (sources and not isinstance(sources[0], SourceSpec)):
            sources = [SourceSpec("default", sources)]  # type: ignore[arg-type]
        if not sources:
            raise ValueError("ShardStream needs at least one source")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        for s in sources:
            if not s.weight > 0:
                raise ValueError(f"source {s.name!r}: weight must be > 0, got {s.weight}")
        self.specs: list[SourceSpec] = list(sources)  # type: ignore[arg-type]
        self.shards = {s.name: expand_shards(s.shards) for s in self.specs}
        self.seed, self.shuffle_buffer, self.shuffle = seed, (shuffle_buffer if shuffle else 1), shuffle
        self.epochs, self.rank, self.world_size = epochs, rank, world_size
        self.stats: Counter = Counter()
        self.resume_skipped = 0
        self._readers: list[_SourceReader] | None = None
        self._mix_rng: random.Random | None = None
        self._split: tuple[int, int, int, int] | None = None
        self._yielded = 0
        self._pending: dict[str, Any] | None = None
        self._finished = False

    def _resolve_split(self) -> tuple[int, int, int, int]:
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            else:
                rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world_size {world}")
        return rank, world, worker, nworkers

    def _start(self) -> None:
        rank, world, worker, nworkers = self._split = self._resolve_split()
        split, nsplits = rank * nworkers + worker, world * nworkers
        self._readers = [
            _SourceReader(spec, self.shards[spec.name], self.seed, split, nsplits, self) for spec in self.specs
        ]
        self._mix_rng = random.Random(f"keye-mix:{self.seed}:{split}/{nsplits}")
        self._yielded, self.resume_skipped = 0, 0
        self.stats.clear()  # readers share this Counter, so it is reset in place
        state, self._pending = self._pending, None
        if state is None or state.get("readers") is None:
            return
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if tuple(state["split"]) != self._split:
            raise ValueError(
                f"reader state was saved on (rank, world, worker, workers)={tuple(state['split'])} but is being "
                f"restored on {self._split}; exact resume needs the same ranks and dataloader workers"
            )
        saved_names = [r["name"] for r in state["readers"]]
        if saved_names != [s.name for s in self.specs]:
            raise ValueError(f"reader state has sources {saved_names}, this stream has {[s.name for s in self.specs]}")
        self.stats.update(state["stats"])
        self._yielded = state["yielded"]
        _set_rng_state(self._mix_rng, state["mix_rng"])
        self.resume_skipped = sum(r.load_state_dict(s) for r, s in zip(self._readers, state["readers"]))
        self.stats["resume_skipped"] += self.resume_skipped
        log.info("reader resumed after %d samples, passing over %d tar groups", self._yielded, self.resume_skipped)

    def __iter__(self) -> Iterator[Sample]:
        if self._pending is not None and self._pending.get("finished"):
            self._pending, self._finished = None, False
            return iter(())  # resumed after the stream had ended: nothing is left
        self._finished = False
        self._start()
        return self._generate()

    def _generate(self) -> Iterator[Sample]:
        readers = self._readers
        assert readers is not None and self._mix_rng is not None
        weights = [s.weight for s in self.specs]
        while True:
            active = [i for i, r in enumerate(readers) if not (r.exhausted and not r.buffer)]
            if not active:
                break
            if len(readers) == 1:
                i = 0
            else:
                x = self._mix_rng.random() * sum(weights[i] for i in active)
                for i in active:
                    x -= weights[i]
                    if x < 0:
                        break
            sample = readers[i].next()
            if sample is None:
                continue
            self._yielded += 1
            self.stats[f"source/{readers[i].name}"] += 1
            yield sample
        self._readers, self._finished = None, True  # a saved state now says "finished"; the next iter() restarts

    def state_dict(self) -> dict[str, Any]:
        if self._readers is None:
            if self._pending is not None:
                return self._pending
            return {"version": STATE_VERSION, "readers": None, "yielded": 0, "finished": self._finished}
        assert self._mix_rng is not None and self._split is not None
        return {
            "version": STATE_VERSION,
            "split": list(self._split),
            "yielded": self._yielded,
            "mix_rng": _rng_state(self._mix_rng),
            "stats": dict(self.stats),
            "readers": [r.state_dict() for r in self._readers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes effect at the next ``iter()``, which reopens shards at the saved position."""
        self._pending = state
        self._readers, self._finished = None, False


class MappedStream(IterableDataset):
    """``fn`` applied to every item of a stateful stream; items whose ``fn`` raises one of ``errors`` are skipped
    and counted (a bad video must not stop training). State is the wrapped stream's state."""

    def __init__(
        self, stream: Iterable, fn: Callable[[Any], Any], errors: tuple[type[BaseException], ...] = (ValueError,)
    ):
        self.stream, self.fn, self.errors = stream, fn, errors
        self.stats: Counter = Counter()

    def __iter__(self) -> Iterator[Any]:
        for item in self.stream:
            try:
                out = self.fn(item)
            except self.errors as exc:
                self.stats[f"map_error/{type(exc).__name__}"] += 1
                log.warning("skipping a sample that failed in %s: %s", getattr(self.fn, "__name__", "fn"), exc)
                continue
            yield out

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "stats": dict(self.stats)}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])  # type: ignore[attr-defined]
        self.stats = Counter(state["stats"])
