"""Hostile code blocks: each must end with a clear status, leave the machine unharmed and leave nothing behind."""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
import uuid
import zlib
from pathlib import Path

import pytest

import keye
from keye.sandbox import Sandbox
from tests.sandbox_helpers import assert_clean, host_temp_dirs, needs_bwrap, pids_in_namespace, small_config

pytestmark = needs_bwrap


def run_one(code: str, images=(), out_dir=None, check_session=None, **cfg):
    """Run one block in a fresh sandbox, then assert no process or temp dir survives it."""
    before = host_temp_dirs()
    with Sandbox(small_config(**cfg)) as sandbox, sandbox.session() as session:
        result = session.run("print('ready')", images, out_dir)
        assert result.status == "ok", result
        worker = session.worker
        pidns, bwrap_pid = worker.info["pidns"], worker.proc.pid
        result = session.run(code, images, out_dir)
        if check_session is not None:
            check_session(session, pidns)
    assert_clean(pidns, bwrap_pid, before)
    return result


def test_infinite_loop_times_out():
    start = time.monotonic()
    r = run_one("while True:\n    pass")
    assert r.status == "timeout" and r.error.startswith("timed out after 2 s")
    assert time.monotonic() - start < 10


def test_loop_ignoring_the_timeout_signals_is_killed():
    code = "import signal\nfor s in (signal.SIGALRM, signal.SIGXCPU):\n    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass"
    r = run_one(code)
    assert r.status == "timeout" and "restarted" in r.error


def test_fork_bomb_is_contained():
    r = run_one("while True:\n    os.fork()")
    assert r.status in ("error", "timeout"), r
    assert "process limit" in r.error or "timed out" in r.error


def test_allocating_50_gb_fails_cleanly():
    r = run_one("x = bytearray(50 * 1024**3)")
    assert r.status == "error" and r.error.startswith("memory limit exceeded"), r
    r = run_one("a = np.ones((50 * 1024**3,), dtype=np.uint8)")
    assert r.status == "error" and "memory limit exceeded" in r.error, r


def test_writing_10_gb_hits_file_and_disk_limits():
    big_file = "with open('big.bin', 'wb') as f:\n    for _ in range(10 * 1024):\n        f.write(b'\\0' * (1 << 20))"
    r = run_one(big_file)
    assert r.status == "error" and r.error.startswith("disk limit exceeded"), r
    many = (
        "for i in range(10 * 1024 // 8):\n    with open(f'f{i}.bin', 'wb') as f:\n        f.write(b'\\0' * (7 << 20))"
    )
    r = run_one(many)
    assert r.status == "error" and "No space left" in r.error, r


def test_secrets_home_project_and_environment_are_invisible(monkeypatch):
    monkeypatch.setenv("KEYE_SANDBOX_SECRET", "s3cr3t-value")
    home = Path.home()
    home_files = sorted(str(p) for p in home.iterdir() if p.is_file())[:5] if home.is_dir() else []
    project = Path(keye.__file__).resolve().parent
    targets = ["/etc/shadow", "/etc/passwd", str(project / "sandbox" / "executor.py"), str(project.parent / "setup.py")]
    targets += home_files + ["/proc/1/environ"]
    code = (
        f"for p in {targets!r}:\n"
        "    try:\n"
        "        data = open(p, 'rb').read()\n"
        "        print('READ', p, len(data), b's3cr3t' in data)\n"
        "    except Exception as e:\n"
        "        print('DENIED', p, type(e).__name__)\n"
        "print('ENV', sorted(os.environ))\n"
        f"print('HOME', sorted(os.listdir({str(home)!r})) if os.path.isdir({str(home)!r}) else None)\n"
    )
    r = run_one(code)
    assert r.status == "ok", r
    lines = r.stdout.splitlines()
    for line in lines[: len(targets)]:
        if line.startswith("READ"):  # only the jail's own /proc/1/environ may be read, and it holds no secret
            assert line.startswith("READ /proc/1/environ") and line.endswith("False"), line
        else:
            assert line.startswith("DENIED"), line
    assert "s3cr3t" not in r.stdout
    env_line = next(line for line in lines if line.startswith("ENV"))
    assert "KEYE_SANDBOX_SECRET" not in env_line and "PYTHONPATH" not in env_line
    home_line = next(line for line in lines if line.startswith("HOME"))
    python_home = os.path.realpath(sys.base_prefix).startswith(str(home) + os.sep)
    assert home_line in ("HOME None", "HOME ['.pyenv']" if python_home else "HOME []"), home_line


