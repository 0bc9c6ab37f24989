"""The generated demo dataset is valid end to end, and the spine's CLI commands work in-process."""

from __future__ import annotations

import json

import pytest

from data_pipelines.sample_data import make_sample_data
from data_pipelines.schema import validate_record
from keye.cli.main import main
from keye.processing import KeyeVLProcessor
from keye.reasoning import response_fits_mode


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    make_sample_data(root, n_images=4)
    return root


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_record_validates_and_encodes(sample_root):
    processor = KeyeVLProcessor()
    for name in ("pretrain.jsonl", "sft.jsonl"):
        for rec in _records(sample_root / name):
            validate_record(rec)
            sample = processor.encode_conversation(
                rec["messages"], mode=rec.get("mode"), media_root=sample_root / "media"
            )
            assert sample.num_label_tokens > 0, rec["id"]


def test_sft_covers_five_modes_and_responses_fit_them(sample_root):
    records = _records(sample_root / "sft.jsonl")
    assert {r["source"] for r in records} == {"non_thinking", "thinking", "auto_think", "think_with_image", "video"}
    for rec in records:
        content = rec["messages"][-1]["content"]
        text = content if isinstance(content, str) else "".join(i.get("text", "<image>") for i in content)
        assert response_fits_mode(text, rec["mode"]) is None, (rec["id"], text)


def test_rl_prompts_carry_solutions_and_five_hints(sample_root):
    for rec in _records(sample_root / "rl.jsonl"):
        assert rec["solution"] and len(rec["hints"]) == 5
        assert rec["hints"][-1].endswith(f"{rec['solution']}.")


def test_init_and_chat_commands(tmp_path, sample_root, capsys):
    out = tmp_path / "ckpt"
    assert (
        main(["init", "--config", "configs/model/tiny.yaml", "--out", str(out), "text_config.num_hidden_layers=1"]) == 0
    )
    assert (out / "config.json").is_file() and (out / "keye_processor_config.json").is_file()
    video = sample_root / "media" / "videos" / "cuts_2.mp4"
    code = main(["chat", "--model", str(out), "--video", str(video), "--max-new-tokens", "4", "--think", "Why?"])
    assert code == 0
    err = capsys.readouterr().err
    assert "visual tokens:" in err and "time to first token" in err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["init", "--config", "configs/model/tiny.yaml", "--out", str(tmp_path), "text_config.bogus=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'text_config.bogus'" in err[0]
    assert main(["chat", "--model", str(tmp_path / "missing"), "hi"]) == 1
    assert "not a Keye checkpoint" in capsys.readouterr().err
