"""``keye eval-filter``: single-frame judges drop easy items, letters are rebalanced, the copy evaluates as TIME."""

import json
from collections import Counter

import pytest
from PIL import Image

from eval.config import EvalConfig
from eval.filter import frame_at, rebalance
from eval.runner import run_eval
from keye.cli.main import main as keye_main
from keye.typed_config import from_dict
from tests.eval_fake_engine import write_time

OPTS4 = ["up", "down", "left", "right"]
JUDGES = [
    "tests.eval_fake_engine:make_judge_a",
    "tests.eval_fake_engine:make_judge_b",
    "tests.eval_fake_engine:make_judge_c",
]


def items() -> list[dict]:
    out = [
        {
            "id": "easy2",
            "dimension": "Dynamic",
            "options": OPTS4,
            "answer": "B",
            "reply": "x",
            "named": {"a": "B", "b": "(B)", "c": "A"},
        },
        {
            "id": "easy3",
            "dimension": "Order",
            "options": OPTS4,
            "answer": "C",
            "reply": "C",
            "clip_start": 0.25,
            "clip_end": 0.75,
        },
    ]
    # eight hard items, all with answer A: one judge at most is right
    for i in range(8):
        out.append(
            {
                "id": f"hard{i}",
                "dimension": ["Dynamic", "Order"][i % 2],
                "options": OPTS4,
                "answer": "A",
                "reply": "D",
                "named": {"a": "A"} if i == 0 else {},
            }
        )
    return out


def run_cli(tmp_path, out_name: str, seed: int = 0) -> int:
    return keye_main(
        [
            "eval-filter",
            "--bench",
            "time",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / out_name),
            "--seed",
            str(seed),
            *sum((["--judge", j] for j in JUDGES), []),
            "progress=false",
        ]
    )


def test_filter_drops_single_frame_answerable_and_rebalances(tmp_path, capsys):
    write_time(tmp_path / "data", items())
    assert run_cli(tmp_path, "f1") == 0
    assert "kept 8 of 10 (2 dropped" in capsys.readouterr().out
    out = tmp_path / "f1"
    report = json.loads((out / "filter_report.json").read_text())
    assert [d["id"] for d in report["dropped_items"]] == ["easy2", "easy3"]
    assert report["dropped_items"][0]["judges_correct"] == JUDGES[:2]
    assert report["letters_before"] == {"A": 8} and report["letters_after"] == {"A": 2, "B": 2, "C": 2, "D": 2}
    assert report["per_category"]["Order"] == {"total": 5, "kept": 4, "dropped": 1}
    assert report["judge_accuracy"][JUDGES[0]] == pytest.approx(100 * 3 / 10)
    frames = sorted((out / "frames").glob("*.jpg"))
    assert len(frames) == 10 and Image.open(frames[0]).size == (64, 64)
    assert "| easy2 | Dynamic | B |" in (out / "filter_report.md").read_text()

    rows = [json.loads(line) for line in (out / "filtered.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"hard{i}" for i in range(8)]
    for r in rows:  # the correct option's text moved with its letter
        assert r["options"][ord(r["answer"]) - 65] == "up" and sorted(r["options"]) == sorted(OPTS4)

    # same seed, same result; the filtered copy is a valid TIME file
    assert run_cli(tmp_path, "f2") == 0
    assert (tmp_path / "f2" / "filtered.jsonl").read_text() == (out / "filtered.jsonl").read_text()
    cfg = from_dict(
        EvalConfig,
        {
            "benchmarks": ["time"],
            "data": str(out / "filtered.jsonl"),
            "out": str(tmp_path / "ev"),
            "engine": "tests.eval_fake_engine:make",
            "progress": False,
        },
    )
    res = run_eval(cfg)
    assert res["benchmarks"]["time"]["overall"]["total"] == 8


def test_rebalance_counts_and_frame_seek(tmp_path):
    from eval.benchmarks.base import MCQ, Sample

    samples = [
        Sample(id=str(i), bench="b", category="c", kind=MCQ, question="q", answer="A", options=["x", "y", "z"])
        for i in range(7)
    ]
    counts = Counter(s.answer for s in rebalance(samples, seed=1))
    assert sorted(counts.values()) == [2, 2, 3] and set(counts) == {"A", "B", "C"}
    from data_pipelines.synthetic import tiny

    video = tiny(tmp_path / "v.mp4", seconds=1.0, fps=8)
    assert frame_at(video, 0.5).size == (64, 64) and frame_at(video, 5.0).size == (64, 64)


def test_filter_rejects_bad_arguments(tmp_path, capsys):
    write_time(tmp_path / "data", items()[:2])
    rc = keye_main(
        [
            "eval-filter",
            "--bench",
            "time",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "o"),
            *sum((["--judge", j] for j in JUDGES + JUDGES[:1]), []),
        ]
    )
    assert rc == 1 and "1 to 3 judges, got 4" in capsys.readouterr().err
