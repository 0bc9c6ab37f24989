"""Run config, schedules, parameter groups, freeze plans and data plumbing of the trainer (in-process, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from keye.typed_config import ConfigError
from tests.spine_fixtures import micro_config
from train.config import ScheduleConfig, load_train_config
from train.optim import Schedule

REPO = Path(__file__).resolve().parent.parent
BASE = ["model.config=configs/model/tiny.yaml", "data.sources=[{name: a, shards: [x.tar]}]"]


def test_unknown_key_names_itself_and_the_source(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_steps: 3\noptim: {lr: 1.0e-3, lrr: 2}\n")
    with pytest.raises(ConfigError, match=r"run.yaml.*optim\.lrr"):
        load_train_config(cfg, BASE)
    with pytest.raises(ConfigError, match=r"override.*distributed\.zero_stagee"):
        load_train_config(None, [*BASE, "distributed.zero_stagee=3"])
    with pytest.raises(ConfigError, match=r"freeze.*\['vit', 'brain'\]"):
        load_train_config(None, [*BASE, "freeze=[vit,brain]"])
    with pytest.raises(ConfigError, match=r"'max_steps'.*'ten'"):
        load_train_config(None, [*BASE, "max_steps=ten"])


def test_cli_reports_a_bad_key_in_one_line(tmp_path, capsys):
    from keye.cli.main import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {config: configs/model/tiny.yaml}\ndata: {sources: [{shards: [a.tar]}]}\nbogus: 1\n")
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bogus" in err[0] and "run.yaml" in err[0]


@pytest.mark.parametrize("name", ["stage1", "stage2", "stage3", "tiny_stage1", "tiny_stage2", "tiny_stage3"])
def test_stage_configs_load(name):
    cfg = load_train_config(REPO / f"configs/pretrain/{name}.yaml")
    assert cfg.model.path
    if name.endswith("stage1"):
        assert sorted(cfg.freeze) == ["llm", "vit"]
    else:
        assert cfg.freeze == []
    if name == "stage3":
        assert [s.weight for s in cfg.data.sources] == [24.0, 50.0, 26.0]
        assert "text_config.rope_parameters.rope_theta=8000000.0" in cfg.model.overrides
        assert cfg.data.max_seq_len == 32768
    if name.startswith("tiny"):
        assert cfg.max_steps <= 10 and cfg.data.max_seq_len <= 1024


def test_schedules():
    cos = Schedule(ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1), 110)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.55) and cos(109) == pytest.approx(0.1, abs=1e-3)
    wsd = Schedule(ScheduleConfig(kind="wsd", warmup_steps=2, decay_ratio=0.2), 100)
    assert [wsd(s) for s in (1, 50, 79)] == [1.0, 1.0, 1.0]
    assert wsd(80) < 1.0 and wsd(99) == pytest.approx(0.0)


def test_param_groups_and_freeze_plan():
    from keye.modeling import KeyeVLForConditionalGeneration
    from train.config import OptimConfig
    from train.freeze import apply_freeze
    from train.optim import param_groups

    model = KeyeVLForConditionalGeneration(micro_config())
    counts = apply_freeze(model, ["vit", "llm"])
    assert counts["vit"] == counts["llm"] == 0 and counts["projector"] > 0
    groups = param_groups(model, OptimConfig(lr=1e-3, projector_lr=5e-3, weight_decay=0.1))
    assert {g["name"] for g in groups} == {"projector/decay", "projector/no_decay"}
    assert all(g["lr"] == 5e-3 for g in groups)
    apply_freeze(model, [])
    groups = param_groups(model, OptimConfig(lr=1e-3, vit_lr=1e-4))
    lrs = {g["name"].split("/")[0]: g["lr"] for g in groups}
    assert lrs == {"vit": 1e-4, "projector": 1e-3, "llm": 1e-3}
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    decay = [g for g in groups if g["name"].endswith("/no_decay")]
    assert all(p.ndim == 1 for g in decay for p in g["params"])


def test_media_members_become_bytes_and_rows_concatenate():
    from keye.encoded import PackedBatch
    from train.data import concat_rows, label_count, with_media_bytes

    record = {
        "id": "r",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": ["media_0.f0000.jpg", "media_0.f0001.jpg"]},
                    {"type": "image", "image": "m.png"},
                ],
            }
        ],
    }
    msgs = with_media_bytes(record, {"media_0.f0000.jpg": b"a", "media_0.f0001.jpg": b"b", "m.png": b"c"})
    assert msgs[0]["content"][0]["video"] == [b"a", b"b"] and msgs[0]["content"][1]["image"] == b"c"
    with pytest.raises(ValueError, match="media member 'm.png' not in the sample"):
        with_media_bytes(record, {"media_0.f0000.jpg": b"a", "media_0.f0001.jpg": b"b"})

    def row(labels):
        n = len(labels)
        return PackedBatch(
            torch.arange(n)[None],
            torch.tensor(labels)[None],
            torch.arange(n).expand(3, 1, n),
            torch.tensor([0, n], dtype=torch.int32),
            num_samples=1,
        )

    both = concat_rows([row([-100, 5, 6]), row([-100, -100, 7, 8])])
    assert both.cu_seqlens.tolist() == [0, 3, 7] and both.input_ids.shape == (1, 7)
    assert int(label_count(both)) == 2 + 2  # shifted, never across the boundary
