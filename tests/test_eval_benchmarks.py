"""Loaders (published formats), prompt building, scoring and per-category aggregation of each benchmark."""

import json
from pathlib import Path

import pytest

from eval.benchmarks import data_root, get_benchmarks
from eval.benchmarks.kc_mmbench import YORN_INSTRUCTION
from eval.benchmarks.time_bench import TIME_PROMPT_SUFFIX
from eval.config import EvalConfig
from eval.runner import run_eval
from keye.typed_config import from_dict
from tests.eval_fake_engine import write_kc, write_time, write_videomme

OPTS3 = ["at the start", "in the middle", "at the end"]
OPTS4 = ["up", "down", "left", "up-left"]


def cfg_for(tmp: Path, benches: list[str], **extra) -> EvalConfig:
    data = {"benchmarks": benches, "data": str(tmp), "out": str(tmp / "out"), "engine": "tests.eval_fake_engine:make"}
    data.update(extra)
    return from_dict(EvalConfig, data)


def test_time_loader_prompt_and_clip(tmp_path):
    write_time(
        tmp_path,
        [
            {
                "id": "t1",
                "dimension": "Location",
                "options": ["(A) " + OPTS3[0], "(B) " + OPTS3[1], "(C) " + OPTS3[2]],
                "answer": "(B)",
                "reply": "B",
                "clip_start": 0.2,
                "clip_end": 0.8,
            },
            {"id": "t2", "dimension": "Dynamic", "options": OPTS4, "answer": "left", "reply": "C"},
            {"id": "bad", "dimension": "Dynamic", "options": OPTS4, "answer": "Z", "reply": "A"},
        ],
    )
    with (tmp_path / "timebench.jsonl").open("a") as fh:
        fh.write("{not json\n")
    cfg = cfg_for(tmp_path, ["time"], mode="think")
    (bench,) = get_benchmarks(["TIME"])
    res = bench.load(data_root(bench, cfg), cfg)
    assert [s.id for s in res.samples] == ["t1", "t2"]
    assert [s.answer for s in res.samples] == ["B", "C"]
    assert res.samples[0].options == OPTS3  # letter prefixes removed, re-lettered in the prompt
    assert (
        len(res.skipped) == 2 and any("'Z'" in m for m in res.skipped) and any("invalid JSON" in m for m in res.skipped)
    )

    conv = bench.conversation(res.samples[0], cfg)
    video, text = conv[0]["content"]
    assert video["type"] == "video" and Path(video["video"]).is_file()
    assert (video["video_start"], video["video_end"]) == (0.2, 0.8)
    assert video["fps"] == cfg.media.fps and video["max_frames"] == cfg.media.max_frames
    assert "(A) at the start\n(B) in the middle\n(C) at the end" in text["text"]
    assert text["text"].endswith(TIME_PROMPT_SUFFIX + " /think")
    assert "video_start" not in bench.conversation(res.samples[1], cfg)[0]["content"][0]


def test_time_scores_per_dimension_with_chance(tmp_path):
    items = [
        {
            "id": "l1",
            "dimension": "Location",
            "options": OPTS3,
            "answer": "B",
            "reply": "<think>A?</think><answer>(B)</answer>",
        },
        {"id": "l2", "dimension": "Location", "options": OPTS3, "answer": "A", "reply": "C"},
        {"id": "d1", "dimension": "Dynamic", "options": OPTS4, "answer": "D", "reply": "\\boxed{D}"},
        {"id": "d2", "dimension": "Dynamic", "options": OPTS4, "answer": "A", "reply": "A or B"},
        {"id": "d3", "dimension": "Dynamic", "options": OPTS4, "answer": "A", "reply": "no idea"},
        {"id": "d4", "dimension": "Dynamic", "options": OPTS4, "answer": "D", "reply": "It goes up-left."},
    ]
    write_time(tmp_path, items)
    res = run_eval(cfg_for(tmp_path, ["time"], generation={"batch_size": 4}))
    t = res["benchmarks"]["time"]
    assert t["categories"]["Location"] == {
        "accuracy": 50.0,
        "correct": 1,
        "total": 2,
        "unanswered": 0,
        "ambiguous": 0,
        "chance": 33.3,
    }
    assert t["categories"]["Dynamic"] == {
        "accuracy": 50.0,
        "correct": 2,
        "total": 4,
        "unanswered": 1,
        "ambiguous": 1,
        "chance": 25.0,
    }
    assert t["overall"]["correct"] == 3 and t["overall"]["total"] == 6
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [it["id"] for it in items]
    assert {"id", "bench", "category", "prediction", "extracted", "answer", "correct"} <= set(preds[0])
    assert preds[3]["status"] == "ambiguous" and preds[4]["status"] == "unanswered"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| time | Location | 50.00 | 1 / 2 | 0 | 0 | 33.3 |" in report
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["config"]["generation"]["batch_size"] == 4 and saved["config"]["media"]["fps"] == 2.0
    assert saved["timing"]["new_samples"] == 6 and saved["timing"]["samples_per_s"] > 0


