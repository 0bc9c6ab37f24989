"""A checkpoint that cannot be written (full disk) fails in one line and leaves no partial directory behind;
saves that died midway are removed before the next save, complete checkpoints never."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests import train_helpers as th
from train.checkpoint import COMPLETE, remove_incomplete

pytestmark = pytest.mark.slow


def test_only_incomplete_step_directories_are_removed(tmp_path):
    done, torn = tmp_path / "step_00000002", tmp_path / "step_00000004"
    for d in (done, torn):
        (d / "global_step").mkdir(parents=True)
    (done / COMPLETE).write_text("ok\n")
    (tmp_path / "notes").mkdir()
    assert remove_incomplete(tmp_path) == [torn]
    assert done.is_dir() and not torn.exists() and (tmp_path / "notes").is_dir()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from keye.cli.init import init_checkpoint

    root = tmp_path_factory.mktemp("diskfull")
    media = root / "media"
    media.mkdir()
    shards = th.write_shard_set(root, "d", th.make_records(media, 2, 0, 4), media)
    init_checkpoint(root / "init", config=str(th.write_nano_model(root / "nano.yaml")), seed=0)

    def config(out_dir: Path, **overrides) -> Path:
        cfg = th.run_config(out_dir, root / "nano.yaml", [str(shards)], **overrides)
        cfg["model"] = {"path": str(root / "init")}
        cfg["data"].update(max_seq_len=96, lookahead=1)
        cfg["max_steps"] = 4
        cfg["checkpoint"].update(every_steps=2, export_hf=True)
        return th.write_config(root / f"{out_dir.name}-{uuid.uuid4().hex[:6]}.yaml", cfg)

    return root, config


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MB filesystem (tmpfs): a nano checkpoint (optimizer states of a 10M-parameter model) does not fit."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_save_on_a_full_disk_fails_in_one_line_and_frees_its_space(setup, small_fs):
    _, config = setup
    out = small_fs / "run"
    free_before = shutil.disk_usage(small_fs).free
    code, log = th.finish(th.launch(config(out)), timeout=180)
    assert code != 0
    errors = [line for line in log.splitlines() if "keye train: error:" in line or "error: writing checkpoint" in line]
    assert errors, log[-3000:]
    line = errors[-1]
    assert f"writing checkpoint {out / 'checkpoints' / 'step_00000002'} failed" in line and "MB free" in line, line
    assert not list((out / "checkpoints").glob("step_*"))  # the partial save is gone
    assert shutil.disk_usage(small_fs).free > 0.9 * free_before  # … and so is what it took
    assert th.losses(out) and max(th.losses(out)) == 2  # it trained up to the save


def test_a_dead_save_is_cleared_before_the_next_one(setup, tmp_path):
    _, config = setup
    out = tmp_path / "run"
    stale = out / "checkpoints" / "step_00000001"
    (stale / "global_step1").mkdir(parents=True)
    (stale / "global_step1" / "half.pt").write_bytes(os.urandom(1 << 16))
    th.run(config(out), timeout=180)
    assert not stale.exists()
    assert sorted(d.name for d in (out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    assert all((d / COMPLETE).is_file() for d in (out / "checkpoints").glob("step_*"))
