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


def test_generated_sft_data_fits_its_modes_by_check_data(sample_root, capsys):
    code = main(["check-data", "--input", str(sample_root / "sft.jsonl"), "--media-root", str(sample_root / "media")])
    assert code == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary == "SFT modes: thinking 4, non_thinking 4, auto_think 4, think_with_image 4, video 8; fit none 0"


def test_generated_mcq_fixtures_balance_the_correct_letters(sample_root):
    """Correct letters are spread over every letter (not all 'A'), seeded, and still name the right option."""
    import random
    from collections import Counter

    from data_pipelines.sample_data import balance_answers

    mcq = _records(sample_root / "eval" / "video_mcq" / "videos.jsonl")
    counting = [r for r in mcq if r["category"] == "counting"]
    assert sorted(r["answer"] for r in counting) == ["A", "B", "C", "D"]
    cuts = {"cuts_0.mp4": "0", "cuts_1.mp4": "1", "cuts_2.mp4": "3", "cuts_3.mp4": "4"}
    for r in counting:
        assert r["options"]["ABCD".index(r["answer"])] == cuts[r["video"].rsplit("/", 1)[-1]]
    (text,) = [r for r in mcq if r["category"] == "ocr"]
    assert text["options"]["AB".index(text["answer"])] == "yes"
    time_rows = _records(sample_root / "eval" / "time" / "timebench.jsonl")
    for k in (3, 4):
        letters = Counter(r["answer"] for r in time_rows if len(r["options"]) == k)
        assert set(letters) == set("ABCD"[:k]) and max(letters.values()) - min(letters.values()) <= 1
    for r in time_rows:
        assert r["options"]["ABCD".index(r["answer"])] == cuts[r["video_path"].rsplit("/", 1)[-1]]

    items = [([str(i), "x", "y"], str(i)) for i in range(7)]
    first = balance_answers(items, random.Random(1))
    assert first == balance_answers(items, random.Random(1))
    assert all(opts["ABC".index(letter)] == str(i) for i, (opts, letter) in enumerate(first))
    assert sorted(Counter(letter for _, letter in first).values()) == [2, 2, 3]
