"""Ulysses sequence parallelism in the trainer: two processes sharing every row (sp=2, world 2, ZeRO-2) train the
same steps as one process holding whole rows (sp=1) — per-step losses and gradient norms equal within 1e-5."""

from __future__ import annotations

import pytest

from tests import train_helpers as th
from tests.test_train_siglip import in_process  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
STEPS = 3


def test_sp2_matches_sp1_step_by_step(tmp_path, in_process):  # noqa: F811
    from keye.cli.init import init_checkpoint

    media = tmp_path / "media"
    media.mkdir()
    records = th.make_records(media, 3, 1, 12)  # rows of ~200 tokens mixing images, a video and text
    shards = th.write_shard_set(tmp_path, "rows", records, media)
    init_checkpoint(tmp_path / "init", config=str(th.write_nano_model(tmp_path / "nano.yaml")), seed=0)

    def config(name: str, sp: int):
        cfg = th.run_config(tmp_path / name, tmp_path / "nano.yaml", [str(shards)], max_steps=STEPS)
        cfg["model"] = {"path": str(tmp_path / "init")}
        cfg["data"].update(max_seq_len=200, shuffle=False)
        cfg["grad_accum_steps"] = 2
        cfg["optim"]["lr"] = 1e-2
        cfg["checkpoint"] = {"every_steps": 100, "keep_last": 1, "export_hf": False}
        cfg["distributed"]["sequence_parallel_size"] = sp
        return th.write_config(tmp_path / f"{name}.yaml", cfg)

    th.run(config("sp2", 2), nproc=2, timeout=150)
    in_process(config("sp1", 1))
    one = {r["step"]: r for r in th.metrics(tmp_path / "sp1") if "loss" in r}
    two = {r["step"]: r for r in th.metrics(tmp_path / "sp2") if "loss" in r}
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    assert one[1]["label_tokens"] == two[1]["label_tokens"] > 0  # each label token counted once across the SP group
    for step in one:
        for key in ("loss", "grad_norm"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-5), (step, key, one, two)
    assert one[STEPS]["loss"] < one[1]["loss"]
