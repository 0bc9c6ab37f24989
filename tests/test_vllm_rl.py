"""GSPO with vLLM rollouts (``rl.rollout.engine: vllm``), inside the vLLM environment (``make vllm-env``; ``make
test`` runs this file there, and it skips in an environment without vLLM).

The CPU learning test of tests/test_rl_learning.py passes with the rollouts sampled by vLLM (its weights pushed
from the trainer before every rollout, the engine/trainer log-prob drift logged each step), and ``keye train`` on
an RL config runs with vLLM rollouts in one process and under ZeRO-3 on two ranks (one engine per rank, on the
job's process group). head_dim is 32 throughout: vLLM's CPU attention has no smaller kernels.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("vllm", reason="the vLLM engine tests run in the vLLM environment (make vllm-env)")

from keye.generation import VLLMSettings  # noqa: E402
from keye.generation.vllm_engine import VLLMEngine  # noqa: E402
from keye.inference import ChatEngine  # noqa: E402
from keye.modeling import KeyeVLForConditionalGeneration  # noqa: E402
from keye.processing import KeyeVLProcessor  # noqa: E402
from tests.released_helpers import export  # noqa: E402
from tests.spine_fixtures import micro_config  # noqa: E402
from tests.test_rl_learning import _greedy_accuracy, _task, colour_task_gspo, format_only_sft  # noqa: E402
from tests.test_rl_run import _setup  # noqa: E402

DRIFT_ATOL = 1e-3  # fp32 engine and trainer on the same weights: measured 1e-6 to 1e-4 per token


@pytest.fixture
def one_thread():
    """As in tests/test_rl_learning.py: one OpenMP thread is steadier and faster on two shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_gspo_raises_accuracy_on_the_colour_task_with_vllm_rollouts(tmp_path, one_thread):
    torch.manual_seed(0)
    rng = random.Random(0)
    records = _task(tmp_path)
    processor = KeyeVLProcessor()
    model = KeyeVLForConditionalGeneration(micro_config(text={"head_dim": 32}))
    format_only_sft(model, processor, records, tmp_path, rng)

    # the engine is built once from the policy's export; every rollout first pushes the current weights into it
    settings = VLLMSettings(max_model_len=1024, limit_mm_per_prompt={"image": 1, "video": 0})
    engine = VLLMEngine.from_pretrained(export(model, tmp_path / "export", processor), settings=settings)
    trainer_view = ChatEngine(model, processor, "cpu")
    initial = _greedy_accuracy(trainer_view, records, tmp_path)
    step, opt_step = colour_task_gspo(model, engine, tmp_path, rollout_engine="vllm")
    curve, drift, sync = [], [], []
    try:
        for _ in range(12):
            rng.shuffle(records)
            stats = step.step(records, opt_step)
            curve.append(round(stats["reward/accuracy_reward/mean"], 3))
            drift.append(stats["engine_logprob_diff/mean"])
            sync.append(stats["time/weight_sync_s"])
            assert stats["update/first_minibatch_ratio_dev"] == 0.0
            assert stats["engine_logprob_diff/max"] < DRIFT_ATOL, stats  # the engine runs the trainer's weights
        final = _greedy_accuracy(trainer_view, records, tmp_path)
    finally:
        engine.close()
    print(f"greedy accuracy {initial:.3f} -> {final:.3f}; rollout accuracy per step {curve}")
    print(f"engine/trainer |Δ log-prob| per step {[f'{d:.1e}' for d in drift]}; weight push s {sync}")
    assert initial <= 0.625, "the SFT model should not already solve the task"
    assert final >= initial + 0.25, (initial, final, curve)
    assert all(s > 0 for s in sync)


def _vllm_run_config(root: Path, zero3: bool) -> tuple[Path, Path]:
    """tests/test_rl_run.py's two-step run (image prompts, hints, two minibatch updates, frozen ViT) with a
    head_dim-32 policy and vLLM rollouts."""
    config, out = _setup(root)
    torch.manual_seed(0)
    KeyeVLForConditionalGeneration(micro_config(text={"head_dim": 32})).save_pretrained(root / "init")
    KeyeVLProcessor().save_pretrained(root / "init")
    data = yaml.safe_load(config.read_text())
    data["rl"]["rollout"].update(engine="vllm", vllm={"limit_mm_per_prompt": {"image": 2, "video": 0}})
    data["checkpoint"]["every_steps"] = 10
    if zero3:
        data["distributed"] = {**data.get("distributed", {}), "zero_stage": 3}
    config.write_text(yaml.safe_dump(data))
    return config, out


def _run(cmd: list[str], timeout: float) -> None:
    from tests.train_helpers import env

    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _steps(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r and "event" not in r]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2], ids=["one_process", "zero3_two_ranks"])
def test_keye_train_rl_with_vllm_rollouts(tmp_path, nproc):
    """``python -m train CONFIG`` (one process) and ``torchrun`` with ZeRO-3 on two ranks: both finish, every step
    logs the weight push and an engine/trainer drift at fp32 noise, and the export moved."""
    from tests.train_helpers import free_port

    config, out = _vllm_run_config(tmp_path, zero3=nproc == 2)
    bin_dir = Path(sys.executable).parent
    if nproc == 1:
        cmd = [sys.executable, "-m", "train", str(config)]
    else:
        cmd = [str(bin_dir / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", str(free_port()), "-m", "train", str(config)]
    _run(cmd, timeout=600)
    rows = _steps(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rollouts"] == 4 and r["time/weight_sync_s"] > 0, r
        assert r["engine_logprob_diff/tokens"] > 0 and r["engine_logprob_diff/max"] < DRIFT_ATOL, r
    exported = KeyeVLForConditionalGeneration.from_pretrained(out / "hf").state_dict()
    initial = KeyeVLForConditionalGeneration.from_pretrained(tmp_path / "init").state_dict()
    assert any(not torch.equal(exported[k], initial[k]) for k in initial if k.startswith("model."))
