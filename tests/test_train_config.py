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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.video.fsp=2", r"data\.video\.fsp: unknown video option \(did you mean 'fps'\?\)"),
        ("data.video.max_frames=two", r"data\.video\.max_frames: expected int or null, got 'two'"),
        ("data.video.slow_fast=1", r"data\.video\.slow_fast: expected bool, got 1"),
    ],
)
def test_video_options_are_checked_when_the_config_loads(override, message):
    """A bad ``data.video`` key or value fails at load, naming itself and the sources, not after start-up."""
    with pytest.raises(ConfigError, match=r"tiny_stage0\.yaml \+ command-line override: " + message):
        load_train_config(REPO / "configs/pretrain/tiny_stage0.yaml", [override])
    cfg = load_train_config(REPO / "configs/pretrain/tiny_stage0.yaml", ["data.video.fps=1", "data.video.max_frames=8"])
    assert cfg.data.video == {"fps": 1, "max_frames": 8}


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
    from data_pipelines.encoded import PackedBatch, TokenIds
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
            TokenIds.from_config(micro_config(), pad=151643),
            num_samples=1,
        )

    both = concat_rows([row([-100, 5, 6]), row([-100, -100, 7, 8])])
    assert both.cu_seqlens.tolist() == [0, 3, 7] and both.input_ids.shape == (1, 7)
    assert int(label_count(both)) == 2 + 2  # shifted, never across the boundary


# --- which learning rate applies (train.config.apply_rate_rule) ------------------------------------------------
def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_tiny_run_trains_at_the_lr_it_asks_for():
    """configs/sft/tiny_run.yaml sets optim.lr: 2e-4 over stage2.yaml's per-module rates: 2e-4 is what trains."""
    from keye.modeling import KeyeVLForConditionalGeneration
    from train.config import load_train_run
    from train.freeze import apply_freeze
    from train.optim import param_groups

    cfg, plan = load_train_run(REPO / "configs/sft/tiny_run.yaml")
    assert plan.rates() == {"projector": 2e-4, "llm": 2e-4} and plan.warnings == []
    assert (cfg.optim.vit_lr, cfg.optim.projector_lr, cfg.optim.llm_lr) == (None, None, None)  # saved config agrees
    line = plan.line()
    assert line.startswith("tiny_sft: learning rates: projector, llm 2.00e-04 (optim.lr, configs/sft/tiny_run.yaml")
    assert line.endswith("; vit frozen")
    model = KeyeVLForConditionalGeneration(micro_config())
    apply_freeze(model, cfg.freeze)
    assert {g["lr"] for g in param_groups(model, cfg.optim)} == {2e-4}


@pytest.mark.parametrize(
    "name",
    sorted(
        str(p.relative_to(REPO))
        for pattern in ("configs/pretrain/*.yaml", "configs/sft/*_run.yaml", "configs/rl/*.yaml")
        for p in REPO.glob(pattern)
    ),
)
def test_shipped_configs_have_no_value_without_effect(name):
    if name.startswith("configs/rl/"):
        from train.rl.run import load_rl_run as load
    else:
        from train.config import load_train_run as load
    cfg, plan = load(REPO / name)
    assert plan.warnings == [], plan.warnings
    assert plan.rates() and all(r > 0 for r in plan.rates().values())


def test_command_line_lr_replaces_inherited_module_rates_and_later_module_rates_apply():
    from train.config import load_train_run

    tiny2 = REPO / "configs/pretrain/tiny_stage2.yaml"
    _, plan = load_train_run(tiny2)
    assert plan.rates() == {"vit": 2e-5, "projector": 1e-4, "llm": 1e-4}
    _, plan = load_train_run(tiny2, ["optim.lr=5e-4"])
    assert plan.rates() == {"vit": 5e-4, "projector": 5e-4, "llm": 5e-4}
    assert "(optim.lr, command line; replaces optim.vit_lr=2e-05 (configs/pretrain/stage2.yaml))" in plan.line()
    _, plan = load_train_run(tiny2, ["optim.lr=5e-4", "optim.vit_lr=1e-5"])  # same layer: the module's own wins
    assert plan.rates() == {"vit": 1e-5, "projector": 5e-4, "llm": 5e-4}
    _, plan = load_train_run(tiny2, ["optim.vit_lr=1e-6"])  # later than stage2.yaml's optim.lr: applies
    assert plan.rates() == {"vit": 1e-6, "projector": 1e-4, "llm": 1e-4}


