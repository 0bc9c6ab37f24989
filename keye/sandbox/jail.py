"""How a worker is started: the bubblewrap command line (namespaces, read-only binds, size-limited tmpfs).

Two modes. ``bwrap``: new pid/net/ipc/uts (and user, when not root) namespaces, an empty root holding only the
Python install, the site-packages it imports from and the system libraries, all read-only, plus a tmpfs work
dir of ``disk_mb``. As root, bwrap runs privileged and the worker drops to ``uid`` itself (keeping a real,
non-root kernel uid so RLIMIT_NPROC is enforced); otherwise bwrap maps the caller into a user namespace.
``none``: rlimits, a fresh directory and a minimal environment only; refused unless ``allow_unisolated``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass

from keye.sandbox.config import SandboxConfig

WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
JAIL_WORKER_PATH = "/opt/keye_sandbox/worker.py"
PRELOADED = ("numpy", "PIL", "cv2")


class SandboxUnavailable(RuntimeError):
    """No isolation mechanism works here and the config does not allow running without one."""


def python_paths() -> tuple[str, list[str]]:
    """The real interpreter and the directories holding the stdlib and the packages the worker pre-imports."""
    exe = os.path.realpath(sys.executable)
    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for name in PRELOADED:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            dirs.add(os.path.dirname(os.path.dirname(spec.origin)))
    return exe, sorted(os.path.realpath(d) for d in dirs if os.path.isdir(d))


@functools.lru_cache(maxsize=4)
def bwrap_problem(as_root: bool) -> str | None:
    """``None`` when bubblewrap can build a jail on this machine, else the reason it cannot."""
    exe = shutil.which("bwrap")
    if exe is None:
        return "bubblewrap (bwrap) is not installed; run tools/install_system_deps.sh or apt-get install bubblewrap"
    argv = [exe, "--unshare-pid", "--unshare-net", "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc"]
    if not as_root:
        argv += ["--unshare-user"]
    try:
        proc = subprocess.run([*argv, "true"], capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap could not be started: {exc}"
    if proc.returncode != 0:
        return f"bwrap cannot create namespaces here: {proc.stderr.decode(errors='replace').strip()}"
    return None


@dataclass
class Jail:
    """A recipe for starting one worker; ``kind`` is ``bwrap`` or ``none``."""

    config: SandboxConfig
    kind: str

    @classmethod
    def create(cls, config: SandboxConfig) -> Jail:
        if config.isolation not in ("auto", "bwrap", "none"):
            raise ValueError(f"SandboxConfig.isolation must be auto, bwrap or none, got {config.isolation!r}")
        if config.isolation in ("auto", "bwrap"):
            problem = bwrap_problem(os.geteuid() == 0)
            if problem is None:
                return cls(config, "bwrap")
            if config.isolation == "bwrap" or not config.allow_unisolated:
                raise SandboxUnavailable(
                    f"refusing to run model code without isolation: {problem} "
                    "(set allow_unisolated: true to run with resource limits only)"
                )
        elif not config.allow_unisolated:
            raise SandboxUnavailable("isolation 'none' requires allow_unisolated: true")
        return cls(config, "none")

    def env(self, workdir: str) -> dict[str, str]:
        """A minimal environment: nothing of the parent's leaks in (tokens, paths, proxies)."""
        tmp = os.path.join(workdir, ".tmp")
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": tmp, "MPLCONFIGDIR": tmp, "LANG": "C.UTF-8"}
        env.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
        return env

    def worker_config(self, workdir: str, site_dirs: list[str]) -> dict:
        c = self.config
        root = self.kind == "bwrap" and os.geteuid() == 0
        return {
            "workdir": workdir,
            "uid": c.uid,
            "gid": c.gid,
            "drop_privileges": root,
            "enforce_nproc": self.kind == "bwrap",
            "memory_mb": c.memory_mb,
            "max_file_mb": c.max_file_mb,
            "disk_mb": c.disk_mb,
            "max_processes": c.max_processes,
            "session_cpu_s": c.session_cpu_s,
            "max_stdout_chars": c.max_stdout_chars,
            "max_images": c.max_images,
            "max_image_bytes": c.max_image_mb << 20,
            "max_request_bytes": (c.max_input_mb << 20) * 2 + (8 << 20),
            "site_dirs": site_dirs,
        }

    def command(self) -> tuple[list[str], str, str | None]:
        """``(argv, cwd, host_workdir)``; ``host_workdir`` is a directory the caller must remove (mode none)."""
        exe, site_dirs = python_paths()
        if self.kind == "none":
            host_workdir = tempfile.mkdtemp(prefix="keye_sandbox_")
            cfg = self.worker_config(host_workdir, site_dirs)
            return [exe, "-I", "-S", WORKER_PATH, _json(cfg)], host_workdir, host_workdir
        c = self.config
        workdir = c.workdir
        binds = [sys.base_prefix, os.path.dirname(os.path.dirname(exe)), *site_dirs]
        for path in binds:
            if path == workdir or path.startswith(workdir.rstrip("/") + "/"):
                raise ValueError(f"SandboxConfig.workdir {workdir!r} overlaps a read-only bind {path!r}")
        argv = [shutil.which("bwrap") or "bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
        argv += ["--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox"]
        if os.geteuid() == 0:
            argv += ["--cap-drop", "ALL"]
            argv += [x for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN") for x in ("--cap-add", cap)]
        else:
            argv += ["--unshare-user", "--uid", str(c.uid), "--gid", str(c.gid), "--cap-drop", "ALL"]
        sysdirs = [d for d in ("/usr/lib", "/usr/lib64", "/usr/lib32") if os.path.isdir(d)]
        made: set[str] = set()
        for target in [*sysdirs, *binds, workdir, JAIL_WORKER_PATH]:
            parent = os.path.dirname(target.rstrip("/"))
            chain = []
            while parent not in ("/", "") and parent not in made:
                chain.append(parent)
                made.add(parent)
                parent = os.path.dirname(parent)
            for d in reversed(chain):  # bwrap would create missing parents 0700, unreadable after the uid drop
                argv += ["--perms", "0755", "--dir", d]
        for sysdir in sysdirs:
            argv += ["--ro-bind", sysdir, sysdir]
        for link in ("/lib", "/lib64", "/lib32"):
            if os.path.islink(link):
                argv += ["--symlink", os.readlink(link), link]
            elif os.path.isdir(link):
                argv += ["--ro-bind", link, link]
        argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        for path in dict.fromkeys(binds):
            argv += ["--ro-bind", path, path]
        argv += ["--ro-bind", WORKER_PATH, JAIL_WORKER_PATH, "--proc", "/proc", "--dev", "/dev"]
        argv += ["--perms", "0777", "--size", str(c.disk_mb << 20), "--tmpfs", workdir, "--chdir", workdir]
        cfg = self.worker_config(workdir, site_dirs)
        argv += [exe, "-I", "-S", JAIL_WORKER_PATH, _json(cfg)]
        return argv, "/", None


def _json(obj: dict) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))
