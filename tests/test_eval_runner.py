"""The runner: resume after a kill, torchrun sharding == one process, per-sample engine errors, CLI, config pinning."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.config import EvalConfig
from eval.runner import run_eval
from keye.cli.main import main as keye_main
from keye.typed_config import ConfigError, from_dict
from tests.eval_fake_engine import FakeEngine, write_kc, write_time

REPO = Path(__file__).resolve().parents[1]
OPTS4 = ["up", "down", "left", "up-left"]


def time_items(n: int) -> list[dict]:
    dims = ["Dynamic", "Order", "Reasoning"]
    return [
        {
            "id": f"s{i:02d}",
            "dimension": dims[i % 3],
            "options": OPTS4,
            "answer": "ABCD"[i % 4],
            "reply": "ABCD"[i % 4] if i % 3 else "<think>hmm</think>(A)",
        }
        for i in range(n)
    ]


def env(**extra: str) -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **extra)
    e.pop("WORLD_SIZE", None)
    e.pop("RANK", None)
    return e


def eval_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "eval",
        "--bench",
        "time,SPU",
        "--data",
        str(data),
        "--out",
        str(out),
        "engine=tests.eval_fake_engine:make",
        "generation.batch_size=2",
        "progress=false",
        *extra,
    ]


def make_data(tmp: Path, n: int = 9) -> Path:
    write_time(tmp / "time", time_items(n))
    write_kc(tmp / "kc", {"SPU.tsv": [{"id": i, "answer": "是否"[i % 2], "reply": "是"} for i in range(3)]})
    return tmp


def stable(results: dict) -> dict:
    """Results without what legitimately differs between runs (timing, output directory)."""
    r = json.loads(json.dumps(results))
    r.pop("timing")
    r["config"].pop("out")
    return r


def test_resume_after_kill_loses_nothing(tmp_path):
    data = make_data(tmp_path)
    out = tmp_path / "out"
    extra = ["data_paths.kc_mmbench=" + str(data / "kc")]
    killed = subprocess.run(
        [sys.executable, *eval_cmd(data, out, *extra)],
        cwd=REPO,
        env=env(EVAL_FAKE_KILL_AFTER="4"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode != 0
    first = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(first) == 2  # batches of 2: the batch in flight at the kill (samples 3-4) was never returned
    assert not (out / "results.json").exists()

    done = subprocess.run(
        [sys.executable, *eval_cmd(data, out, *extra)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["timing"]["new_samples"] == 12 - 2  # the two from before the kill were not redone
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [f"s{i:02d}" for i in range(9)] + ["0", "1", "2"]
    assert preds[:2] == first
    assert results["benchmarks"]["time"]["overall"]["correct"] == 9 - 3 + 1  # every third answers (A) to a non-A item
    assert results["benchmarks"]["SPU"]["overall"]["correct"] == 2


@pytest.mark.slow
def test_torchrun_two_ranks_equal_single_process(tmp_path):
    data = make_data(tmp_path, n=7)
    extra = ["data_paths.kc_mmbench=" + str(data / "kc")]
    single = subprocess.run(
        [sys.executable, *eval_cmd(data, tmp_path / "one", *extra)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            *eval_cmd(data, tmp_path / "two", *extra)[1:],
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "predictions.jsonl").read_text() == (two / "predictions.jsonl").read_text()
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert stable(r1) == stable(r2)
    assert r2["timing"]["world_size"] == 2 and r2["timing"]["new_samples"] == 10
    assert not list(two.glob("predictions.rank*.jsonl"))


def test_engine_error_is_counted_not_fatal_and_retried(tmp_path):
    write_time(tmp_path, time_items(5))
    base = {
        "benchmarks": ["time"],
        "data": str(tmp_path),
        "out": str(tmp_path / "out"),
        "progress": False,
        "generation": {"batch_size": 3},
    }
    cfg = from_dict(EvalConfig, base)
    res = run_eval(cfg, engine=FakeEngine(fail_ids=["s01"]))
    t = res["benchmarks"]["time"]
    assert t["errors"] == 1 and t["error_samples"][0]["id"] == "s01" and "cannot read" in t["error_samples"][0]["error"]
    assert t["overall"]["total"] == 4
    engine = FakeEngine()
    res = run_eval(cfg, engine=engine)  # the rerun retries only the failed sample
    assert [len(c) for c in engine.calls] == [1] and res["benchmarks"]["time"]["overall"]["total"] == 5
    assert engine.settings[0].temperature == 0.0 and engine.settings[0].max_new_tokens == 2048
    with pytest.raises(ConfigError, match="different settings \\(mode\\)"):
        run_eval(from_dict(EvalConfig, {**base, "mode": "think"}), engine=FakeEngine())
    with pytest.raises(RuntimeError, match="every sample failed"):
        run_eval(
            from_dict(EvalConfig, {**base, "out": str(tmp_path / "o2")}),
            engine=FakeEngine(fail_ids=[f"s{i:02d}" for i in range(5)]),
        )


def test_keye_eval_cli(tmp_path, capsys):
    write_time(tmp_path, time_items(6))
    out = tmp_path / "out"
    rc = keye_main(
        [
            "eval",
            "--bench",
            "time",
            "--data",
            str(tmp_path),
            "--out",
            str(out),
            "--limit",
            "4",
            "--mode",
            "no_think",
            "engine=tests.eval_fake_engine:make",
            "progress=false",
        ]
    )
    assert rc == 0
    assert "time: 75.00 (3/4)" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["mode"] == "no_think" and results["config"]["limit"] == 4
    rc = keye_main(
        ["eval", "--bench", "time", "--data", str(tmp_path), "--out", str(tmp_path / "o2"), "engine=nomodule:make"]
    )
    assert rc == 1 and "cannot import module 'nomodule'" in capsys.readouterr().err


def test_generation_settings_come_from_eval_and_rollout_configs():
    from eval.config import GenerationConfig
    from eval.engine import settings_for
    from keye.inference import GenerationSettings
    from train.rl.config import RolloutConfig

    cfg = from_dict(EvalConfig, {"generation": {"max_new_tokens": 7, "temperature": 0.5, "top_k": 3}}, "test")
    assert settings_for(cfg) == GenerationSettings(max_new_tokens=7, temperature=0.5, top_p=1.0, top_k=3)
    judge = GenerationConfig(max_new_tokens=9, repetition_penalty=1.1)
    assert settings_for(cfg, judge) == GenerationSettings(max_new_tokens=9, top_k=1, repetition_penalty=1.1)
    rollout = GenerationSettings.from_config(RolloutConfig(top_p=0.8), seed=5)
    assert rollout == GenerationSettings(max_new_tokens=3072, temperature=1.0, top_p=0.8, top_k=50, seed=5)


def test_a_torn_last_line_then_a_second_kill_loses_nothing(tmp_path):
    """A kill mid-write leaves a fragment; the rerun must not glue its first record onto it (and lose it) even when
    it is killed in turn."""
    data = make_data(tmp_path)
    out = tmp_path / "out"
    extra = ["data_paths.kc_mmbench=" + str(data / "kc")]
    run = [sys.executable, *eval_cmd(data, out, *extra)]
    kill_after_4 = env(EVAL_FAKE_KILL_AFTER="4")
    subprocess.run(run, cwd=REPO, env=kill_after_4, capture_output=True, text=True, timeout=120)
    with (out / "predictions.jsonl").open("a") as fh:
        fh.write('{"bench": "time", "id": "s02", "resp')  # the kill came mid-line
    again = subprocess.run(run, cwd=REPO, env=kill_after_4, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["s00", "s01", "s02", "s03"]
    done = subprocess.run(run, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "results.json").read_text())["timing"]["new_samples"] == 12 - 4
