"""The optional LLM judge: an OpenAI-compatible endpoint (a server this test starts) and a local engine."""

import json

from eval.config import EvalConfig
from eval.runner import run_eval
from keye.typed_config import from_dict
from tests.eval_fake_engine import write_kc
from tests.judge_server import judge_server


def _reply(body: dict) -> str:
    prompt = body["messages"][0]["content"]
    if "模型回答：红色" in prompt:
        # garbage first: the judge must retry, with a higher temperature
        return "回答正确" if body["temperature"] > 0 else "hmm"
    if "模型回答：" in prompt:
        return "回答错误"
    return "是"  # "which choice does the answer select"


def test_openai_judge_grades_vqa_and_rescues_unparseable(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret")
    write_kc(
        tmp_path,
        {
            "CPV.tsv": [{"id": 1, "answer": "红", "reply": "红色"}, {"id": 2, "answer": "长袖", "reply": "短袖"}],
            "SPU.tsv": [{"id": 1, "answer": "是", "reply": "这两个商品看起来一模一样"}],
        },
    )
    cfg = from_dict(
        EvalConfig,
        {
            "benchmarks": ["CPV", "SPU"],
            "data": str(tmp_path),
            "out": str(tmp_path / "out"),
            "progress": False,
            "engine": "tests.eval_fake_engine:make",
            "judge": {"kind": "openai", "url": "", "model": "judge-model", "api_key_env": "JUDGE_KEY"},
        },
    )
    with judge_server(_reply) as (url, reqs):
        cfg.judge.url = url
        res = run_eval(cfg)
    cpv, spu = res["benchmarks"]["CPV"], res["benchmarks"]["SPU"]
    assert cpv["overall"]["correct"] == 1 and cpv["judged_samples"] == 2 and "LLM judge" in cpv["scoring"]
    assert spu["overall"]["correct"] == 1 and spu["judged_samples"] == 1
    assert all(r["path"] == "/v1/chat/completions" and r["model"] == "judge-model" for r in reqs)
    assert reqs[0]["auth"] == "Bearer secret"
    retried = [r["temperature"] for r in reqs if "模型回答：红色" in r["messages"][0]["content"]]
    assert retried[0] == 0.0 and retried[1] > 0.0
    assert "judge: openai" in (tmp_path / "out" / "report.md").read_text()


def test_engine_judge_and_unreachable_endpoint(tmp_path, capsys):
    write_kc(
        tmp_path,
        {
            "CPV.tsv": [
                {"id": 1, "answer": "红", "reply": "红色", "named": {"a": "回答正确"}},
                {"id": 2, "answer": "长袖", "reply": "短袖", "named": {"a": "回答错误"}},
            ]
        },
    )
    base = {"benchmarks": ["CPV"], "data": str(tmp_path), "progress": False, "engine": "tests.eval_fake_engine:make"}
    cfg = from_dict(
        EvalConfig,
        {
            **base,
            "out": str(tmp_path / "o1"),
            "judge": {"kind": "engine", "engine": "tests.eval_fake_engine:make_judge_a"},
        },
    )
    assert run_eval(cfg)["benchmarks"]["CPV"]["overall"]["correct"] == 1
    dead = from_dict(
        EvalConfig,
        {
            **base,
            "out": str(tmp_path / "o2"),
            "judge": {"kind": "openai", "url": "http://127.0.0.1:9/v1", "timeout_s": 2},
        },
    )
    # A dead judge is counted, never turned silently into "wrong": per benchmark, in total and per record.
    res = run_eval(dead)
    cpv = res["benchmarks"]["CPV"]
    assert cpv["judge_failures"] == 2 and res["judge_failures"] == 2 and cpv["overall"]["correct"] == 0
    preds = [json.loads(line) for line in (tmp_path / "o2" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["judge_failed"] for p in preds)
    assert "judge failed to grade 2 answers" in capsys.readouterr().err
    assert "2 answers the judge failed to grade" in (tmp_path / "o2" / "report.md").read_text()
