"""Trainer under ZeRO-3 on CPU (gloo), parameters partitioned down to the smallest (persistence threshold 0):
one rank only ever sees text while the other sees images and videos in the same row (the ViT runs a different
number of times unless the trainer aligns it), SIGTERM checkpoints and the restart reproduces the run, single-rank
resume is bit-identical, and non-finite steps are skipped then abort the run."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from tests import train_helpers as th

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from keye.cli.init import init_checkpoint

    root = tmp_path_factory.mktemp("z3")
    media = root / "media"
    media.mkdir()
    visual = th.write_shard_set(root, "visual", th.make_records(media, 2, 1, 0, n_frames=1), media)
    text = th.write_shard_set(root, "text", th.make_records(media, 0, 0, 4, seed=1), media)
    init_checkpoint(root / "init", config=str(th.write_nano_model(root / "nano.yaml")), seed=0)
    ds = json.loads((th.REPO / "configs/deepspeed/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "zero3.json").write_text(json.dumps(ds))

    def config(name: str, **overrides) -> Path:
        # no shuffling, shards in this order: rank 0 reads the visual shard, rank 1 the text shard
        cfg = th.run_config(
            root / name,
            root / "nano.yaml",
            [str(visual / "visual-000000.tar"), str(text / "text-000000.tar")],
            **overrides,
        )
        cfg["model"] = {"path": str(root / "init")}
        cfg["data"].update(max_seq_len=160, shuffle=False)  # an image row, a video row, …
        cfg["max_steps"] = STEPS
        cfg["optim"]["lr"] = 1e-2
        cfg["distributed"]["deepspeed_config"] = str(root / "zero3.json")
        return th.write_config(root / f"{name}.yaml", cfg)

    return root, config


@pytest.fixture(scope="module")
def ref_ws2(setup):
    root, config = setup
    th.run(config("ws2"), nproc=2, timeout=150)
    return root / "ws2"


def test_text_only_rank_trains_alongside_a_visual_rank(ref_ws2):
    losses = th.losses(ref_ws2)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1], losses
    state = th.hf_state(ref_ws2 / "hf")
    assert state["visual.vision_model.embeddings.patch_embedding.weight"].shape[0] == 32  # gathered, not a shard


def test_sigterm_checkpoints_and_the_restart_reproduces_the_run(setup, ref_ws2):
    root, config = setup
    cfg = config("term", **{"checkpoint.every_steps": 1000})  # the only checkpoint is the one SIGTERM writes
    proc = th.launch(cfg, nproc=2)
    deadline = time.time() + 150
    while time.time() < deadline and not th.losses(root / "term"):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    th.kill_tree(proc, signal.SIGTERM)
    th.finish(proc, timeout=120)
    saved = [r["step"] for r in th.metrics(root / "term") if r.get("event") == "checkpoint"]
    assert saved and saved[-1] < STEPS, th.metrics(root / "term")
    th.run(cfg, nproc=2, timeout=150)
    assert th.losses(root / "term") == th.losses(ref_ws2)
    a, b = th.hf_state(root / "term" / "hf"), th.hf_state(ref_ws2 / "hf")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_single_rank_resume_is_bit_identical(setup):
    root, config = setup
    th.run(config("ws1"), nproc=1)
    resumed = root / "ws1_resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "ws1/checkpoints/step_00000002", resumed / "checkpoints/step_00000002")
    th.run(config("ws1_resumed"), nproc=1)
    ref, got = th.losses(root / "ws1"), th.losses(resumed)
    assert sorted(got) == [3, 4] and all(got[s] == ref[s] for s in got), (got, ref)
    a, b = th.hf_state(resumed / "hf"), th.hf_state(root / "ws1" / "hf")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_steps_are_skipped_then_abort(setup):
    """A weight of inf makes every loss non-finite: each step is skipped (weights untouched), the run aborts
    after ``max_nonfinite_steps`` in a row with a message saying so."""
    from safetensors.torch import load_file, save_file

    root, config = setup
    bad = root / "init_inf"
    shutil.copytree(root / "init", bad)
    (f,) = bad.glob("*.safetensors")
    state = load_file(str(f))
    state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], float("inf"))
    save_file(state, str(f), metadata={"format": "pt"})
    cfg = config("nonfinite", max_nonfinite_steps=2, **{"distributed.zero_stage": 2})
    data = th.yaml.safe_load(cfg.read_text())
    data["model"]["path"] = str(bad)
    th.write_config(cfg, data)
    code, out = th.finish(th.launch(cfg, nproc=1), timeout=120)
    assert code != 0
    assert "2 optimizer steps in a row" in out and "non-finite" in out, out[-2000:]
    skipped = [r for r in th.metrics(root / "nonfinite") if r.get("event") == "nonfinite_step_skipped"]
    assert [r["step"] for r in skipped] == [1, 2]