def test_lr_in_the_run_file_replaces_module_rates_of_its_base(tmp_path):
    """The trap tiny_run.yaml fell into (stage2.yaml then set all three module rates): the run's optim.lr wins."""
    from train.config import load_train_run

    _yaml(
        tmp_path / "base.yaml",
        "data: {sources: [{name: a, shards: [x.tar]}]}\nmodel: {config: configs/model/tiny.yaml}\n"
        "optim: {lr: 1.0e-4, vit_lr: 2.0e-5, projector_lr: 1.0e-4, llm_lr: 1.0e-4}\n",
    )
    cfg, plan = load_train_run(_yaml(tmp_path / "run.yaml", "_base_: base.yaml\noptim: {lr: 2.0e-4}\n"))
    assert plan.rates() == {"vit": 2e-4, "projector": 2e-4, "llm": 2e-4} and plan.warnings == []
    assert (cfg.optim.lr, cfg.optim.vit_lr, cfg.optim.projector_lr, cfg.optim.llm_lr) == (2e-4, None, None, None)
    assert "replaces optim.vit_lr=2e-05 (" in plan.line() and "optim.llm_lr=0.0001 (" in plan.line()


def test_a_value_without_effect_is_an_error_in_the_run_and_a_warning_from_a_base(tmp_path):
    from train.config import load_train_run

    shards = "data: {sources: [{name: a, shards: [x.tar]}]}\nmodel: {config: configs/model/tiny.yaml}\n"
    every = "optim: {lr: 1.0e-3, vit_lr: 1.0e-4, projector_lr: 2.0e-4, llm_lr: 3.0e-4}\n"
    own = _yaml(tmp_path / "own.yaml", shards + every)
    with pytest.raises(ConfigError, match=r"optim\.lr=0\.001 \(.*own\.yaml\) has no effect: every trained part"):
        load_train_run(own)
    _yaml(tmp_path / "base.yaml", shards + every)
    child = _yaml(tmp_path / "child.yaml", "_base_: base.yaml\nmax_steps: 3\n")
    _, plan = load_train_run(child)  # inherited: the run starts, and says so
    assert plan.rates() == {"vit": 1e-4, "projector": 2e-4, "llm": 3e-4}
    assert len(plan.warnings) == 1 and "optim.lr=0.001" in plan.warnings[0] and "base.yaml" in plan.warnings[0]
    frozen = _yaml(tmp_path / "frozen.yaml", "_base_: base.yaml\nfreeze: [vit]\n")
    _, plan = load_train_run(frozen)
    assert any("optim.vit_lr=0.0001" in w and "vit is frozen" in w for w in plan.warnings)
    with pytest.raises(ConfigError, match=r"optim\.vit_lr=1e-05 \(command line\) has no effect: vit is frozen"):
        load_train_run(REPO / "configs/sft/tiny_run.yaml", ["optim.vit_lr=1e-5"])
    with pytest.raises(ConfigError, match=r"optim\.llm_lr=0\.001 \(command line\) has no effect: objective siglip"):
        load_train_run(REPO / "configs/pretrain/tiny_stage0.yaml", ["optim.llm_lr=1e-3"])


def test_cli_names_both_keys_of_a_rate_without_effect(tmp_path, capsys):
    from keye.cli.main import main

    cfg = _yaml(
        tmp_path / "run.yaml",
        "model: {config: configs/model/tiny.yaml}\ndata: {sources: [{shards: [a.tar]}]}\n"
        "optim: {lr: 1.0e-3, vit_lr: 1.0e-4, projector_lr: 1.0e-4, llm_lr: 1.0e-4}\n",
    )
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr=0.001" in err[0] and "optim.llm_lr" in err[0] and "run.yaml" in err[0]
