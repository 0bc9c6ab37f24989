"""A build killed mid-way must not leave the next run hanging on torch's extension ``lock`` file."""

import fcntl
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keye.compat import torch_build_lock_is_file
from tests.train_helpers import REPO, env, finish, kill_tree
from train.extension_locks import GUARD_NAME, build_lock_guard, remove_stale_build_locks

# Holds an OS lock on argv[1] (as torch >= 2.14 does while building), or the Keye guard shared (as a Keye process
# does while it may be building), until killed.
_HOLDER = """
import fcntl, sys, time
fh = open(sys.argv[1], "a")
fcntl.flock(fh, fcntl.LOCK_SH if sys.argv[2] == "shared" else fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


def _hold(path: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _fake_build(root: Path, name: str) -> Path:
    build = root / name
    build.mkdir(parents=True)
    (build / "shm.o").write_bytes(b"half an object file")
    lock = build / "lock"
    lock.touch()
    return lock


def test_lock_left_by_a_dead_build_is_removed_with_its_outputs(tmp_path):
    lock = _fake_build(tmp_path, "deepspeed_shm_comm")
    nested = _fake_build(tmp_path / "py311_cpu", "cpu_adam")  # torch's default layout: <root>/<pyXY_accel>/<op>
    assert remove_stale_build_locks(tmp_path) == sorted([lock, nested])
    assert not lock.parent.exists() and not nested.parent.exists()


def test_lock_held_by_a_live_build_is_kept(tmp_path):
    lock = _fake_build(tmp_path, "deepspeed_shm_comm")
    holder = _hold(lock, "exclusive")
    try:
        assert remove_stale_build_locks(tmp_path) == []
        assert lock.exists() and (lock.parent / "shm.o").exists()
    finally:
        holder.kill()
        holder.wait()
    assert remove_stale_build_locks(tmp_path) == [lock]


@pytest.mark.skipif(not torch_build_lock_is_file(), reason="this torch holds an OS lock while building")
def test_guard_leaves_locks_alone_while_another_keye_process_may_be_building(tmp_path):
    lock = _fake_build(tmp_path, "deepspeed_shm_comm")
    holder = _hold(tmp_path / GUARD_NAME, "shared")
    try:
        with build_lock_guard(tmp_path) as removed:
            assert removed == [] and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    with build_lock_guard(tmp_path) as removed:
        assert removed == [lock]


def test_guard_is_held_shared_while_its_block_runs(tmp_path):
    with build_lock_guard(tmp_path), open(tmp_path / GUARD_NAME) as fh:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)  # other Keye processes may start building beside it
    with open(tmp_path / GUARD_NAME) as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


_START_GROUP = "from train.engine import init_distributed; init_distributed(); print('process group up', flush=True)"


def _start_group(run_env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _START_GROUP],
        cwd=REPO,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_run_after_a_run_killed_during_the_deepspeed_op_build_proceeds(tmp_path):
    """The real thing: SIGKILL a process while DeepSpeed JIT-builds its CPU allreduce op, then start another."""
    run_env = {**env(), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    first = _start_group(run_env)
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists(), f"the build never started: {first.communicate()[0][-2000:]}"
    time.sleep(1.0)  # mid-compile
    kill_tree(first, signal.SIGKILL)
    first.wait()
    assert lock.exists() and not (lock.parent / "deepspeed_shm_comm.so").exists()

    second = _start_group(run_env)
    code, out = finish(second, timeout=240)
    assert code == 0 and "process group up" in out, out[-3000:]
    assert (lock.parent / "deepspeed_shm_comm.so").exists()
    if torch_build_lock_is_file():
        assert f"removed a torch extension build left unfinished by a killed run: {lock.parent}" in out
