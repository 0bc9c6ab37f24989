"""Checkpoint merging: exact weighted means, sharded inputs and outputs, and clear errors on mismatches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from keye.checkpoint import read_state_dict
from keye.merge import MergeError, merge_checkpoints, normalise_weights
from keye.modeling import KeyeVLForConditionalGeneration
from tests.spine_fixtures import micro_config
from tools.merge_checkpoints import main as merge_cli


def _config(**text):
    cfg = micro_config()
    cfg.text_config.vocab_size = 512  # small checkpoints; token ids are not used here
    cfg.text_config.pad_token_id = 0
    for k, v in text.items():
        setattr(cfg.text_config, k, v)
    return cfg


def _save(path: Path, seed: int, shard: str | None = None, **text) -> Path:
    torch.manual_seed(seed)
    model = KeyeVLForConditionalGeneration(_config(**text))
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ckpts")
    dirs = [_save(root / "a", 1), _save(root / "b", 2, shard="100KB"), _save(root / "c", 3)]
    (dirs[0] / "tokenizer_config.json").write_text('{"marker": "from-a"}')
    return dirs


def test_weighted_mean_is_exact_and_loads(ckpts, tmp_path):
    report = merge_checkpoints(ckpts, tmp_path / "m", weights=[1, 2, 1])
    assert report.weights == [0.25, 0.5, 0.25] and report.shards == 1
    states = [read_state_dict(d) for d in ckpts]
    merged = read_state_dict(tmp_path / "m")
    assert merged.keys() == states[0].keys()
    for key, value in merged.items():
        expected = (0.25 * states[0][key].double() + 0.5 * states[1][key].double() + 0.25 * states[2][key].double()).to(
            states[0][key].dtype
        )
        assert torch.equal(value, expected), key
    assert not torch.equal(merged["lm_head.weight"], states[0]["lm_head.weight"])
    model = KeyeVLForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert torch.equal(model.state_dict()["mlp_AR.linear_1.weight"], merged["mlp_AR.linear_1.weight"])
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())["marker"] == "from-a"
    info = json.loads((tmp_path / "m" / "merge_info.json").read_text())
    assert info["sources"] == [str(d) for d in ckpts] and info["parameters"] == report.parameters


def test_uniform_sharded_output(ckpts, tmp_path):
    report = merge_checkpoints(ckpts[:2], tmp_path / "m", max_shard_bytes=200_000)
    assert report.weights == [0.5, 0.5] and report.shards > 1
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == report.shards
    a, b, m = read_state_dict(ckpts[0]), read_state_dict(ckpts[1]), read_state_dict(tmp_path / "m")
    key = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(m[key], (0.5 * a[key].double() + 0.5 * b[key].double()).float())
    KeyeVLForConditionalGeneration.from_pretrained(tmp_path / "m")


def test_weight_errors():
    assert normalise_weights(None, 4) == [0.25] * 4
    with pytest.raises(MergeError, match="3 weights for 2"):
        normalise_weights([1, 1, 1], 2)
    with pytest.raises(MergeError, match="non-negative"):
        normalise_weights([1, -1], 2)
    with pytest.raises(MergeError, match="at least 2"):
        normalise_weights(None, 1)


def test_architecture_key_and_shape_mismatches(ckpts, tmp_path):
    wider = _save(tmp_path / "wider", 4, intermediate_size=96)
    with pytest.raises(MergeError, match=r"different architecture.*: intermediate_size: 128 vs 96"):
        merge_checkpoints([ckpts[0], wider], tmp_path / "o1")

    missing = _save(tmp_path / "missing", 5)
    state = load_file(str(missing / "model.safetensors"))
    state.pop("mlp_AR.linear_2.bias")
    save_file(state, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"missing \['mlp_AR.linear_2.bias'\]"):
        merge_checkpoints([ckpts[0], missing], tmp_path / "o2")

    reshaped = _save(tmp_path / "reshaped", 6)
    state = load_file(str(reshaped / "model.safetensors"))
    state["model.norm.weight"] = torch.ones(32)
    save_file(state, str(reshaped / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"'model.norm.weight' has shape \[64\] in .* but \[32\]"):
        merge_checkpoints([ckpts[0], reshaped], tmp_path / "o3")


def test_cli_reports_one_line_errors(ckpts, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert merge_cli([str(ckpts[0]), str(ckpts[1]), "--out", str(tmp_path / "busy")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output directory") and "\n" not in err
    assert merge_cli([str(ckpts[0]), str(ckpts[2]), "--out", str(tmp_path / "ok"), "--weights", "3", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == [0.75, 0.25]