def test_kc_mmbench_tasks(tmp_path):
    write_kc(
        tmp_path,
        {
            "SPU.tsv": [
                {"id": 1, "answer": "是", "reply": "<think>两个商品……</think>是", "category": "服饰"},
                {"id": 2, "answer": "否", "reply": "是"},
                {"id": 3, "answer": "yes", "reply": "Yes"},
                {"id": 4, "answer": "是", "reply": "x", "image_path": "['v0/missing.jpg']"},
            ],
            "Video_Topic.tsv": [
                {"id": 1, "answer": "是_否_是", "reply": "[是, 否, 是]"},
                {"id": 2, "answer": "是_否", "reply": "[是, 是]"},
            ],
            "CPV.tsv": [{"id": 1, "answer": "红色", "reply": "红色。"}, {"id": 2, "answer": "长袖", "reply": "短袖"}],
        },
    )
    cfg = cfg_for(tmp_path, ["SPU", "hot_videos_aggregation", "cpv"])
    spu = get_benchmarks(["SPU"])[0]
    loaded = spu.load(data_root(spu, cfg), cfg)
    assert [s.answer for s in loaded.samples] == ["是", "否", "是"]
    assert len(loaded.skipped) == 1 and "missing" in loaded.skipped[0]
    video = loaded.samples[0].video
    assert isinstance(video, list) and all(Path(p).is_file() for p in video) and len(video) == 2
    text = spu.conversation(loaded.samples[0], cfg)[0]["content"][-1]["text"]
    assert text.endswith("\n" + YORN_INSTRUCTION + " /think")  # KC-MMBench's own mode: the published runs think

    res = run_eval(cfg)
    b = res["benchmarks"]
    assert b["SPU"]["overall"]["correct"] == 2 and b["SPU"]["overall"]["total"] == 3 and b["SPU"]["skipped_rows"] == 1
    assert set(b["SPU"]["categories"]) == {"服饰", "SPU"}
    assert b["Hot_Videos_Aggregation"]["overall"]["correct"] == 1
    assert b["CPV"]["overall"]["accuracy"] == 50.0 and "NO LLM judge" in b["CPV"]["scoring"]
    assert "NO LLM judge" in (tmp_path / "out" / "report.md").read_text()
    assert [x.name for x in get_benchmarks(["kc_mmbench"])] == [
        "CPV",
        "Hot_Videos_Aggregation",
        "Collection_Order",
        "Pornographic_Comment",
        "High_like",
        "SPU",
    ]


def test_videomme_preset_json(tmp_path):
    write_videomme(
        tmp_path,
        [
            {
                "id": "q1",
                "duration": "short",
                "options": ["cat", "dog", "cow", "ant"],
                "answer": "B",
                "reply": "B. dog",
            },
            {"id": "q2", "duration": "long", "options": ["cat", "dog", "cow", "ant"], "answer": "C", "reply": "ant"},
            {
                "id": "q3",
                "duration": "long",
                "options": ["a", "b", "c", "d"],
                "answer": "A",
                "reply": "A",
                "video": "nope",
            },
        ],
    )
    cfg = cfg_for(tmp_path, ["videomme"])
    res = run_eval(cfg)
    v = res["benchmarks"]["videomme"]
    assert v["categories"]["short"]["correct"] == 1 and v["categories"]["long"]["total"] == 1
    assert v["categories"]["long"]["correct"] == 0 and v["skipped_rows"] == 1
    # the same table through the generic loader with explicit column names
    generic = cfg_for(
        tmp_path,
        ["video_mcq"],
        out=str(tmp_path / "out2"),
        video_mcq={
            "file": "videomme.json",
            "id_key": "question_id",
            "video_key": "videoID",
            "video_ext": ".mp4",
            "video_root": "data",
            "category_key": "duration",
        },
    )
    assert run_eval(generic)["benchmarks"]["video_mcq"]["overall"]["correct"] == 1


def test_unknown_benchmark_and_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        get_benchmarks(["nope"])
    with pytest.raises(Exception, match="generation.batchsize"):
        from_dict(EvalConfig, {"generation": {"batchsize": 2}})


@pytest.mark.parametrize("name", ["default", "kc_mmbench", "time", "videomme"])
def test_shipped_eval_configs_load(name):
    from keye.typed_config import load_config

    cfg = load_config(EvalConfig, Path(__file__).resolve().parents[1] / "configs" / "eval" / f"{name}.yaml")
    assert cfg.generation.temperature == 0.0 and cfg.media.video_total_pixels == 65536 * 784
    get_benchmarks(cfg.benchmarks or ["time"])


def test_kc_mmbench_prompt_suffixes_match_the_reference():
    from eval.benchmarks.base import Sample
    from eval.benchmarks.kc_mmbench import SHORT_ANSWER_INSTRUCTION

    for bench in get_benchmarks(["kc_mmbench"]):
        sample = Sample(id="1", bench=bench.name, category="", kind=bench.task.kind, question="问题", answer="是")
        suffix = (
            YORN_INSTRUCTION if bench.name in ("Pornographic_Comment", "High_like", "SPU") else SHORT_ANSWER_INSTRUCTION
        )
        assert bench.prompt(sample) == "问题\n" + suffix, bench.name


def test_kc_mmbench_runs_in_think_mode_unless_the_run_sets_one():
    """The published KC-MMBench runs use /think; other benchmarks default to auto; a run's mode wins."""
    from eval.benchmarks.base import Sample

    kc = get_benchmarks(["kc_mmbench"])[0]
    other = get_benchmarks(["time"])[0]
    default = EvalConfig()
    sample = Sample(id="1", bench=kc.name, category="", kind=kc.task.kind, question="问题", answer="是")
    assert (kc.mode(default), other.mode(default)) == ("think", "auto")
    assert kc.conversation(sample, default)[-1]["content"][-1]["text"].endswith("/think")
    no_think = EvalConfig(mode="no_think")
    assert (kc.mode(no_think), other.mode(no_think)) == ("no_think", "no_think")
