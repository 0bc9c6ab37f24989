"""The web demo: its HTTP API (upload, SSE stream, thumbnails, errors), the ``keye web`` command, and the page
driven end to end in headless Debian Chromium, all against a tiny random checkpoint."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from data_pipelines import synthetic
from data_pipelines.media import VideoOptions, timestamp_text
from data_pipelines.video_reader import load_video

REPO = Path(__file__).resolve().parents[1]
MAX_UPLOAD = 1_000_000
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("web_media")
    samples = root / "samples"
    return {
        "video": Path(synthetic.scene_cuts(root / "cuts.mp4", every=10, num_frames=60, fps=10.0)),
        "image": Path(synthetic.write_image(samples / "still.png", height=96, width=128)),
        "junk": _write(root / "notes.mp4", b"this is not a video\n" * 50),
        "samples": samples,
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from keye.cli.init import init_checkpoint

    out = tmp_path_factory.mktemp("web_ckpt") / "tiny"
    init_checkpoint(out, config=str(REPO / "configs/model/tiny.yaml"))
    return out


@pytest.fixture(scope="module")
def server(checkpoint, media):
    from keye.inference import ChatEngine
    from keye.web import WebDemo, make_server

    engine = ChatEngine.from_pretrained(checkpoint, device="cpu")
    demo = WebDemo(
        engine, model_name="tiny", samples_dir=media["samples"], max_upload_bytes=MAX_UPLOAD, max_new_tokens=8
    )
    httpd = make_server(demo, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    yield {"url": f"http://{host}:{port}", "demo": demo}
    httpd.shutdown()
    httpd.server_close()
    demo.close()
    assert not demo.uploads.root.exists(), "uploads must be removed when the demo closes"


def _request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type", ""), data


def _upload(url: str, path: Path) -> tuple[int, dict]:
    status, _, data = _request(url, "POST", "/api/upload", path.read_bytes(), {"X-Filename": path.name})
    return status, json.loads(data)


def _generate(url: str, body: dict) -> tuple[int, str, list[tuple[str, dict]] | dict]:
    """POST /api/generate; an SSE reply comes back as ``[(event, data), ...]``, anything else as parsed JSON."""
    status, ctype, data = _request(
        url, "POST", "/api/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    if not ctype.startswith("text/event-stream"):
        return status, ctype, json.loads(data)
    events = []
    for block in data.decode().split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.splitlines())
            events.append((lines["event"], json.loads(lines["data"])))
    return status, ctype, events


def test_upload_and_stream_video(server, media):
    url = server["url"]
    status, info = _upload(url, media["video"])
    assert status == 200 and info["kind"] == "video" and info["size"] == media["video"].stat().st_size

    status, ctype, events = _generate(url, {"media_id": info["media_id"], "question": "What changes?", "mode": "auto"})
    assert status == 200 and ctype.startswith("text/event-stream")
    names = [name for name, _ in events]
    assert names[0] == "media" and names[-1] == "done" and set(names[1:-1]) <= {"text"}, names
    first, done = events[0][1], events[-1][1]

    # The strip shows exactly what the data pipeline samples: same timestamps, slow/fast types and token count.
    clip = load_video(media["video"], VideoOptions())
    assert [f["timestamp"] for f in first["frames"]] == pytest.approx(clip.timestamps)
    assert [f["timestamp_text"] for f in first["frames"]] == [timestamp_text(t) for t in clip.timestamps]
    assert [f["type"] for f in first["frames"]] == ["fast" if k else "slow" for k in clip.frame_types]
    assert {"slow", "fast"} <= {f["type"] for f in first["frames"]}, "scene cuts give both slow and fast frames"
    assert first["visual_tokens"] == clip.visual_tokens() == done["visual_tokens"]
    assert first["slow_hw"] == list(clip.slow_hw) and first["fast_hw"] == list(clip.fast_hw)

    streamed = "".join(data["text"] for name, data in events if name == "text")
    assert streamed and streamed == done["answer"]
    assert 1 <= done["new_tokens"] <= 8
    assert 0 < done["first_token_seconds"] <= done["seconds"]

    status, ctype, jpeg = _request(url, "GET", first["frames"][1]["url"])
    assert status == 200 and ctype == "image/jpeg" and jpeg[:2] == b"\xff\xd8"
    thumb = Image.open(io.BytesIO(jpeg))
    assert thumb.width <= 160 and thumb.height <= 120


def test_sample_image_and_slow_fast_off(server, media):
    url = server["url"]
    status, _, info = _request(url, "GET", "/api/info")
    assert status == 200 and json.loads(info)["samples"] == [{"name": "still.png", "kind": "image"}]
    status, _, events = _generate(url, {"sample": "still.png", "question": "Describe it.", "mode": "no_think"})
    assert status == 200 and events[-1][0] == "done", events[-1]
    assert [f["type"] for f in events[0][1]["frames"]] == ["image"] and events[0][1]["visual_tokens"] > 0

    _, upload = _upload(url, media["video"])
    body = {"media_id": upload["media_id"], "question": "Count cuts.", "slow_fast": False, "max_new_tokens": 2}
    status, _, events = _generate(url, body)
    assert status == 200 and events[-1][0] == "done" and events[-1][1]["new_tokens"] <= 2
    assert {f["type"] for f in events[0][1]["frames"]} == {"slow"}


def test_api_errors_are_clear_json(server, media):
    url = server["url"]
    status, err = _upload(url, media["junk"])
    assert status == 400 and err["reason"] == "not_media" and "not a video" in err["error"]
    status, _, data = _request(url, "POST", "/api/upload", b"\0" * (MAX_UPLOAD + 1), {"X-Filename": "big.mp4"})
    assert status == 413 and json.loads(data)["reason"] == "too_large"

    _, ok = _upload(url, media["video"])
    mid = ok["media_id"]
    cases = [
        ({"media_id": mid}, 400, "missing_question"),
        ({"media_id": mid, "question": "   "}, 400, "missing_question"),
        ({"question": "q"}, 400, "missing_media"),
        ({"media_id": mid, "question": "q", "mode": "deep"}, 400, "bad_request"),
        ({"media_id": mid, "question": "q", "max_new_tokens": 9}, 400, "bad_request"),
        ({"media_id": "0" * 32, "question": "q"}, 404, "unknown_media"),
        ({"sample": "../cuts.mp4", "question": "q"}, 404, "unknown_sample"),
    ]
    for body, want_status, want_reason in cases:
        status, ctype, err = _generate(url, body)
        assert (status, err["reason"]) == (want_status, want_reason), body
        assert ctype == "application/json" and err["error"]

    status, _, data = _request(url, "POST", "/api/generate", b"{oops", {"Content-Type": "application/json"})
    assert status == 400 and json.loads(data)["reason"] == "bad_json"
    status, _, data = _request(url, "GET", "/api/frames/" + "0" * 32 + "/0.jpg")
    assert status == 404 and json.loads(data)["reason"] == "unknown_frame"

    with server["demo"].lock:  # a generation in progress: the next is refused at once, not queued
        status, _, err = _generate(url, {"media_id": mid, "question": "q"})
    assert status == 409 and err["reason"] == "busy"


def test_cli_serves_and_reports_bad_flags(checkpoint, tmp_path):
    from keye.cli.main import main

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)}
    cmd = [sys.executable, "-m", "keye.cli.main", "web", "--model", str(checkpoint), "--port", "0"]
    cmd += ["--samples", str(tmp_path / "s"), "--write-samples"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line.startswith("keye web: serving on http://127.0.0.1:"), line
        status, ctype, data = _request(line.split("serving on ")[1].strip(), "GET", "/api/info")
        names = {s["name"] for s in json.loads(data)["samples"]}
        assert status == 200 and names == {"scene_cuts.mp4", "captions.mp4", "blocks.png"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0 and list(tmp.iterdir()) == [], "SIGTERM must stop cleanly and remove the uploads"
    assert main(["web", "--model", str(checkpoint), "--write-samples"]) == 1  # --write-samples needs --samples


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian chromium is not installed: run `sudo bash tools/install_system_deps.sh` (apt-get install chromium)",
)
def test_page_in_headless_chromium(server, media, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -e '.[dev]'")
    url = server["url"]
    with sync_api.sync_playwright() as pw:
        # A fresh profile per run; Playwright takes it as user_data_dir rather than a --user-data-dir flag.
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.querySelectorAll('#sample option').length === 2")
            assert page.text_content("#model") == "tiny"

            # A file that is not a video: the server's JSON error reaches the page.
            page.set_input_files("#file", str(media["junk"]))
            page.fill("#question", "What happens?")
            page.click("#ask")
            page.wait_for_function("document.body.dataset.state === 'error'", timeout=30_000)
            assert "not a video" in page.text_content("#error")

            page.set_input_files("#file", str(media["video"]))
            page.check("input[name=mode][value=think]")
            page.click("#ask")
            page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=90_000)
            assert page.text_content("#error") == ""
            assert page.text_content("#answer").strip()
            assert (
                int(page.text_content("#visual-tokens")) == load_video(media["video"], VideoOptions()).visual_tokens()
            )
            assert page.text_content("#ttft").endswith(" s")

            labels = page.locator("#frames .frame .label").all_text_contents()
            clip = load_video(media["video"], VideoOptions())
            assert labels == ["fast" if k else "slow" for k in clip.frame_types]
            page.wait_for_function(
                "[...document.querySelectorAll('#frames img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            assert page.locator("#frames .frame.fast").count() >= 1
            assert page.locator("#frames figcaption").first.text_content().startswith("0.0 s")
            (sh, sw), (fh, fw) = clip.slow_hw, clip.fast_hw  # [height, width]; shown width first, labelled
            assert f"slow {sw}x{sh} (w×h), fast {fw}x{fh} (w×h); prompt " in page.text_content("#sizes")
        finally:
            browser.close()


def test_client_leaving_mid_stream_frees_the_model(server, media):
    import socket
    import time

    url = server["url"]
    _, upload = _upload(url, media["video"])
    body = json.dumps({"media_id": upload["media_id"], "question": "Go on.", "max_new_tokens": 8}).encode()
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        head = (
            f"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        )
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        received = b""
        while b"event: media" not in received:
            chunk = sock.recv(4096)
            assert chunk, "server closed before the media event"
            received += chunk
    deadline = time.monotonic() + 30
    while server["demo"].lock.locked() and time.monotonic() < deadline:
        time.sleep(0.05)
    status, _, events = _generate(url, {"media_id": upload["media_id"], "question": "Again.", "max_new_tokens": 1})
    assert status == 200 and events[-1][0] == "done"
