"""The JSON sample record every data source is converted to, and its validation.

One record is one conversation. Validating it once, when shards are written, means the trainer never meets a
malformed record; errors name the field (``messages[1].content[0].video``) and the record id so a bad line in a
million-line JSONL file can be found and fixed.
"""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass, field
from typing import Any

from data_pipelines.media import VideoOptions

ROLES = ("system", "user", "assistant")
MODES = ("think", "no_think", "auto")
TOP_LEVEL_KEYS = ("id", "messages", "source", "mode")

# Per-item options a record may carry; video options are exactly the VideoOptions fields so the two never drift.
IMAGE_OPTIONS: dict[str, type] = {"min_pixels": int, "max_pixels": int, "resized_height": int, "resized_width": int}
_OPTION_TYPES = {"fps": float, "min_frame_similarity": float, "fast_token_ratio": float, "slow_fast": bool}
VIDEO_OPTIONS: dict[str, type] = {
    f.name: _OPTION_TYPES.get(f.name, float if f.name in ("video_start", "video_end") else int)
    for f in dataclasses.fields(VideoOptions)
}


class SchemaError(ValueError):
    """A record does not follow the sample schema; ``field`` is the dotted path of the offending value."""

    def __init__(self, message: str, record_id: str | None = None, field: str = "") -> None:
        where = f"record {record_id!r}" if record_id is not None else "record without id"
        super().__init__(f"{where}: {field + ': ' if field else ''}{message}")
        self.record_id = record_id
        self.field = field


@dataclass
class ContentItem:
    """One piece of a message: ``type`` is ``text``, ``image`` or ``video``; ``options`` hold per-item overrides."""

    type: str
    text: str | None = None
    image: str | None = None
    video: str | list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def media(self) -> str | list[str] | None:
        return self.image if self.type == "image" else self.video if self.type == "video" else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "text":
            out["text"] = self.text
        else:
            out[self.type] = list(self.media) if isinstance(self.media, list) else self.media
        out.update(self.options)
        return out


@dataclass
class Message:
    role: str
    content: str | list[ContentItem]

    def to_dict(self) -> dict[str, Any]:
        content = self.content if isinstance(self.content, str) else [c.to_dict() for c in self.content]
        return {"role": self.role, "content": content}


@dataclass
class SampleRecord:
    """A validated record. ``extra`` keeps unknown top-level keys (metadata) so they round-trip untouched."""

    id: str
    messages: list[Message]
    source: str
    mode: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def media_items(self) -> list[ContentItem]:
        """Image and video items in conversation order (the order their placeholders appear in the text)."""
        return [c for m in self.messages if not isinstance(m.content, str) for c in m.content if c.type != "text"]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "messages": [m.to_dict() for m in self.messages], "source": self.source}
        if self.mode is not None:
            out["mode"] = self.mode
        out.update(self.extra)
        return out


