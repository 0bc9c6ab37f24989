"""The README's example records and tables are run, so they cannot rot.

A fenced block right after ``<!-- check-data: MODE … -->`` holds sample records (one JSON value each, over one line
or several): ``keye check-data`` must give each record the listed SFT mode (``none``: fits no mode), and a block
after ``<!-- check-data output -->`` must be exactly what it prints. A block after ``<!-- video_mcq … -->`` holds
``video_mcq`` rows: the loader must read them all, with the ``video_mcq.*`` settings of the ``keye eval`` command in
the block that follows the table (if any).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from eval.benchmarks.video_mcq import VideoMCQ
from eval.config import EvalConfig
from keye.cli.main import main
from keye.typed_config import load_config

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"<!-- (check-data|video_mcq)([^>]*?)-->\s*```[a-z]*\n(.*?)```(?:\s*```[a-z]*\n(.*?)```)?", re.S)


def _blocks(kind: str) -> list[tuple[str, str, str | None]]:
    """(marker argument, block text, the fenced block right after it or None) for every ``kind`` marker."""
    return [
        (m.group(2).strip(" :"), m.group(3), m.group(4))
        for m in _BLOCK.finditer(README.read_text())
        if m.group(1) == kind
    ]


def _json_values(text: str) -> list:
    """Every JSON value in ``text``, one after another (JSONL or pretty-printed)."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return values
        value, i = decoder.raw_decode(text, i)
        values.append(value)


def _check_data_examples() -> list[tuple[str, str, str | None]]:
    return [b for b in _blocks("check-data") if b[0] != "output"]


def test_readme_has_the_marked_examples():
    modes = " ".join(arg for arg, _, _ in _check_data_examples()).split()
    assert {"thinking", "non_thinking", "auto_think", "think_with_image", "video", "none"} <= set(modes)
    assert [arg for arg, _, _ in _blocks("video_mcq")] == ["", "mapped"]


@pytest.mark.parametrize("example", _check_data_examples(), ids=lambda b: b[0])
def test_readme_records_fit_the_modes_they_are_marked_with(example, tmp_path, capsys):
    arg, body, _ = example
    records = _json_values(body)
    expected = [None if m == "none" else m for m in arg.split()]
    assert len(records) == len(expected), "one mode per record in the marker"
    data = tmp_path / "readme.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    code = main(["check-data", "--input", str(data), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in report["records"]] == expected, report["records"]
    assert [r["source_mode"] for r in report["records"]] == [r["source"] for r in records]
    assert code == (1 if None in expected else 0)
    outputs = [b for b in _blocks("check-data") if b[0] == "output"]
    if None in expected and outputs:  # the README's output block shows what this example prints
        main(["check-data", "--input", str(data)])
        assert capsys.readouterr().out.strip().splitlines() == outputs[0][1].strip().splitlines()


def _load(rows: list[dict], root: Path, overrides: list[str]) -> tuple[list, list[str]]:
    cfg = load_config(EvalConfig, None, overrides)
    lay = VideoMCQ().layout(cfg)
    (root / (lay.file if "*" not in lay.file else "readme.jsonl")).write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    for r in rows:  # the loader only needs the files to exist
        name = str(r[lay.video_key]) + lay.video_ext
        path = root / lay.video_root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0")
    result = VideoMCQ().load(root, cfg)
    return result.samples, result.skipped


@pytest.mark.parametrize("example", _blocks("video_mcq"), ids=lambda b: b[0] or "default")
def test_readme_video_mcq_rows_load(example, tmp_path):
    _, body, command = example
    rows = _json_values(body)
    overrides = []
    if command and "keye eval" in command:
        overrides = [t for t in shlex.split(command.replace("\\\n", " ")) if t.startswith("video_mcq.")]
    samples, skipped = _load(rows, tmp_path, overrides)
    assert skipped == [] and len(samples) == len(rows)
    for s in samples:
        assert s.answer in "ABCD"[: len(s.options)] and not any(o[:3] in ("A. ", "B. ", "C. ") for o in s.options)
    if not overrides:
        q1, q2 = samples
        assert (q1.answer, q2.answer, q2.options, q2.video_start, q2.video_end) == (
            "A",
            "C",
            ["one", "two", "three"],
            2.0,
            12.5,
        )
        assert q1.category == "order" and q2.category == "counting"
    else:
        (s,) = samples
        assert (s.id, s.answer, s.category, s.options) == ("7", "C", "counting", ["one", "two", "three"])
        assert s.video == str(tmp_path / "clips" / "street.mp4")
