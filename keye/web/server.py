"""The web demo's backend: a stdlib ``ThreadingHTTPServer`` around one ``ChatEngine``.

Routes (all errors are JSON ``{"error": message, "reason": tag}`` with a 4xx/5xx status):

- ``GET /`` the page; ``GET /api/info`` model name, samples, upload limit, token cap;
- ``POST /api/upload`` raw file body (``X-Filename`` header, URL-encoded) -> ``{"media_id", "kind", "name", "size"}``;
- ``POST /api/generate`` JSON ``{"question", "media_id" | "sample", "mode": think|no_think|auto, "slow_fast",
  "max_new_tokens"}`` -> Server-Sent Events: ``media`` (frames with slow/fast types, timestamps, the timestamp text
  the prompt holds, thumbnail URLs, the sizes the model sees, visual and prompt tokens), ``text`` (streamed pieces), then ``done`` (answer, timings) or ``error``;
- ``GET /api/frames/<job>/<n>.jpg`` the thumbnails of the last few generations.

One generation runs at a time (a second gets 409 at once rather than queueing behind a long video). A client that
disconnects mid-answer stops its generation: the streamer callback's failed write aborts ``generate``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

from data_pipelines.media import FAST, MediaError, timestamp_text
from keye.image_processing import model_image_size

from .media import StoredMedia, UploadStore, WebError, jpeg_thumbnail, list_samples

log = logging.getLogger("keye.web")

MODES = ("think", "no_think", "auto")
MAX_JSON_BYTES = 64 * 1024
MAX_QUESTION_CHARS = 4000
KEEP_THUMBNAIL_JOBS = 16
FRAME_ROUTE = re.compile(r"^/api/frames/([0-9a-f]{32})/(\d+)\.jpg$")


@dataclass
class GenerateRequest:
    question: str
    mode: str
    slow_fast: bool
    max_new_tokens: int
    media_id: str | None = None
    sample: str | None = None


def parse_generate(body: dict, token_cap: int) -> GenerateRequest:
    """Validate a ``/api/generate`` body; every problem is a 400 that names the field."""
    if not isinstance(body, dict):
        raise WebError(400, "bad_request", "the request body must be a JSON object")
    question = body.get("question")
    if not isinstance(question, str) or not question.strip():
        raise WebError(400, "missing_question", "type a question ('question' is missing or empty)")
    if len(question) > MAX_QUESTION_CHARS:
        raise WebError(
            400, "bad_request", f"the question is {len(question)} characters; the limit is {MAX_QUESTION_CHARS}"
        )
    mode = body.get("mode", "auto")
    if mode not in MODES:
        raise WebError(400, "bad_request", f"'mode' must be one of {list(MODES)}, got {mode!r}")
    slow_fast = body.get("slow_fast", True)
    if not isinstance(slow_fast, bool):
        raise WebError(400, "bad_request", f"'slow_fast' must be true or false, got {slow_fast!r}")
    max_new = body.get("max_new_tokens", token_cap)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or not 1 <= max_new <= token_cap:
        raise WebError(400, "bad_request", f"'max_new_tokens' must be an integer in [1, {token_cap}], got {max_new!r}")
    media_id, sample = body.get("media_id"), body.get("sample")
    if bool(media_id) == bool(sample):
        raise WebError(400, "missing_media", "give exactly one of 'media_id' (an upload) or 'sample' (a sample name)")
    return GenerateRequest(question.strip(), mode, slow_fast, max_new, media_id or None, sample or None)


class WebDemo:
    """State shared by all request threads: the engine, the generation lock, uploads, samples and thumbnails."""

    def __init__(
        self,
        engine,
        model_name: str = "",
        samples_dir: Path | None = None,
        max_upload_bytes: int = 50 * 1024 * 1024,
        max_new_tokens: int = 256,
        video_options: dict | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.samples = list_samples(samples_dir)
        self.uploads = UploadStore(max_upload_bytes)
        self.max_new_tokens = max_new_tokens
        self.video_options = dict(video_options or {})
        self.lock = threading.Lock()  # one generation at a time: the model and the CPU/GPU are shared
        self._thumbs: OrderedDict[str, list[bytes]] = OrderedDict()
        self._thumbs_lock = threading.Lock()

    def info(self) -> dict:
        return {
            "model": self.model_name,
            "samples": [{"name": s.name, "kind": s.kind} for s in self.samples.values()],
            "max_upload_bytes": self.uploads.max_bytes,
            "max_new_tokens": self.max_new_tokens,
            "modes": list(MODES),
        }

    def resolve(self, req: GenerateRequest) -> StoredMedia:
        if req.media_id:
            return self.uploads.get(req.media_id)
        item = self.samples.get(req.sample)
        if item is None:
            raise WebError(404, "unknown_sample", f"no sample named {req.sample!r} (known: {sorted(self.samples)})")
        return item

    def thumbnail(self, job: str, index: int) -> bytes:
        with self._thumbs_lock:
            frames = self._thumbs.get(job)
        if frames is None or not 0 <= index < len(frames):
            raise WebError(404, "unknown_frame", f"no frame {index} for job {job} (thumbnails of old jobs expire)")
        return frames[index]

    def _keep_thumbs(self, job: str, thumbs: list[bytes]) -> None:
        with self._thumbs_lock:
            self._thumbs[job] = thumbs
            while len(self._thumbs) > KEEP_THUMBNAIL_JOBS:
                self._thumbs.popitem(last=False)

    def prepare(self, req: GenerateRequest, media: StoredMedia):
        """Decode the media once, keep its thumbnails, and encode the prompt. Returns ``(sample, media_event)``."""
        processor = self.engine.processor
        job = uuid.uuid4().hex
        started = time.perf_counter()
        try:
            if media.kind == "video":
                item = {"video": str(media.path), **self.video_options, "slow_fast": req.slow_fast}
                clip = processor.load_video_item(item, None)
                content = {"type": "video", "video": clip}
                thumbs = [jpeg_thumbnail(f) for f in clip.frames]
                frames = [
                    {
                        "index": j,
                        "timestamp": t,
                        "timestamp_text": timestamp_text(t),  # as the prompt writes it (JS toFixed rounds ties up)
                        "type": "fast" if k == FAST else "slow",
                    }
                    for j, (t, k) in enumerate(zip(clip.timestamps, clip.frame_types))
                ]
                sizes = {"slow_hw": list(clip.slow_hw), "fast_hw": list(clip.fast_hw)}
            else:
                image = processor.load_image_item({"image": str(media.path)}, None)
                content = {"type": "image", "image": image}
                thumbs = [jpeg_thumbnail(image)]
                frames = [{"index": 0, "timestamp": None, "timestamp_text": None, "type": "image"}]
                # the size the model sees: after the image processor's own resize (preprocessor_config.json)
                final_hw = model_image_size(image.height, image.width, processor.image_config)
                sizes = {"slow_hw": list(final_hw), "fast_hw": None}
        except MediaError as exc:
            raise WebError(400, exc.reason, f"cannot use {media.name}: {exc}") from exc
        conversation = [{"role": "user", "content": [content, {"type": "text", "text": req.question}]}]
        sample = self.engine.encode([conversation], mode=None if req.mode == "auto" else req.mode)[0]
        self._keep_thumbs(job, thumbs)
        for f in frames:
            f["url"] = f"/api/frames/{job}/{f['index']}.jpg"
        visual = sample.num_visual_tokens
        event = {
            "job": job,
            "kind": media.kind,
            "name": media.name,
            "frames": frames,
            **sizes,
            "visual_tokens": visual,
            "prompt_tokens": len(sample),
            "media_seconds": round(time.perf_counter() - started, 4),
        }
        return sample, event

    def generate(self, req: GenerateRequest, sample, streamer) -> dict:
        from keye.inference import GenerationSettings

        result = self.engine.generate_encoded([sample], GenerationSettings(max_new_tokens=req.max_new_tokens), streamer)
        return {
            "answer": result.texts[0],
            "new_tokens": len(result.token_ids[0]),
            "visual_tokens": result.visual_tokens[0],
            "generate_seconds": round(result.seconds, 4),
        }

    def close(self) -> None:
        self.uploads.close()


class _Body:
    """The request body with a count of unread bytes, so an error reply can drain exactly what is left."""

    def __init__(self, rfile, length: int) -> None:
        self._rfile = rfile
        self.remaining = length

    def read(self, n: int) -> bytes:
        chunk = self._rfile.read(min(n, self.remaining)) if self.remaining > 0 else b""
        self.remaining -= len(chunk)
        if not chunk:
            self.remaining = 0
        return chunk


class ClientGone(Exception):
    """The browser went away mid-stream; raised from the streamer callback to stop ``generate``."""


def make_handler(demo: WebDemo) -> type[BaseHTTPRequestHandler]:
    page = resources.files("keye.web").joinpath("static/index.html").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "KeyeWeb/1.0"

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (stdlib signature)
            log.info("%s %s", self.address_string(), format % args)

        # --- responses -----------------------------------------------------------------------------------
        def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _error(self, err: WebError) -> None:
            self._json(err.status, err.payload())

        def _event(self, name: str, payload: dict) -> None:
            try:
                self.wfile.write(f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ClientGone() from exc

        def _discard_body(self) -> None:
            """Read what the client still sends so it sees our error instead of a reset (bounded, then give up)."""
            body = getattr(self, "_body", None)
            if body is not None and body.remaining <= 4 * demo.uploads.max_bytes:
                while body.read(1 << 16):
                    pass
            self.close_connection = True

        def _length(self) -> int:
            raw = self.headers.get("Content-Length")
            if raw is None:
                raise WebError(411, "length_required", "send a Content-Length header")
            try:
                length = int(raw)
            except ValueError:
                raise WebError(400, "bad_request", f"Content-Length must be an integer, got {raw!r}") from None
            if length < 0:
                raise WebError(400, "bad_request", f"Content-Length must not be negative, got {length}")
            self._body = _Body(self.rfile, length)
            return length

        # --- routes --------------------------------------------------------------------------------------
        def do_GET(self) -> None:  # noqa: N802 (stdlib name)
            path = urlsplit(self.path).path
            try:
                if path in ("/", "/index.html"):
                    self._send(200, page, "text/html; charset=utf-8")
                elif path == "/api/info":
                    self._json(200, demo.info())
                elif m := FRAME_ROUTE.match(path):
                    self._send(200, demo.thumbnail(m.group(1), int(m.group(2))), "image/jpeg")
                else:
                    raise WebError(404, "not_found", f"no route GET {path}")
            except WebError as err:
                self._error(err)

        def do_POST(self) -> None:  # noqa: N802 (stdlib name)
            path = urlsplit(self.path).path
            self._body = None
            try:
                if path == "/api/upload":
                    self._upload()
                elif path == "/api/generate":
                    self._generate()
                else:
                    raise WebError(404, "not_found", f"no route POST {path}")
            except WebError as err:
                self._discard_body()
                self._error(err)
            except Exception as exc:  # before any stream started: a JSON 500 rather than a dropped connection
                log.exception("request failed")
                self._discard_body()
                self._json(500, {"error": f"internal error: {exc}", "reason": "internal"})

        def _upload(self) -> None:
            length = self._length()
            name = unquote(self.headers.get("X-Filename", "")) or "upload"
            media_id, item = demo.uploads.add(self._body, length, name)
            self._json(200, {"media_id": media_id, "kind": item.kind, "name": item.name, "size": item.size})

        def _generate(self) -> None:
            length = self._length()
            if length > MAX_JSON_BYTES:
                raise WebError(413, "too_large", f"request body is {length} bytes; the limit is {MAX_JSON_BYTES}")
            try:
                body = json.loads(self._body.read(length) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise WebError(400, "bad_json", f"the request body is not JSON: {exc}") from None
            req = parse_generate(body, demo.max_new_tokens)
            media = demo.resolve(req)
            if not demo.lock.acquire(blocking=False):
                raise WebError(409, "busy", "another answer is being generated; try again when it finishes")
            try:
                self._stream(req, media)
            finally:
                demo.lock.release()

        def _stream(self, req: GenerateRequest, media: StoredMedia) -> None:
            from keye.inference import TimedTextStreamer

            streamer = TimedTextStreamer(demo.engine.processor.tokenizer, lambda t: self._event("text", {"text": t}))
            sample, media_event = demo.prepare(req, media)  # WebError here is still a plain JSON response
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            self.close_connection = True  # the stream ends when the connection closes (HTTP/1.0 framing)
            try:
                self._event("media", media_event)
                done = demo.generate(req, sample, streamer)
                ttft = streamer.first_token_seconds
                done["first_token_seconds"] = None if ttft is None else round(ttft, 4)
                done["seconds"] = round(time.perf_counter() - streamer.started, 4)
                self._event("done", done)
            except ClientGone:
                log.info("client left during generation; stopped")
            except Exception as exc:  # after the headers, errors travel as an SSE event
                log.exception("generation failed")
                with contextlib.suppress(ClientGone):
                    self._event("error", {"error": f"generation failed: {exc}", "reason": "internal"})

    return Handler


def make_server(demo: WebDemo, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """A bound server (``port=0`` picks a free port; read it from ``server.server_address``)."""
    server = ThreadingHTTPServer((host, port), make_handler(demo))
    server.daemon_threads = True
    return server


def serve(demo: WebDemo, host: str, port: int, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted, then remove the uploads."""
    server = make_server(demo, host, port)
    url = f"http://{server.server_address[0]}:{server.server_address[1]}/"
    if on_ready:
        on_ready(url)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        demo.close()
