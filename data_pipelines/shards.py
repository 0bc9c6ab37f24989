"""Write JSONL conversations plus their media into webdataset ``.tar`` shards.

Each sample becomes ``KEY.json`` (the record, its media references rewritten to member names) and one member per
media file (``KEY.media_0.mp4``, frame lists as ``KEY.media_1.f0000.jpg`` …); in frame shards (``frames``, see
``data_pipelines.frame_shards``) each video, file or frame list, is one ``KEY.media_0.frames.npz`` instead. Keys are
zero-padded running numbers because webdataset splits a member name at the first dot, and record ids may contain
dots or slashes.
Bad lines (JSON, schema, missing/empty/corrupt media, wrong extension) are written to ``skipped.jsonl`` with a
reason and counted; they never stop the run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import webdataset as wds

from data_pipelines.schema import ContentItem, SampleRecord, SchemaError, validate_record

if TYPE_CHECKING:
    from data_pipelines.frame_shards import FrameEncoding

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTS = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv"})
MEDIA_CHECKS = ("none", "open", "decode", "load")


class MediaProblem(ValueError):
    """One media file of a record cannot be used; ``reason`` is the skip category."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class ShardReport:
    """What ``write_shards`` produced; ``manifest`` is also written as ``manifest.json``."""

    out_dir: str
    num_samples: int = 0
    num_skipped: int = 0
    skipped_by_reason: Counter = field(default_factory=Counter)
    per_source: Counter = field(default_factory=Counter)
    shards: list[dict[str, Any]] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0

    @property
    def manifest(self) -> dict[str, Any]:
        return {
            "format": "keye-webdataset-v1",
            "num_samples": self.num_samples,
            "num_skipped": self.num_skipped,
            "num_shards": len(self.shards),
            "per_source": dict(sorted(self.per_source.items())),
            "skipped_by_reason": dict(sorted(self.skipped_by_reason.items())),
            "bytes": self.bytes,
            "shards": self.shards,
        }

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped_by_reason.items())) or "none"
        rate = self.num_samples / self.seconds if self.seconds > 0 else 0.0
        return (
            f"wrote {self.num_samples} samples in {len(self.shards)} shards ({self.bytes / 1e6:.1f} MB) to "
            f"{self.out_dir} in {self.seconds:.1f}s ({rate:.1f} samples/s); skipped {self.num_skipped} ({reasons})"
        )


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _load_check(kind: str, data: bytes, options: dict[str, Any]) -> None:
    """Run the trainer's own loaders with the item's options, so sharding rejects exactly what training would."""
    from data_pipelines.media import VideoOptions

    if kind == "image":
        from data_pipelines.image_reader import load_image
        from data_pipelines.media import MediaError
        from data_pipelines.resize import smart_resize

        kwargs = {k: options[k] for k in ("min_pixels", "max_pixels") if options.get(k) is not None}
        if options.get("resized_height") and options.get("resized_width"):
            kwargs["resized_hw"] = (options["resized_height"], options["resized_width"])
        image = load_image(data, **kwargs)
        # The image processor's own resize (second stage) refuses an aspect ratio above 200 whatever the
        # checkpoint's pixel limits are, so this decides exactly what any model's processor would.
        try:
            smart_resize(image.height, image.width)
        except ValueError as exc:
            raise MediaError("unsupported", f"image processor resize: {exc}") from exc
    else:
        from data_pipelines.video_reader import load_video

        load_video(data, VideoOptions(**{k: v for k, v in options.items() if v is not None}))


@contextmanager
def _load_problems(kind: str, name: str) -> Iterator[None]:
    """Errors of the trainer's loaders as ``MediaProblem`` with their skip reason."""
    from data_pipelines.media import MediaError

    try:
        yield
    except MediaError as exc:
        reason = "corrupt_media" if exc.reason in ("corrupt", "empty", "no_video") else f"media_{exc.reason}"
        raise MediaProblem(reason, f"{name}: {exc}") from exc
    except Exception as exc:  # a loader bug or an exotic codec error must skip one sample, not the run
        raise MediaProblem("corrupt_media", f"{name}: cannot load {kind}: {type(exc).__name__}: {exc}") from exc


