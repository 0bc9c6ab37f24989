"""Media the web demo accepts: size-limited uploads in a private temp dir, a folder of samples, JPEG thumbnails.

Uploads are checked by content (PIL for images, a PyAV/decord probe for videos), never by the browser's
content type or the file name, so "not a video" is reported at upload time rather than mid-generation.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from data_pipelines.media import MediaError, VideoOptions

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
THUMB_SIZE = (160, 120)


class WebError(Exception):
    """A request the demo refuses: carries the HTTP status and a short machine-friendly ``reason``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

    def payload(self) -> dict:
        return {"error": str(self), "reason": self.reason}


@dataclass(frozen=True)
class StoredMedia:
    """One usable file: where it is, what it is (``video`` or ``image``), and the name to show."""

    path: Path
    kind: str
    name: str
    size: int


def detect_kind(path: Path) -> str:
    """``image`` or ``video`` by decoding the file's header; raises ``WebError`` (400) for anything else."""
    try:
        with Image.open(path) as img:
            img.verify()
        return "image"
    except Exception:  # PIL raises many types for non-images; the video probe below decides
        pass
    from data_pipelines.video_reader import open_video

    try:
        meta, _ = open_video(path, VideoOptions())
    except MediaError as exc:
        raise WebError(
            400, "not_media", f"not a video or image ({exc.reason}): upload an mp4/webm/mov or a picture"
        ) from None
    if meta.num_frames <= 0:
        raise WebError(400, "not_media", "the video holds no frames")
    return "video"


class UploadStore:
    """Uploaded files in one temp dir; the oldest are deleted beyond ``keep`` so a long-running demo stays bounded."""

    def __init__(self, max_bytes: int, keep: int = 32) -> None:
        self.max_bytes = max_bytes
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="keye-web-"))
        self._items: OrderedDict[str, StoredMedia] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, stream: io.BufferedIOBase, length: int, filename: str) -> tuple[str, StoredMedia]:
        """Copy ``length`` bytes from ``stream``, check the content, and return ``(media_id, item)``."""
        if length <= 0:
            raise WebError(400, "empty", "the upload is empty (0 bytes)")
        if length > self.max_bytes:
            raise WebError(413, "too_large", f"upload is {length} bytes; the limit is {self.max_bytes} bytes")
        media_id = uuid.uuid4().hex
        suffix = Path(filename).suffix.lower()
        suffix = suffix if suffix in VIDEO_SUFFIXES + IMAGE_SUFFIXES else ".bin"
        path = self.root / f"{media_id}{suffix}"
        remaining = length
        with open(path, "wb") as out:
            while remaining > 0:
                chunk = stream.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                out.write(chunk)
                remaining -= len(chunk)
        if remaining:
            path.unlink(missing_ok=True)
            raise WebError(400, "truncated", f"upload ended after {length - remaining} of {length} bytes")
        try:
            kind = detect_kind(path)
        except WebError:
            path.unlink(missing_ok=True)
            raise
        item = StoredMedia(path=path, kind=kind, name=Path(filename).name or path.name, size=length)
        with self._lock:
            self._items[media_id] = item
            while len(self._items) > self.keep:
                _, old = self._items.popitem(last=False)
                old.path.unlink(missing_ok=True)
        return media_id, item

    def get(self, media_id: str) -> StoredMedia:
        with self._lock:
            item = self._items.get(media_id)
        if item is None:
            raise WebError(404, "unknown_media", f"no upload with id {media_id!r} (it may have expired; upload again)")
        return item

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def list_samples(directory: Path | None) -> dict[str, StoredMedia]:
    """Videos and images directly inside ``directory`` by file name (the only names a client may ask for)."""
    if directory is None:
        return {}
    if not directory.is_dir():
        raise FileNotFoundError(f"samples folder {directory} does not exist")
    out = {}
    for p in sorted(directory.iterdir()):
        suffix = p.suffix.lower()
        if p.is_file() and suffix in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
            kind = "video" if suffix in VIDEO_SUFFIXES else "image"
            out[p.name] = StoredMedia(path=p, kind=kind, name=p.name, size=p.stat().st_size)
    return out


def write_samples(directory: Path) -> list[Path]:
    """Generated media to try the demo with (hard scene cuts, changing captions, a still image)."""
    from data_pipelines import synthetic

    directory.mkdir(parents=True, exist_ok=True)
    made = [
        synthetic.scene_cuts(directory / "scene_cuts.mp4", every=10, num_frames=60, fps=10.0),
        synthetic.text_video(directory / "captions.mp4", seconds=4.0, fps=5.0),
        synthetic.write_image(directory / "blocks.png", height=224, width=320),
    ]
    return [Path(p) for p in made]


def jpeg_thumbnail(frame: torch.Tensor | Image.Image) -> bytes:
    """A small JPEG of a uint8 ``[3, H, W]`` frame or a PIL image, for the page's frame strip."""
    img = frame if isinstance(frame, Image.Image) else Image.fromarray(frame.permute(1, 2, 0).contiguous().numpy())
    img = img.convert("RGB")
    img.thumbnail(THUMB_SIZE)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()
