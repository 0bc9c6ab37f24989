"""Shared helpers for the sandbox tests: a small config, and checks that nothing is left behind."""

from __future__ import annotations

import glob
import os
import tempfile

import pytest

from keye.sandbox import SandboxConfig
from keye.sandbox.jail import bwrap_problem

BWRAP_PROBLEM = bwrap_problem(os.geteuid() == 0)
needs_bwrap = pytest.mark.skipif(BWRAP_PROBLEM is not None, reason=f"no bubblewrap jail here: {BWRAP_PROBLEM}")


def small_config(**kw) -> SandboxConfig:
    base = dict(
        timeout_s=2.0,
        kill_grace_s=1.0,
        cpu_time_s=2.0,
        memory_mb=1024,
        max_processes=16,
        disk_mb=32,
        max_file_mb=8,
        max_stdout_chars=2000,
        pool_size=0,
        isolation="bwrap",
    )
    base.update(kw)
    return SandboxConfig(**base)


def pids_in_namespace(pidns: str) -> list[int]:
    """Host pids whose pid namespace is ``pidns`` (e.g. ``pid:[4026532250]``)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == pidns:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def host_temp_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "keye_sandbox_*")))


def assert_clean(pidns: str, bwrap_pid: int, temp_before: set[str]) -> None:
    assert pids_in_namespace(pidns) == [], f"processes left in {pidns}"
    assert not os.path.exists(f"/proc/{bwrap_pid}"), f"bwrap {bwrap_pid} still running"
    assert host_temp_dirs() <= temp_before, "sandbox temp dirs left behind"