def check_media_bytes(
    kind: str, data: bytes, name: str, depth: str = "load", options: dict[str, Any] | None = None
) -> None:
    """Raise ``MediaProblem`` if ``data`` is not a usable image/video.

    ``open`` reads the header and the first frame; ``decode`` decodes every video frame with PyAV (catches
    truncated files whose index survives); ``load`` runs ``load_image``/``load_video`` with the item's options
    (frame sampling, Slow-Fast typing, resizing), i.e. exactly what the trainer will do. This is the one place that
    decides what "usable" means for sharding.
    """
    if depth == "none":
        return
    if depth == "load":
        with _load_problems(kind, name):
            _load_check(kind, data, options or {})
        return
    try:
        if kind == "image":
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                img.load() if depth == "decode" else img.verify()
                if min(img.size) < 1:
                    raise ValueError(f"image has size {img.size}")
            return
        import av

        from data_pipelines.video_reader import image_format

        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            still = image_format(container)  # a picture renamed .mp4 opens as a one-frame "video"
            decoded = 0
            for _ in container.decode(stream):
                decoded += 1
                if depth == "open" and (still is None or decoded > 1):
                    break
            if decoded == 0:
                raise ValueError("no decodable frame")
        if still is not None and decoded == 1:
            raise MediaProblem("corrupt_media", f"{name}: is an image ({still}), not a video")
    except MediaProblem:
        raise
    except Exception as exc:  # PIL/PyAV raise many types for bad bytes
        raise MediaProblem("corrupt_media", f"{name}: cannot decode {kind}: {type(exc).__name__}: {exc}") from exc


def _media_path(root: Path, rel: str, kind: str) -> Path:
    """``root / rel`` if it has a ``kind`` extension and is an existing file, else ``MediaProblem``."""
    ext = _ext(rel)
    allowed = IMAGE_EXTS if kind == "image" else VIDEO_EXTS
    if ext not in allowed:
        raise MediaProblem(
            "wrong_extension", f"{rel}: extension {ext or '(none)'!r} is not a {kind} ({sorted(allowed)})"
        )
    path = root / rel
    if not path.is_file():
        raise MediaProblem("missing_media", f"{rel}: no such file under {root}")
    return path


def _read_media(root: Path, rel: str, kind: str, check: str, options: dict[str, Any]) -> bytes:
    data = _media_path(root, rel, kind).read_bytes()
    if not data:
        raise MediaProblem("empty_media", f"{rel}: file is empty")
    check_media_bytes(kind, data, rel, check, options)
    return data


def check_media_files(record: SampleRecord, root: str | os.PathLike) -> None:
    """Raise ``MediaProblem`` for the first media file of ``record`` with a wrong extension, missing under ``root``
    or empty (the checks ``write_shards`` makes before decoding; nothing is read or decoded here)."""
    root = Path(root)
    for item in record.media_items():
        paths = item.video if item.type == "video" and isinstance(item.video, list) else [item.media]
        kind = "image" if item.type == "image" or isinstance(item.video, list) else "video"
        for rel in paths:
            assert isinstance(rel, str)
            if _media_path(root, rel, kind).stat().st_size == 0:
                raise MediaProblem("empty_media", f"{rel}: file is empty")


def _collect_media(record: SampleRecord, root: Path, check: str, frames: FrameEncoding | None) -> dict[str, bytes]:
    """Read every media file of ``record`` and rewrite its references to member names (in place); with ``frames``,
    each video is read by the trainer's loader (that is its media check) and stored as one frame member."""
    media: dict[str, bytes] = {}
    for i, item in enumerate(record.media_items()):
        if item.type == "video" and frames is not None:
            from data_pipelines.frame_shards import FRAMES_SUFFIX, frames_member

            name = f"media_{i}{FRAMES_SUFFIX}"
            if isinstance(item.video, list):
                source: bytes | list[bytes] = [_read_media(root, rel, "image", check, {}) for rel in item.video]
                path = item.video[0]
            else:
                assert isinstance(item.video, str)
                source, path = _read_media(root, item.video, "video", "none", {}), item.video
            with _load_problems("video", path):
                media[name] = frames_member(source, item.options, frames, path)
            item.video = name
        elif item.type == "video" and isinstance(item.video, list):
            names = []
            for j, rel in enumerate(item.video):
                name = f"media_{i}.f{j:04d}{_ext(rel)}"
                media[name] = _read_media(root, rel, "image", check, {})
                names.append(name)
            item.video = names
        else:
            rel = item.media
            assert isinstance(rel, str)
            name = f"media_{i}{_ext(rel)}"
            media[name] = _read_media(root, rel, item.type, check, item.options)
            _set_media(item, name)
    return media


def _set_media(item: ContentItem, name: str) -> None:
    if item.type == "image":
        item.image = name
    else:
        item.video = name