def _check_relative(path: Any, rid: str, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise SchemaError(f"expected a non-empty relative path string, found {path!r}", rid, where)
    if path.startswith(("/", "\\")) or "://" in path or (len(path) > 1 and path[1] == ":"):
        raise SchemaError(f"expected a path relative to the media root, found {path!r}", rid, where)
    if posixpath.normpath(path.replace("\\", "/")).startswith(".."):
        raise SchemaError(f"path {path!r} leaves the media root", rid, where)
    return path


def _check_options(item: dict[str, Any], allowed: dict[str, type], rid: str, where: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in item.items():
        if key in ("type", "image", "video"):
            continue
        if key not in allowed:
            raise SchemaError(f"unknown key {key!r}; allowed: {sorted(allowed)}", rid, f"{where}.{key}")
        want = allowed[key]
        if value is None:
            options[key] = None
            continue
        ok = (
            isinstance(value, bool) if want is bool else isinstance(value, (int, float)) and not isinstance(value, bool)
        )
        if not ok or (want is int and isinstance(value, float) and not value.is_integer()):
            raise SchemaError(f"expected {want.__name__}, found {value!r}", rid, f"{where}.{key}")
        if want is not bool and value < 0:
            raise SchemaError(f"expected a non-negative number, found {value!r}", rid, f"{where}.{key}")
        options[key] = want(value)
    start, end = options.get("video_start"), options.get("video_end")
    if start is not None and end is not None and end <= start:
        raise SchemaError(f"video_end ({end}) must be after video_start ({start})", rid, where)
    return options


def _validate_item(item: Any, rid: str, where: str) -> ContentItem:
    if not isinstance(item, dict):
        raise SchemaError(f"expected an object with a 'type', found {type(item).__name__}", rid, where)
    kind = item.get("type")
    if kind == "text":
        extra = set(item) - {"type", "text"}
        if extra:
            raise SchemaError(f"unknown keys {sorted(extra)} in a text item", rid, where)
        if not isinstance(item.get("text"), str):
            raise SchemaError(f"expected a string, found {item.get('text')!r}", rid, f"{where}.text")
        return ContentItem("text", text=item["text"])
    if kind == "image":
        path = _check_relative(item.get("image"), rid, f"{where}.image")
        return ContentItem("image", image=path, options=_check_options(item, IMAGE_OPTIONS, rid, where))
    if kind == "video":
        video = item.get("video")
        if isinstance(video, list):
            if not video:
                raise SchemaError("expected at least one frame path, found an empty list", rid, f"{where}.video")
            video = [_check_relative(p, rid, f"{where}.video[{i}]") for i, p in enumerate(video)]
        else:
            video = _check_relative(video, rid, f"{where}.video")
        return ContentItem("video", video=video, options=_check_options(item, VIDEO_OPTIONS, rid, where))
    raise SchemaError(f"expected type 'text', 'image' or 'video', found {kind!r}", rid, f"{where}.type")


def validate_record(obj: Any, default_source: str | None = None) -> SampleRecord:
    """Check one parsed JSON record against the schema and return it typed.

    ``default_source`` fills a missing ``source`` (for single-source files); without it ``source`` is required.
    """
    if not isinstance(obj, dict):
        raise SchemaError(f"expected a JSON object, found {type(obj).__name__}")
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        raise SchemaError(f"expected a non-empty string, found {rid!r}", None if rid is None else str(rid), "id")
    source = obj.get("source", default_source)
    if not isinstance(source, str) or not source:
        raise SchemaError(f"expected a non-empty string naming the data source, found {source!r}", rid, "source")
    mode = obj.get("mode")
    if mode is not None and mode not in MODES:
        raise SchemaError(f"expected one of {list(MODES)}, found {mode!r}", rid, "mode")
    raw_messages = obj.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise SchemaError(f"expected a non-empty list, found {raw_messages!r:.80}", rid, "messages")
    messages: list[Message] = []
    for i, msg in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise SchemaError(f"expected an object, found {type(msg).__name__}", rid, where)
        extra = set(msg) - {"role", "content"}
        if extra:
            raise SchemaError(f"unknown keys {sorted(extra)}", rid, where)
        role = msg.get("role")
        if role not in ROLES:
            raise SchemaError(f"expected one of {list(ROLES)}, found {role!r}", rid, f"{where}.role")
        if role == "system" and i != 0:
            raise SchemaError("a system message may only come first", rid, f"{where}.role")
        content = msg.get("content")
        if isinstance(content, str):
            messages.append(Message(role, content))
        elif isinstance(content, list):
            messages.append(
                Message(role, [_validate_item(c, rid, f"{where}.content[{j}]") for j, c in enumerate(content)])
            )
        else:
            raise SchemaError(f"expected a string or a list of items, found {content!r:.80}", rid, f"{where}.content")
    extra = {k: v for k, v in obj.items() if k not in TOP_LEVEL_KEYS}
    return SampleRecord(id=rid, messages=messages, source=source, mode=mode, extra=extra)
