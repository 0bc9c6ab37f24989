"""The interpreter that runs model code inside the jail: one process per trajectory, state kept like a notebook.

This file is bind-mounted read-only into the jail and run with ``python -I -S``, so it imports only the standard
library at module level (the host package is not visible in there). The parent imports the framing helpers from
here too, so both ends share one implementation.

Start-up order matters for safety: resource limits first, then (when started as root) the permanent drop to an
unprivileged uid, then the heavy imports, and only then any model code. Control messages travel on duplicates
of stdin/stdout; fds 0-2 are pointed at /dev/null so that stray C-level output cannot corrupt the protocol.
"""

from __future__ import annotations

import base64
import codecs
import io
import json
import os
import resource
import signal
import struct
import sys
import time
import traceback

HEADER = struct.Struct("!I")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
NETWORK_ERRNOS = {101, 111, 113, 99, -2, -3, -5}  # ENETUNREACH, ECONNREFUSED, EHOSTUNREACH, EADDRNOTAVAIL, EAI_*
DISK_ERRNOS = {27, 28, 122}  # EFBIG, ENOSPC, EDQUOT


class ProtocolError(RuntimeError):
    """A control message was malformed, too large, or the other side went away."""


def write_message(fd: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    view = memoryview(HEADER.pack(len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise ProtocolError(f"control channel closed with {left} of {n} bytes outstanding")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_message(fd: int, max_bytes: int) -> dict:
    (size,) = HEADER.unpack(_read_exact(fd, HEADER.size))
    if size > max_bytes:
        raise ProtocolError(f"control message of {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        msg = json.loads(_read_exact(fd, size))
    except ValueError as exc:
        raise ProtocolError(f"control message is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"control message must be an object, got {type(msg).__name__}")
    return msg


class _Timeout(BaseException):
    """Raised by SIGALRM; a BaseException so that ``except Exception`` in model code cannot swallow it."""


class _CpuLimit(BaseException):
    """Raised by SIGXCPU when a block uses up its CPU seconds."""


class _BytesToText(io.RawIOBase):
    """``sys.stdout.buffer`` of the sandbox: bytes are decoded as UTF-8 (bad bytes become U+FFFD) into the text sink."""

    def __init__(self, text: BoundedWriter) -> None:
        self.text = text
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = bytes(b)
        self.text.write(self.decoder.decode(data))
        return len(data)

    def finish(self) -> None:
        """End of the block: bytes of an unfinished UTF-8 sequence become U+FFFD (``flush`` keeps them pending)."""
        self.text.write(self.decoder.decode(b"", final=True))


class BoundedWriter(io.TextIOBase):
    """A text sink keeping the first ``limit`` characters and counting the rest, so a 1 GB print costs nothing.

    Like a real ``sys.stdout`` it has a binary ``buffer`` (code that writes bytes works).
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.parts, self.kept, self.dropped = limit, [], 0, 0
        self.buffer = _BytesToText(self)

    @property
    def encoding(self) -> str:
        return "utf-8"

    @property
    def errors(self) -> str:
        return "replace"

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self.limit - self.kept
        if room > 0:
            self.parts.append(s[:room])
            self.kept += min(room, len(s))
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    def getvalue(self) -> str:
        self.buffer.finish()
        text = "".join(self.parts)
        if self.dropped:
            text += f"\n[... output truncated: {self.dropped} more characters]"
        return text


def _set_limits(cfg: dict) -> None:
    mb = 1 << 20
    limits = [
        (resource.RLIMIT_AS, cfg["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, cfg["max_file_mb"] * mb),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_CPU, int(cfg["session_cpu_s"]) + 1),
    ]
    if cfg["drop_privileges"] or cfg["enforce_nproc"]:
        limits.append((resource.RLIMIT_NPROC, cfg["max_processes"]))
    for which, value in limits:
        resource.setrlimit(which, (value, value))


def _drop_privileges(cfg: dict) -> None:
    """Started as root inside the jail: become an unprivileged uid for good, so RLIMIT_NPROC applies."""
    import ctypes

    workdir, uid, gid = cfg["workdir"], cfg["uid"], cfg["gid"]
    os.chmod(workdir, 0o700)  # while root still owns it (no CAP_FOWNER in the jail)
    os.chown(workdir, uid, gid)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.geteuid() == 0 or os.getuid() == 0:
        raise RuntimeError("still root after dropping privileges")


def _preload(cfg: dict) -> dict:
    """The names Thyme's executor pre-binds; cv2 only when installed."""
    import json as json_mod
    import math
    import random
    import re
    import string

    ns: dict = {"__name__": "__main__", "__builtins__": __builtins__}
    ns.update(os=os, math=math, re=re, json=json_mod, random=random, string=string, time=time, io=io)
    ns["temp_output_dir"] = cfg["workdir"]
    ns["output_dir"] = cfg["workdir"]
    try:
        import numpy

        ns.update(np=numpy, numpy=numpy)
    except ImportError:
        pass
    try:
        from PIL import Image

        ns["Image"] = Image
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(1)
        ns["cv2"] = cv2
    except ImportError:
        pass
    return ns


def _snapshot(root: str) -> dict[str, tuple[int, int]]:
    seen: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTS):
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                seen[path] = (st.st_mtime_ns, st.st_size)
    return seen


def _inside(path: str, root: str) -> bool:
    real = os.path.realpath(path)
    return real.startswith(os.path.realpath(root) + os.sep)


def _harvest(ns: dict, stdout: str, before: dict, cfg: dict) -> list[str]:
    """Thyme's order: ``processed_path``, then work-dir image paths printed, then new or changed images."""
    root = cfg["workdir"]
    after = _snapshot(root)
    picked: list[str] = []
    processed = ns.get("processed_path")
    candidates = processed if isinstance(processed, (list, tuple)) else [processed]
    for p in candidates:
        if isinstance(p, str) and os.path.isfile(p) and _inside(p, root):
            picked.append(os.path.realpath(p))
    inputs = {os.path.realpath(p) for p in ns.get("image_paths") or []}
    if not picked:  # printed paths, except inputs the block did not change (``print(image_path)`` is common)
        for token in stdout.replace("'", " ").replace('"', " ").replace(",", " ").split():
            if token.lower().endswith(IMAGE_EXTS) and os.path.isfile(token) and _inside(token, root):
                real = os.path.realpath(token)
                if real not in inputs or before.get(real) != after.get(real):
                    picked.append(real)
    if not picked:
        picked = sorted((p for p, sig in after.items() if before.get(p) != sig), key=lambda p: after[p][0])
    unique: list[str] = []
    for p in picked:
        if p not in unique:
            unique.append(p)
    return unique[: cfg["max_images"]]


def _describe(exc: BaseException, cfg: dict) -> str:
    """One line for the model: the exception's last line, with a hint when a sandbox limit caused it."""
    last = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]
    tb = traceback.extract_tb(exc.__traceback__)
    user_lines = [fr.lineno for fr in tb if fr.filename == "<code>"]
    where = f" (line {user_lines[-1]})" if user_lines else ""
    if isinstance(exc, SyntaxError) and exc.lineno:
        where = f" (line {exc.lineno})"
    if isinstance(exc, MemoryError):
        return f"memory limit exceeded ({cfg['memory_mb']} MB): {last}{where}"
    errno = getattr(exc, "errno", None)
    mod = type(exc).__module__
    if isinstance(exc, OSError) and (errno in NETWORK_ERRNOS or mod == "socket"):
        return f"no network (the sandbox is offline): {last}{where}"
    if isinstance(exc, OSError) and errno in DISK_ERRNOS:
        return f"disk limit exceeded ({cfg['disk_mb']} MB in the work dir, {cfg['max_file_mb']} MB per file): {last}"
    if isinstance(exc, BlockingIOError) and errno == 11:
        return f"process limit reached ({cfg['max_processes']}): {last}{where}"
    return f"{last}{where}"


def _on_alarm(signum, frame):
    raise _Timeout()


def _on_xcpu(signum, frame):
    raise _CpuLimit()


def run_block(req: dict, ns: dict, cfg: dict, main_pid: int) -> dict:
    root = cfg["workdir"]
    for name, b64 in req.get("files", {}).items():
        path = os.path.join(root, os.path.basename(name))
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(b64))
    ns.pop("processed_path", None)
    ns["image_path"] = req.get("image_path")
    ns["image_paths"] = list(req.get("image_paths", []))
    before = _snapshot(root)
    out = BoundedWriter(cfg["max_stdout_chars"])
    err_sink = BoundedWriter(4096)
    timeout, cpu = float(req["timeout_s"]), float(req["cpu_time_s"])
    status, error = "ok", ""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err_sink
    used = resource.getrusage(resource.RUSAGE_SELF)
    soft_cpu = int(used.ru_utime + used.ru_stime + cpu) + 1
    hard_cpu = resource.getrlimit(resource.RLIMIT_CPU)[1]
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (min(soft_cpu, hard_cpu), hard_cpu))
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            exec(compile(req["code"], "<code>", "exec"), ns)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if os.getpid() != main_pid:  # a fork of the worker made by model code must never answer
                os._exit(0)
    except _Timeout:
        status, error = "timeout", f"timed out after {timeout:g} s"
    except _CpuLimit:
        status, error = "timeout", f"CPU time limit exceeded ({cpu:g} s)"
    except SystemExit as exc:
        status, error = "error", f"SystemExit: {exc.code}"
    except BaseException as exc:  # noqa: BLE001 - model code may raise anything; it becomes the error text
        if os.getpid() != main_pid:
            os._exit(0)
        status, error = "error", _describe(exc, cfg)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout, sys.stderr = saved
        resource.setrlimit(resource.RLIMIT_CPU, (hard_cpu, hard_cpu))
    stdout = out.getvalue()
    images = []
    for path in _harvest(ns, stdout, before, cfg):
        try:
            size = os.path.getsize(path)
            if size > cfg["max_image_bytes"]:
                error = error or f"output image {os.path.basename(path)} is {size} bytes, over the limit"
                continue
            with open(path, "rb") as fh:
                images.append({"name": os.path.basename(path), "data": base64.b64encode(fh.read()).decode()})
        except OSError:
            continue
    return {
        "op": "result",
        "status": status,
        "stdout": stdout,
        "error": error,
        "images": images,
        "truncated": out.truncated,
    }


def main() -> int:
    cfg = json.loads(sys.argv[1])
    ctl_in, ctl_out = os.dup(0), os.dup(1)
    try:
        _set_limits(cfg)
        if cfg["drop_privileges"]:
            _drop_privileges(cfg)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past RLIMIT_FSIZE fail with EFBIG instead of killing
        sys.path[:0] = [p for p in cfg["site_dirs"] if p not in sys.path]
        os.makedirs(os.path.join(cfg["workdir"], ".tmp"), exist_ok=True)
        os.chdir(cfg["workdir"])
        start = time.monotonic()
        ns = _preload(cfg)
        import_s = time.monotonic() - start
        try:
            pidns = os.readlink("/proc/self/ns/pid")
        except OSError:
            pidns = ""
    except BaseException as exc:  # noqa: BLE001 - report start-up failures to the parent, then quit
        where = traceback.extract_tb(exc.__traceback__)[-1]
        msg = f"sandbox worker failed to start: {exc!r} at {where.name}:{where.lineno}"
        write_message(ctl_out, {"op": "failed", "error": msg})
        return 1
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGXCPU, _on_xcpu)
    main_pid = os.getpid()
    write_message(ctl_out, {"op": "ready", "pid": main_pid, "uid": os.getuid(), "pidns": pidns, "import_s": import_s})
    while True:
        try:
            req = read_message(ctl_in, cfg["max_request_bytes"])
        except (ProtocolError, OSError):
            return 0
        if req.get("op") != "run":
            write_message(ctl_out, {"op": "result", "status": "error", "stdout": "", "error": "bad request"})
            continue
        write_message(ctl_out, run_block(req, ns, cfg, main_pid))


if __name__ == "__main__":
    sys.exit(main())