class _ShardSink:
    """Rolls over to a new ``.tar`` every ``samples_per_shard`` samples, tracking per-shard counts."""

    def __init__(self, out_dir: Path, prefix: str, samples_per_shard: int, report: ShardReport) -> None:
        self.out_dir, self.prefix, self.limit, self.report = out_dir, prefix, samples_per_shard, report
        self.writer: wds.TarWriter | None = None
        self.current: dict[str, Any] = {}

    def write(self, key: str, record: dict[str, Any], media: dict[str, bytes]) -> None:
        if self.writer is None or self.current["samples"] >= self.limit:
            self.close()
            name = f"{self.prefix}-{len(self.report.shards):06d}.tar"
            self.current = {"path": name, "samples": 0, "bytes": 0, "per_source": Counter()}
            self.report.shards.append(self.current)
            self.writer = wds.TarWriter(str(self.out_dir / (name + ".tmp")), mtime=0)  # reproducible bytes
        sample: dict[str, Any] = {"__key__": key, "json": json.dumps(record, ensure_ascii=False).encode()}
        sample.update(media)
        self.current["bytes"] += self.writer.write(sample)
        self.current["samples"] += 1
        self.current["per_source"][record["source"]] += 1

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        name = self.current["path"]
        os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
        self.current["bytes"] = (self.out_dir / name).stat().st_size
        self.current["per_source"] = dict(sorted(self.current["per_source"].items()))
        self.report.bytes += self.current["bytes"]
        self.writer = None


def write_shards(
    input_path: str | os.PathLike,
    media_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
    media_check: str = "load",
    default_source: str | None = None,
    prefix: str = "shard",
    progress: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    frames: FrameEncoding | None = None,
) -> ShardReport:
    """Convert a JSONL file of sample records into webdataset shards under ``out_dir``.

    Writes ``{prefix}-NNNNNN.tar``, ``manifest.json`` and ``skipped.jsonl``; returns the report. ``media_check``
    is ``none``, ``open`` (header + first frame), ``decode`` (every frame) or ``load`` (the trainer's loaders).
    ``on_record`` is called with every record written (as stored, media references rewritten to member names).
    ``frames``: write frame shards (videos decoded once, stored as frames; ``manifest.json`` says so under
    ``frames``, ``null`` for shards holding the video files).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if media_check not in MEDIA_CHECKS:
        raise ValueError(f"media_check must be one of {MEDIA_CHECKS}, got {media_check!r}")
    input_path, root, out = Path(input_path), Path(media_root), Path(out_dir)
    if not input_path.is_file():
        raise FileNotFoundError(f"input JSONL {input_path} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"media root {root} is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{prefix}-*.tar"):
        stale.unlink()  # a re-run must not leave shards of an earlier, larger run behind
    report = ShardReport(out_dir=str(out))
    sink = _ShardSink(out, prefix, samples_per_shard, report)
    seen_ids: set[str] = set()
    start = time.perf_counter()
    from tqdm.auto import tqdm

    with input_path.open("rb") as f, (out / "skipped.jsonl").open("w") as skipped:
        total = sum(1 for _ in f)
        f.seek(0)
        bar = tqdm(total=total, desc="shards", unit="sample", disable=not progress)
        for lineno, raw in enumerate(f, 1):
            bar.update(1)
            if not raw.strip():
                continue
            rid: str | None = None
            try:
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise MediaProblem("bad_json", f"line is not valid JSON: {exc}") from exc
                if isinstance(obj, dict) and isinstance(obj.get("id"), str):
                    rid = obj["id"]
                try:
                    record = validate_record(obj, default_source=default_source)
                except SchemaError as exc:
                    raise MediaProblem("schema", str(exc)) from exc
                if record.id in seen_ids:
                    raise MediaProblem("duplicate_id", f"id {record.id!r} already written")
                media = _collect_media(record, root, media_check, frames)
            except MediaProblem as exc:
                report.num_skipped += 1
                report.skipped_by_reason[exc.reason] += 1
                entry = {"line": lineno, "id": rid, "reason": exc.reason, "detail": str(exc)}
                skipped.write(json.dumps(entry, ensure_ascii=False) + "\n")
                log.warning("skipping line %d (%s) of %s: %s", lineno, exc.reason, input_path, exc)
                bar.set_postfix(skipped=report.num_skipped, refresh=False)
                continue
            seen_ids.add(record.id)
            stored = record.to_dict()
            sink.write(f"{report.num_samples:09d}", stored, media)
            if on_record is not None:
                on_record(stored)
            report.num_samples += 1
            report.per_source[record.source] += 1
        bar.close()
    sink.close()
    report.seconds = time.perf_counter() - start
    manifest = dict(
        report.manifest,
        input=str(input_path),
        media_root=str(root),
        media_check=media_check,
        frames=frames.manifest() if frames is not None else None,
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    log.info("%s", report.summary())
    return report
