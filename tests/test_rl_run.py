"""``keye train`` on an RL config end to end, in process on CPU (gloo, world of one): rollouts on image prompts,
DeepSpeed minibatch updates, metrics, checkpoint, HF export, and a resume that redoes no step, brings back the
sampler's seed counter and the hint levels, and ends where an uninterrupted ZeRO-3 run (rollouts on the gathered
replica) ends."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from data_pipelines.sample_data import make_sample_data
from keye.cli.main import main as keye_main
from keye.modeling import KeyeVLForConditionalGeneration
from keye.processing import KeyeVLProcessor
from tests.spine_fixtures import micro_config
from train.rl.run import step_prompt_indices


@pytest.fixture
def one_thread(fresh_process_group):
    """Two OpenMP threads on two shared cores spin-wait; one thread is steadier and faster here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def text_length_reward(completion: str, record) -> float:
    """Varies between random rollouts (the micro model never answers right), so groups carry a gradient."""
    return float(len(completion))


def _setup(root: Path) -> tuple[Path, Path]:
    make_sample_data(root / "sample", n_images=4)
    torch.manual_seed(0)
    KeyeVLForConditionalGeneration(micro_config()).save_pretrained(root / "init")
    KeyeVLProcessor().save_pretrained(root / "init")
    # The tiny run config with sizes for a test: 2 prompts x G=2 rollouts of 3 tokens, 2 minibatch updates.
    cfg = yaml.safe_load(Path("configs/rl/tiny.yaml").read_text())
    cfg.update(output_dir=str(root / "run"), model={"path": str(root / "init")}, max_steps=2, freeze=["vit"])
    cfg["checkpoint"] = {"every_steps": 1, "keep_last": 2}
    cfg["wandb"] = {"mode": "none"}
    cfg["logging"] = {"every_steps": 1, "progress": False}
    rl = cfg["rl"]
    rl["prompts"] = [str(root / "sample" / "rl.jsonl")]
    rl["prompts_per_step"] = 2
    rl["rollout"].update(group_size=2, max_new_tokens=3, media_root=str(root / "sample" / "media"))
    rl["rollout"]["batch_size"] = 8
    rl["hints"].update(k=2, max_level=2)
    rl["update"].update(minibatches=2, micro_batch_tokens=512)
    rl["reward"] = {"terms": [{"fn": "accuracy_reward"}, {"fn": "tests.test_rl_run:text_length_reward", "weight": 0.1}]}
    path = root / "rl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, root / "run"


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rl_run_logs_checkpoints_exports_and_resumes(tmp_path, one_thread):
    config, out = _setup(tmp_path)
    # Run 1 stops after one step (checkpoint every step).
    assert keye_main(["train", str(config), "max_steps=1"]) == 0
    first = [r for r in _lines(out) if "step" in r and "event" not in r]
    assert [r["step"] for r in first] == [1]
    row = first[0]
    for key in ("reward/mean", "pass_rate", "response_length/mean", "update/pg_loss", "update/clip_frac", "lr"):
        assert key in row, key
    assert row["rollouts"] == 4 and row["prompts"] == 2 and row["update/minibatches"] == 2
    assert row["update/first_minibatch_ratio_dev"] < 1e-4  # the first minibatch is on-policy
    assert row["zero_adv_group_frac"] < 1 and row["update/grad_norm"] > 0
    state = torch.load(out / "checkpoints" / "step_00000001" / "train_state" / "rank_00000.pt", weights_only=False)
    saved = state["rl"]
    assert state["step"] == 1 and saved["steps"] == 1 and saved["sampler_calls"] >= 1

    # Run 2: the same command with max_steps=2 continues at step 2 from the restored RL state.
    assert keye_main(["train", str(config)]) == 0
    lines = _lines(out)
    resumed = next(r for r in lines if r.get("event") == "resumed")
    assert resumed["step"] == 1 and resumed["rl_steps"] == 1
    assert resumed["sampler_calls"] == saved["sampler_calls"]
    assert resumed["hint_levels"] == len(saved["hints"]["levels"])
    steps = [r["step"] for r in lines if "step" in r and "event" not in r]
    assert steps == [1, 2]  # no step redone
    assert lines[-1]["event"] == "finished" and lines[-1]["step"] == 2
    final = torch.load(out / "checkpoints" / "step_00000002" / "train_state" / "rank_00000.pt", weights_only=False)
    assert final["rl"]["steps"] == 2 and final["rl"]["sampler_calls"] > saved["sampler_calls"]

    # An uninterrupted 2-step run under ZeRO-3 takes the same steps: same rollouts, losses and final weights.
    ref = tmp_path / "ref"
    args = [f"output_dir={ref}", "distributed.zero_stage=3", "checkpoint.every_steps=10", "checkpoint.export_hf=false"]
    assert keye_main(["train", str(config), *args]) == 0
    ref_rows = {r["step"]: r for r in _lines(ref) if "step" in r and "event" not in r}
    got = {r["step"]: r for r in lines if "step" in r and "event" not in r}
    for key in ("reward/mean", "rollouts", "tokens/generated"):
        assert ref_rows[2][key] == got[2][key], key
    assert ref_rows[2]["update/pg_loss"] == pytest.approx(got[2]["update/pg_loss"], abs=1e-5)
    assert ref_rows[2]["sampler_calls"] == got[2]["sampler_calls"]

    # The export loads; the frozen ViT is unchanged, the LLM moved, and both runs end on the same weights.
    exported = KeyeVLForConditionalGeneration.from_pretrained(out / "hf")
    initial = KeyeVLForConditionalGeneration.from_pretrained(tmp_path / "init")
    KeyeVLProcessor.from_pretrained(out / "hf")
    new, old = exported.state_dict(), initial.state_dict()
    assert all(torch.equal(new[k], old[k]) for k in old if k.startswith("visual."))
    assert any(not torch.equal(new[k], old[k]) for k in old if k.startswith("model."))
    ref_state = KeyeVLForConditionalGeneration.from_pretrained(ref / "hf").state_dict()
    assert all(torch.allclose(ref_state[k], new[k], atol=1e-5) for k in new)


