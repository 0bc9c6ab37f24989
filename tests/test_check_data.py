"""``keye check-data``: the SFT mode each record fits or why none, its summary and exit code; ``keye shards`` prints
the same per-mode summary; the trainer's mode check gives the same answers (one implementation)."""

from __future__ import annotations

import json

import pytest

from keye.cli.main import main
from keye.sft_modes import SFT_MODES, fit_modes
from train.sft_mix import filter_by_mode


def _rec(rid, source, reply, user="What is 2 + 3?", mode=None, video=False):
    content = [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": user}] if video else user
    rec = {"id": rid, "source": source, "messages": [{"role": "user", "content": content}]}
    if reply is not None:
        rec["messages"].append({"role": "assistant", "content": reply})
    if mode:
        rec["mode"] = mode
    return rec


GOOD = [
    _rec("t", "thinking", "<think>2 + 3 = 5.</think><answer>5</answer>"),
    _rec("n", "non_thinking", "5", user="What is 2 + 3? /no_think"),
    _rec("a", "auto_think", "<analysis>Easy.</analysis>5"),
    _rec("v", "video", "3", mode="no_think", video=True),
]
BAD_THINK = _rec("bad-think", "thinking", "5")  # fits non_thinking, but is held to thinking
NO_REPLY = _rec("no-reply", "video_qa", None)  # fits nothing, and its source names no mode
FREE = _rec("free", "video_qa", "<think>x</think><answer>3</answer>", mode="think", video=True)


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _run(capsys, *argv):
    code = main(["check-data", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_record_fits_its_mode(tmp_path, capsys):
    data = _write(tmp_path / "good.jsonl", GOOD)
    code, out, err = _run(capsys, "--input", data)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[:4] == [
        "line 1 (t): thinking",
        "line 2 (n): non_thinking",
        "line 3 (a): auto_think",
        "line 4 (v): video",
    ]
    assert lines[4] == "SFT modes: thinking 1, non_thinking 1, auto_think 1, video 1; fit none 0"


def test_a_record_that_fits_no_mode_says_why_and_fails(tmp_path, capsys):
    data = _write(tmp_path / "mixed.jsonl", [*GOOD, BAD_THINK, NO_REPLY, FREE])
    code, out, err = _run(capsys, "--input", data)
    assert code == 1
    lines = out.splitlines()
    assert lines[4] == (
        "line 5 (bad-think): fits no SFT mode: thinking: think mode needs exactly one <think>, found 0 "
        "(it fits non_thinking)"
    )
    assert lines[5] == (
        "line 6 (no-reply): fits no SFT mode: thinking, non_thinking, auto_think, think_with_image, video: "
        "no assistant turn"
    )
    assert lines[6].startswith("line 7 (free): video (fits thinking, video; its source names no SFT mode")
    assert "fit none 2" in lines[7] and "1 fit a mode but their source names none (fine for pretraining" in lines[7]
    assert err.strip().splitlines() == [f"keye check-data: 2 fit no SFT mode of 7 records in {data}"]


def test_json_keys_and_summary(tmp_path, capsys):
    data = _write(tmp_path / "mixed.jsonl", [*GOOD, BAD_THINK, NO_REPLY, FREE, '{"id": "cut', GOOD[0]])
    code, out, _ = _run(capsys, "--input", data, "--json")
    assert code == 1
    report = json.loads(out)
    assert set(report) == {"ok", "summary", "records"} and report["ok"] is False
    assert report["summary"] == {
        "records": 9,
        "fit": 5,
        "fit_none": 2,
        "invalid": 2,
        "no_sft_source": 1,
        "modes": {"thinking": 1, "non_thinking": 1, "auto_think": 1, "video": 2},
        "reasons": {
            "thinking: think mode needs exactly one <think>, found 0": 1,
            "thinking, non_thinking, auto_think, think_with_image, video: no assistant turn": 1,
            "bad_json": 1,
            "duplicate_id": 1,
        },
    }
    recs = report["records"]
    keys = {"line", "id", "source", "source_mode", "mode", "fits", "reasons", "problem"}
    assert all(set(r) == keys for r in recs)
    bad = recs[4]
    assert bad["source_mode"] == "thinking" and bad["mode"] is None and bad["fits"] == ["non_thinking"]
    assert bad["reasons"]["thinking"] == "think mode needs exactly one <think>, found 0"
    assert bad["problem"].startswith("fits no SFT mode: thinking:")
    free = recs[6]
    assert free["source_mode"] is None and free["mode"] == "video" and free["fits"] == ["thinking", "video"]
    assert free["problem"] is None
    assert recs[7]["problem"].startswith("bad_json:") and recs[7]["id"] is None
    assert recs[8]["problem"].startswith("duplicate_id:") and recs[8]["line"] == 9


def test_media_root_schema_and_missing_input(tmp_path, capsys):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "clip.mp4").write_bytes(b"\0")
    (tmp_path / "media" / "empty.png").write_bytes(b"")
    image = _rec("img", "non_thinking", "red")
    image["messages"][0]["content"] = [{"type": "image", "image": "empty.png"}, {"type": "text", "text": "Colour?"}]
    schema = {"id": "s", "source": "thinking", "messages": [{"role": "robot", "content": "hi"}]}
    data = _write(tmp_path / "m.jsonl", [GOOD[3], image, schema])
    code, out, _ = _run(capsys, "--input", data, "--media-root", tmp_path / "media", "--json")
    recs = json.loads(out)["records"]
    assert code == 1 and recs[0]["mode"] == "video"
    assert recs[1]["problem"] == "empty_media: empty.png: file is empty"
    assert recs[2]["problem"].startswith("schema: record 's': messages[0].role")
    code, _, err = _run(capsys, "--input", tmp_path / "nope.jsonl")
    assert code == 1 and err.strip().splitlines() == [
        f"keye check-data: error: input JSONL {tmp_path}/nope.jsonl does not exist"
    ]


def test_help_says_when_it_fails(capsys):
    with pytest.raises(SystemExit):
        main(["check-data", "--help"])
    out = capsys.readouterr().out
    assert "Exit status" in out and "fits no mode" in out


def test_shards_prints_the_per_mode_summary_without_failing(tmp_path, capsys):
    (tmp_path / "media").mkdir()
    data = _write(tmp_path / "d.jsonl", [GOOD[0], GOOD[1], BAD_THINK])
    out_dir = tmp_path / "shards"
    argv = ["shards", "--input", str(data), "--media-root", str(tmp_path / "media"), "--out", str(out_dir)]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("wrote 3 samples in 1 shards")
    assert out[1] == (
        "SFT modes: thinking 1, non_thinking 1; fit none 1 (thinking: think mode needs exactly one <think>, found 0 ×1)"
    )
    assert out[2] == f"per-record reasons: keye check-data --input {data}"


@pytest.mark.parametrize("record", [*GOOD, BAD_THINK, NO_REPLY, FREE])
def test_the_trainer_check_is_the_same_function(record):
    fit = fit_modes(record)
    for mode in SFT_MODES:
        reason = filter_by_mode(record, mode)
        assert (reason is None) == (mode in fit.fits)
        assert reason is None or reason == f"{mode}: {fit.reasons[mode]}"
    expected = None if fit.source_mode in fit.fits else fit.problem
    assert filter_by_mode(record) == expected
    if fit.source_mode is None:
        assert filter_by_mode(record).startswith("unknown: no SFT mode")