def test_writing_outside_the_work_dir_fails(tmp_path):
    marker = f"keye_escape_{uuid.uuid4().hex}"
    targets = [
        f"/tmp/{marker}",
        f"/{marker}",
        f"{sys.base_prefix}/{marker}",
        f"/usr/lib/{marker}",
        str(tmp_path / marker),
    ]
    code = (
        f"for p in {targets!r}:\n"
        "    try:\n"
        "        open(p, 'w').write('x'); print('WROTE', p)\n"
        "    except Exception as e:\n"
        "        print('DENIED', type(e).__name__)\n"
        "open('inside.txt', 'w').write('ok'); print('INSIDE ok')"
    )
    r = run_one(code)
    assert r.status == "ok" and "WROTE" not in r.stdout and "INSIDE ok" in r.stdout, r
    for p in targets:
        assert not os.path.exists(p), p


def test_no_network_to_a_local_listener():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        r = run_one(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert r.status == "error" and r.error.startswith("no network"), r
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_subprocess_and_shell_do_not_run():
    code = (
        "import subprocess\n"
        "print('system', os.system('echo pwned'))\n"
        "subprocess.run(['/bin/sh', '-c', 'echo pwned'], capture_output=True)"
    )
    r = run_one(code)
    assert r.status == "error" and "FileNotFoundError" in r.error, r
    assert "pwned" not in r.stdout


def test_killing_the_parent_does_not_escape():
    def check(session, pidns):
        again = session.run("print('still here')")
        assert again.status in ("ok", "killed")

    r = run_one("os.kill(os.getppid(), 9)\nprint('after kill')", check_session=check)
    assert r.status in ("ok", "error", "killed"), r
    assert os.getppid() > 1  # the test process and its parent are untouched


def test_daemon_does_not_outlive_the_session():
    code = (
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        import time\n"
        "        time.sleep(300)\n"
        "    os._exit(0)\n"
        "import time\n"
        "time.sleep(0.3)\n"
        "print('parent done')"
    )

    def check(session, pidns):
        assert len(pids_in_namespace(pidns)) >= 3  # bwrap's init, the worker, the daemon

    r = run_one(code, check_session=check)
    assert r.status == "ok" and "parent done" in r.stdout, r


def test_printing_1_gb_is_truncated():
    r = run_one("for _ in range(1024):\n    print('x' * (1 << 20))")
    assert r.status == "ok", r
    assert len(r.stdout) < 2000 + 200 and "output truncated" in r.stdout


def test_deep_recursion():
    r = run_one("def f(n):\n    return f(n + 1)\nf(0)")
    assert r.status == "error" and "RecursionError" in r.error, r
    r = run_one("import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\nf(0)")
    assert r.status in ("error", "killed", "timeout"), r  # 3.11 keeps Python frames off the C stack


def _png_bomb(path: Path, side: int = 100_000) -> None:
    """A few-KB PNG whose header claims side x side 8-bit grey pixels (10 G pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (side + 1) * 64, 9)
    ihdr = struct.pack("!IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_decompression_bomb_input(tmp_path):
    bomb = tmp_path / "bomb.png"
    _png_bomb(bomb)
    r = run_one("im = Image.open(image_path)\nim.load()", images=[str(bomb)], out_dir=str(tmp_path / "out"))
    assert r.status == "error" and "DecompressionBomb" in r.error, r
    r = run_one("Image.MAX_IMAGE_PIXELS = None\nim = Image.open(image_path)\nim.load()", images=[str(bomb)])
    assert r.status in ("error", "killed"), r
