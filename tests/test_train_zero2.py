"""Trainer end to end under ZeRO-2 on CPU (gloo): loss normalisation across ranks and accumulation, exact resume
after SIGKILL and from a copied checkpoint, freezing, multi-node rendezvous. One data set and one reference run
per module keep the whole file to a handful of short runs."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests import train_helpers as th

pytestmark = pytest.mark.slow
STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One text+image shard (one sample per 48-token row, fixed order) and an initial HF checkpoint."""
    from keye.cli.init import init_checkpoint

    root = tmp_path_factory.mktemp("z2")
    media = root / "media"
    media.mkdir()
    shards = th.write_shard_set(root, "norm", th.make_records(media, 3, 0, 9), media)
    init_checkpoint(root / "init", config=str(th.write_nano_model(root / "nano.yaml")), seed=0)

    def config(name: str, **overrides) -> Path:
        cfg = th.run_config(root / name, root / "nano.yaml", [str(shards)], **overrides)
        cfg["model"] = {"path": str(root / "init")}
        cfg["data"].update(max_seq_len=48, lookahead=1, shuffle=False)
        cfg["max_steps"] = STEPS
        cfg["freeze"] = ["vit"]
        cfg["optim"]["lr"] = 1e-2
        return th.write_config(root / f"{name}.yaml", cfg)

    return root, config


@pytest.fixture(scope="module")
def ref_ws2(setup):
    """2 ranks × 2 accumulation steps, uninterrupted: the reference of this module."""
    root, config = setup
    th.run(config("ws2", grad_accum_steps=2, **{"checkpoint.export_hf": True, "checkpoint.keep_last": 2}), nproc=2)
    return root / "ws2"


@pytest.fixture(scope="module")
def ref_ws1(setup):
    root, config = setup
    th.run(config("ws1", grad_accum_steps=4), nproc=1)
    return root / "ws1"


def test_two_ranks_lower_the_loss_keep_frozen_vit_and_export(setup, ref_ws2):
    root, _ = setup
    losses = th.losses(ref_ws2)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.5, losses
    init, final = th.hf_state(root / "init"), th.hf_state(ref_ws2 / "hf")
    vit = [k for k in init if k.startswith("visual.")]
    assert vit and all(torch.equal(init[k], final[k]) for k in vit), "frozen ViT changed"
    assert not torch.equal(init["mlp_AR.linear_1.weight"], final["mlp_AR.linear_1.weight"])
    assert not torch.equal(init["lm_head.weight"], final["lm_head.weight"])
    kept = sorted(p.name for p in (ref_ws2 / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000006"], kept  # keep_last=2
    assert (ref_ws2 / "checkpoints/step_00000006/hf/config.json").is_file()
    assert (ref_ws2 / "checkpoints/step_00000006/config.yaml").is_file()
    from keye.modeling import KeyeVLForConditionalGeneration
    from keye.processing import KeyeVLProcessor

    KeyeVLForConditionalGeneration.from_pretrained(ref_ws2 / "hf")
    KeyeVLProcessor.from_pretrained(ref_ws2 / "hf")


def test_loss_is_the_global_per_token_mean(ref_ws1, ref_ws2):
    """2 ranks × 2 accumulation steps == 1 rank × 4 accumulation steps (same rows, unequal label counts)."""
    l1, l2 = th.losses(ref_ws1), th.losses(ref_ws2)
    for step in range(1, STEPS + 1):
        assert l1[step] == pytest.approx(l2[step], rel=1e-5, abs=1e-5), (step, l1, l2)
    a, b = th.hf_state(ref_ws1 / "hf"), th.hf_state(ref_ws2 / "hf")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_single_rank_resume_from_a_checkpoint_is_bit_identical(setup, ref_ws1):
    root, config = setup
    resumed = root / "ws1_resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref_ws1 / "checkpoints/step_00000004", resumed / "checkpoints/step_00000004")
    th.run(config("ws1_resumed", grad_accum_steps=4), nproc=1)
    ref, got = th.losses(ref_ws1), th.losses(resumed)
    assert sorted(got) == [5, 6] and all(got[s] == ref[s] for s in got), (got, ref)
    a, b = th.hf_state(resumed / "hf"), th.hf_state(ref_ws1 / "hf")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _launch_nodes(cfg: Path) -> list[subprocess.Popen]:
    port = th.free_port()
    return [
        subprocess.Popen(
            [
                str(th.VENV_BIN / "torchrun"),
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(r),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "train",
                str(cfg),
            ],
            cwd=th.REPO,
            env=th.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r in (0, 1)
    ]


def test_two_nodes_killed_with_sigkill_resume_to_the_one_node_result(setup, ref_ws2):
    """Two torchrun agents (--nnodes 2, node ranks 0 and 1, rendezvous on 127.0.0.1) train together; both are
    SIGKILLed after the first checkpoint, restarted with the same command, and end bit-identical to the
    uninterrupted single-node 2-process run (losses of every step and the exported weights)."""
    root, config = setup
    cfg = config("nodes", grad_accum_steps=2)
    procs = _launch_nodes(cfg)
    deadline = time.time() + 150
    saved = False
    while time.time() < deadline and not saved:
        for p in procs:
            assert p.poll() is None, p.communicate()[0][-3000:]
        saved = any(r.get("event") == "checkpoint" for r in th.metrics(root / "nodes"))
        time.sleep(0.05)
    for p in procs:
        th.kill_tree(p, signal.SIGKILL)
    for p in procs:
        p.communicate()
    assert saved, "no checkpoint was written in time"
    assert max(th.losses(root / "nodes")) < STEPS, "the run finished before it could be killed"
    procs = _launch_nodes(cfg)
    for p in procs:
        code, out = th.finish(p, timeout=150)
        assert code == 0, out[-3000:]
    assert th.losses(root / "nodes") == th.losses(ref_ws2)
    resumed = [r for r in th.metrics(root / "nodes") if r.get("event") == "resumed"]
    assert resumed and resumed[-1]["samples_skipped_to_resume"] >= 0
    a, b = th.hf_state(root / "nodes" / "hf"), th.hf_state(ref_ws2 / "hf")
    assert all(torch.equal(a[k], b[k]) for k in a)
