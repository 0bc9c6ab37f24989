"""A run that can make no progress must say so, and a stop signal must end a run even while it waits for data:
every record rejected (the README's ``source: video_qa`` under ``data.check_modes``) fails within a bounded number
of records with the reason, in-process and from a dataloader worker; SIGTERM during the wait saves a checkpoint and
exits 143."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests import train_helpers as th
from train.checkpoint import complete_checkpoints

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from keye.cli.init import init_checkpoint

    root = tmp_path_factory.mktemp("noprog")
    media = root / "media"
    media.mkdir()
    records = th.make_records(media, 2, 0, 4)
    for r in records:
        r["source"] = "video_qa"  # a mixing name, not an SFT mode: check_modes rejects every record
    shards = th.write_shard_set(root, "qa", records, media)
    init_checkpoint(root / "init", config=str(th.write_nano_model(root / "nano.yaml")), seed=0)

    def config(name: str, **overrides) -> tuple[Path, Path]:
        out = root / f"{name}-{uuid.uuid4().hex[:6]}"
        cfg = th.run_config(out, root / "nano.yaml", [str(shards)], **overrides)
        cfg["model"] = {"path": str(root / "init")}
        cfg["data"].update(max_seq_len=96, check_modes=True)
        return th.write_config(root / f"{out.name}.yaml", cfg), out

    return config


@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_whose_every_record_is_rejected_fails_with_the_reason(setup, workers):
    cfg, _ = setup("rejected", **{"data.max_rejected_in_a_row": 300, "data.num_workers": workers})
    start = time.monotonic()
    code, out = th.finish(th.launch(cfg), timeout=120)
    assert code != 0 and time.monotonic() - start < 120
    (line,) = [ln for ln in out.splitlines() if "keye train: error:" in ln]
    assert "300 records in a row gave no usable sample (data.max_rejected_in_a_row)" in line, line
    assert "skipped_mode/unknown: no SFT mode" in line and "Traceback" not in line, line


def _finish_or_dump(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Like ``th.finish``, but a hang is reported with every thread's stack (``th.env`` turns faulthandler on)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            th.kill_tree(proc, signal.SIGKILL)
            out, _ = proc.communicate()
        raise AssertionError(f"no exit {timeout}s after SIGTERM; stacks:\n{out[-6000:]}") from None
    return proc.returncode, out


def test_sigterm_while_waiting_for_data_saves_and_exits_143(setup):
    cfg, out_dir = setup("term", **{"data.max_rejected_in_a_row": 0})  # never gives up: the wait is endless
    proc = th.launch(cfg)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out_dir / "metrics.jsonl").exists() and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(8.0)  # past set-up, well inside the endless wait for a usable record
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out = _finish_or_dump(proc, timeout=60)
    assert time.monotonic() - sent < 30
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM at step 0" in out and "rerun the same command to resume" in out
    assert [step for step, _ in complete_checkpoints(out_dir / "checkpoints")] == [0]