def test_prompt_shares_are_disjoint_and_cover_each_epoch():
    world, per_step, n = 4, 8, 16
    seen = [
        i for step in range(2) for rank in range(world) for i in step_prompt_indices(n, step, per_step, 3, rank, world)
    ]
    assert sorted(seen) == list(range(n))  # two steps of 8 = one epoch of 16, each record once
    with pytest.raises(ValueError, match="divisible"):
        step_prompt_indices(n, 0, 6, 0, 0, 4)


@pytest.mark.slow
def test_two_rank_zero3_rl_run(tmp_path):
    """Two processes under ZeRO-3: ranks generate different numbers of tokens on their own prompts, pad their
    updates to equal work and refresh their rollout replicas from the partitions; the run must finish (a
    divergence in collective calls hangs it), count both ranks' rollouts, and move the LLM but not the frozen ViT."""
    from tests import train_helpers as th

    config, out = _setup(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["distributed"] = {**data.get("distributed", {}), "zero_stage": 3}
    data["checkpoint"]["every_steps"] = 10
    config.write_text(yaml.safe_dump(data))
    th.run(config, nproc=2, timeout=240)
    rows = [r for r in _lines(out) if "step" in r and "event" not in r]
    assert [r["step"] for r in rows] == [1, 2]
    # prompts_per_step is global: one prompt per rank, G=2 rollouts each, summed over ranks in the log
    assert all(r["prompts"] == 2 and r["rollouts"] == 2 * 2 for r in rows), rows
    assert all(math.isfinite(r["update/grad_norm"]) and r["update/grad_norm"] > 0 for r in rows)
    exported = KeyeVLForConditionalGeneration.from_pretrained(out / "hf").state_dict()
    initial = KeyeVLForConditionalGeneration.from_pretrained(tmp_path / "init").state_dict()
    assert all(torch.equal(exported[k], initial[k]) for k in initial if k.startswith("visual."))
    assert any(not torch.equal(exported[k], initial[k]) for k in initial if k.startswith("model."))
