"""Running code blocks: one jailed worker process per trajectory, driven over a length-prefixed JSON pipe.

``WorkerProcess`` owns one jail (start, wait until its imports are done, send a block, kill). ``SandboxSession``
is what the tool loop holds for one trajectory: it repairs the code, copies the input images in, runs the
block with a hard wall-clock deadline, validates the output images and copies them out. It never raises for
anything the model's code does; every failure becomes a :class:`SandboxResult`.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from keye.sandbox.config import SandboxConfig
from keye.sandbox.jail import Jail
from keye.sandbox.repair import repair_code
from keye.sandbox.result import SandboxResult
from keye.sandbox.worker import HEADER, ProtocolError, write_message

log = logging.getLogger(__name__)
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}
RESTARTED = "the sandbox was restarted; variables from earlier code blocks are gone"


class WorkerDied(RuntimeError):
    """The jailed process exited or was killed while the parent waited for it."""


class WorkerTimeout(RuntimeError):
    """The jailed process did not answer before the deadline."""


class SandboxStartError(RuntimeError):
    """A worker could not be started (bwrap failed, imports failed, or start-up timed out)."""


# bwrap's --die-with-parent uses PR_SET_PDEATHSIG, which fires when the *thread* that forked the jail exits, not
# the process. Every jail is therefore started from this one long-lived thread, so a session opened from a
# short-lived thread (a thread pool, the warm pool's filler) keeps its worker until it is closed.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keye-sandbox-spawn")


class WorkerProcess:
    """One jailed interpreter. Killing it kills everything it spawned (its pid namespace dies with it)."""

    def __init__(self, jail: Jail) -> None:
        self.jail = jail
        argv, cwd, self.host_workdir = jail.command()
        self.proc = _SPAWNER.submit(
            subprocess.Popen,
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=jail.env(self.host_workdir or jail.config.workdir),
            start_new_session=True,
        ).result()
        self.info: dict = {}
        self.sent_files: set[str] = set()
        c = jail.config
        self.max_reply = c.max_stdout_chars * 4 + c.max_images * ((c.max_image_mb << 20) * 4 // 3 + 1024) + (1 << 20)

    @property
    def workdir(self) -> str:
        return self.host_workdir or self.jail.config.workdir

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd, chunks, left = self.proc.stdout.fileno(), [], n
        while left:
            now = time.monotonic()
            if now >= deadline:
                raise WorkerTimeout()
            ready, _, _ = select.select([fd], [], [], min(0.1, deadline - now))
            if not ready:
                if self.proc.poll() is not None:
                    raise WorkerDied(self._death())
                continue
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                self.proc.wait(timeout=5)
                raise WorkerDied(self._death())
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _read(self, deadline: float) -> dict:
        import json

        (size,) = HEADER.unpack(self._read_exact(HEADER.size, deadline))
        if size > self.max_reply:
            raise ProtocolError(f"worker reply of {size} bytes exceeds the {self.max_reply}-byte limit")
        try:
            msg = json.loads(self._read_exact(size, deadline))
        except ValueError as exc:
            raise ProtocolError(f"worker reply is not JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise ProtocolError(f"worker reply must be an object, got {type(msg).__name__}")
        return msg

    def _death(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "the sandbox process stopped answering"
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            return f"the sandbox process was killed by {name}"
        if code > 128 and code - 128 in signal.Signals._value2member_map_:  # bwrap reports its child's signal so
            return f"the sandbox process was killed by {signal.Signals(code - 128).name}"
        return f"the sandbox process exited with code {code}"

    def wait_ready(self, timeout: float) -> None:
        try:
            msg = self._read(time.monotonic() + timeout)
        except (WorkerDied, WorkerTimeout, ProtocolError) as exc:
            stderr = self._stderr_tail()
            self.kill()
            what = "did not start in time" if isinstance(exc, WorkerTimeout) else str(exc)
            raise SandboxStartError(f"sandbox worker {what}: {stderr or 'no stderr'}") from None
        if msg.get("op") != "ready":
            self.kill()
            raise SandboxStartError(str(msg.get("error") or f"unexpected start-up message {msg!r}"))
        self.info = msg

    def _stderr_tail(self) -> str:
        fd = self.proc.stderr.fileno()
        data = b""
        while select.select([fd], [], [], 0.2 if self.proc.poll() is not None else 0)[0] and len(data) < 65536:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace").strip()[-2000:]

    def request(self, msg: dict, deadline: float) -> dict:
        try:
            write_message(self.proc.stdin.fileno(), msg)
        except OSError:
            raise WorkerDied(self._death()) from None
        return self._read(deadline)

    def kill(self) -> None:
        """SIGKILL the jail (bwrap's --die-with-parent and the pid namespace take every descendant with it)."""
        if self.proc.poll() is None:
            try:
                if self.jail.kind == "none":
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    # Kill the namespace's init (bwrap's child) first: the kernel then kills every process in the
                    # namespace, and bwrap, still alive, reaps the init. Killing bwrap first would leave the init as
                    # a zombie for the host's pid 1 to reap at its own pace.
                    for pid in _namespace_pids(self.info.get("pidns", ""), parent=self.proc.pid):
                        os.kill(pid, signal.SIGKILL)
                    try:
                        self.proc.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("sandbox worker %d did not exit after SIGKILL", self.proc.pid)
        if self.jail.kind == "bwrap" and self.info.get("pidns"):
            self._wait_namespace_gone(self.info["pidns"], timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()
        if self.host_workdir:
            shutil.rmtree(self.host_workdir, ignore_errors=True)

    @staticmethod
    def _wait_namespace_gone(pidns: str, timeout: float) -> None:
        """The kernel tears a pid namespace down asynchronously after its init dies; return once it is empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _namespace_pids(pidns):
                return
            time.sleep(0.01)
        log.warning("processes of sandbox pid namespace %s still alive after %.0f s", pidns, timeout)


def _namespace_pids(pidns: str, parent: int | None = None) -> list[int]:
    """Host pids in pid namespace ``pidns`` (optionally only children of ``parent``)."""
    found = []
    if not pidns:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != pidns:
                continue
            if parent is not None:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) != parent:
                        continue
        except (OSError, ValueError, IndexError):
            continue
        found.append(int(entry))
    return found


def start_worker(jail: Jail) -> WorkerProcess:
    """A cold start: spawn the jail and wait for its heavy imports."""
    worker = WorkerProcess(jail)
    worker.wait_ready(jail.config.startup_timeout_s)
    return worker


def _image_size(path: str) -> tuple[int, int] | None:
    """Header-only read (no decode), so a decompression bomb costs nothing here."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - any unreadable input just disables crop clamping
        return None


def _unique_names(paths: Sequence[str]) -> list[str]:
    names: list[str] = []
    for i, p in enumerate(paths):
        name = os.path.basename(p) or f"image_{i}.png"
        name = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name).lstrip(".") or f"image_{i}.png"
        if name in names:
            name = f"{i}_{name}"
        names.append(name)
    return names


class SandboxSession:
    """One trajectory: blocks share a jailed interpreter (notebook state) until ``close()``."""

    def __init__(self, config: SandboxConfig, acquire) -> None:
        self.config = config
        self._acquire = acquire  # () -> WorkerProcess (warm from a pool, or cold)
        self._worker: WorkerProcess | None = None
        self.id = uuid.uuid4().hex[:8]
        self.blocks = 0
        self.restarts = 0
        self.closed = False

    def __enter__(self) -> SandboxSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def worker(self) -> WorkerProcess | None:
        return self._worker

    def close(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker = None
        self.closed = True

    def _drop_worker(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker = None
            self.restarts += 1

    def run(self, code: str, image_paths: Sequence[str] = (), out_dir: str | None = None) -> SandboxResult:
        """Run one block; ``images`` in the result are files written into ``out_dir`` (a temp dir if None)."""
        start = time.monotonic()
        try:
            result = self._run(code, list(image_paths), out_dir)
        except Exception as exc:  # noqa: BLE001 - the caller's rollout must survive anything
            log.exception("sandbox session %s failed", self.id)
            self._drop_worker()
            result = SandboxResult("error", error=f"sandbox failure: {exc}")
        result.duration_s = time.monotonic() - start
        return result

    def _run(self, code: str, image_paths: list[str], out_dir: str | None) -> SandboxResult:
        if self.closed:
            raise RuntimeError("this SandboxSession is closed")
        c = self.config
        files: dict[str, bytes] = {}
        names = _unique_names(image_paths)
        for path, name in zip(image_paths, names):
            try:
                size = os.path.getsize(path)
            except OSError as exc:
                return SandboxResult("error", error=f"input image {path} cannot be read: {exc.strerror}")
            if size > c.max_input_mb << 20:
                return SandboxResult("error", error=f"input image {path} is {size} bytes, over {c.max_input_mb} MB")
            with open(path, "rb") as fh:
                files[name] = fh.read()
        if self._worker is None:
            self._worker = self._acquire()
        worker = self._worker
        jail_dir = worker.workdir
        jail_paths = [os.path.join(jail_dir, n) for n in names]
        size = _image_size(image_paths[0]) if image_paths else None
        fixed, repairs = repair_code(code, jail_paths, image_paths, size, jail_dir)
        send = {n: base64.b64encode(b).decode() for n, b in files.items() if n not in worker.sent_files}
        req = {
            "op": "run",
            "code": fixed,
            "files": send,
            "image_path": jail_paths[0] if jail_paths else None,
            "image_paths": jail_paths,
            "timeout_s": c.timeout_s,
            "cpu_time_s": c.cpu_time_s,
        }
        self.blocks += 1
        try:
            reply = worker.request(req, time.monotonic() + c.timeout_s + c.kill_grace_s)
        except WorkerTimeout:
            self._drop_worker()
            return SandboxResult("timeout", error=f"timed out after {c.timeout_s:g} s ({RESTARTED})", repairs=repairs)
        except WorkerDied as exc:
            self._drop_worker()
            return SandboxResult("killed", error=f"{exc} ({RESTARTED})", repairs=repairs)
        except ProtocolError as exc:
            self._drop_worker()
            return SandboxResult("killed", error=f"sandbox protocol error: {exc} ({RESTARTED})", repairs=repairs)
        worker.sent_files.update(send)
        status = reply.get("status")
        if status not in ("ok", "error", "timeout", "killed"):
            self._drop_worker()
            return SandboxResult("killed", error=f"sandbox returned an invalid status ({RESTARTED})", repairs=repairs)
        stdout = str(reply.get("stdout", ""))[: c.max_stdout_chars + 200]
        images, notes = self._save_images(reply.get("images") or [], out_dir)
        if notes:
            stdout = (stdout + "\n" if stdout else "") + "\n".join(notes)
        error = str(reply.get("error", ""))[:2000]
        return SandboxResult(status, stdout, error, images, repairs, truncated=bool(reply.get("truncated")))

    def _save_images(self, items: list, out_dir: str | None) -> tuple[list[str], list[str]]:
        """Validate each returned image (format, pixels, aspect) from its header, then write it to ``out_dir``."""
        from PIL import Image

        c = self.config
        saved, notes = [], []
        for k, item in enumerate(items[: c.max_images]):
            name = str(item.get("name", "image")) if isinstance(item, dict) else "image"
            try:
                data = base64.b64decode(item["data"], validate=True)
                if len(data) > c.max_image_mb << 20:
                    raise ValueError(f"{len(data)} bytes is over {c.max_image_mb} MB")
                with Image.open(io.BytesIO(data)) as im:
                    fmt, (w, h) = im.format, im.size
                if fmt not in ALLOWED_FORMATS:
                    raise ValueError(f"format {fmt} is not an allowed image format")
                if w * h > c.max_output_pixels or w < 1 or h < 1:
                    raise ValueError(f"{w}x{h} pixels is over the {c.max_output_pixels}-pixel limit")
                if max(w, h) / min(w, h) > c.max_aspect_ratio:
                    raise ValueError(f"aspect ratio {max(w, h) / min(w, h):.0f} is over {c.max_aspect_ratio:g}")
            except Exception as exc:  # noqa: BLE001 - a bad output image is reported, not fatal
                notes.append(f"[sandbox: output image {name} rejected: {exc}]")
                continue
            if out_dir is None:
                out_dir = tempfile.mkdtemp(prefix="keye_sandbox_out_")
            os.makedirs(out_dir, exist_ok=True)
            ext = ".jpg" if fmt in ("JPEG", "MPO") else "." + fmt.lower()
            dest = os.path.join(out_dir, f"{self.id}_{self.blocks:02d}_{k}{ext}")
            with open(dest, "wb") as fh:
                fh.write(data)
            saved.append(dest)
        return saved, notes
