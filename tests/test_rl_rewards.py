"""Reward functions, the weighted combiner with Thyme's gating, and the judge hook (callable and local HTTP)."""

import json

import pytest

import keye.answers
from keye.typed_config import from_dict
from tests.judge_server import judge_server
from train.rl import rewards as R
from train.rl.rewards import (
    OpenAICompatibleJudge,
    RewardCombiner,
    RewardConfig,
    accuracy_reward,
    code_success_reward,
    format_penalty,
    format_reward,
    repetition_penalty,
    resolve_reward,
    thyme_reward,
)


def think(answer, thinking="reasoning"):
    return f"<think>{thinking}</think>\n<answer>{answer}</answer>"


@pytest.mark.parametrize(
    "completion,sample,expected",
    [
        (think("B"), {"solution": "<answer> B </answer>"}, 1.0),
        (think("The answer is (B)."), {"solution": "B"}, 1.0),
        (think("C"), {"solution": "B"}, 0.0),
        (think("blue whale"), {"solution": "B", "choices": ["orca", "blue whale"]}, 1.0),
        (think("orca"), {"solution": "B", "choices": ["orca", "blue whale"]}, 0.0),
        (think("1,000.5"), {"solution": "1000"}, 0.0),
        (think("1,000.5"), {"solution": "1000", "tolerance": 1e-3}, 1.0),
        (think("so \\boxed{\\frac{1}{2}}"), {"solution": "0.5"}, 1.0),
        (think("3/4"), {"solution": "0.75"}, 1.0),
        (think("x^2+1"), {"solution": "1+x^2"}, 1.0),
        (think(""), {"solution": "B"}, 0.0),
        ("no tags, final: \\boxed{12}", {"solution": "12"}, 1.0),
    ],
)
def test_accuracy_rules(completion, sample, expected):
    assert accuracy_reward(completion, sample) == expected


def test_clean_answer_strips_only_answer_phrases():
    assert R.clean_answer("<answer>The correct option is (C)</answer>") == "(C)"
    assert R.clean_answer("<answer>Answers vary by region</answer>") == "Answers vary by region"
    assert R.clean_answer("<answer>\\text{Paris}</answer>") == "Paris"


def test_accuracy_fallback_without_math_verify(monkeypatch):
    monkeypatch.setattr(keye.answers, "HAVE_MATH_VERIFY", False)
    assert accuracy_reward(think("\\boxed{\\frac{1}{2}}"), {"solution": "\\frac{1}{2}"}) == 1.0  # string rule
    assert accuracy_reward(think("3/4"), {"solution": "0.75"}) == 1.0  # number rule
    assert accuracy_reward(think("x^2+1"), {"solution": "1+x^2"}) == 0.0  # needs symbolic equivalence


def test_format_reward_follows_sample_mode():
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What? /no_think"}]}]
    assert format_reward("It is B.", {"messages": msgs}) == 1.0
    assert format_reward(think("B"), {"messages": msgs}) == 0.0
    assert format_reward(think("B"), {"mode": "think"}) == 1.0
    assert format_reward("B", {}) == 0.0  # no suffix: auto mode needs <analysis>
    assert format_penalty("B", {"mode": "auto"}) == -1.0
    assert format_penalty("<analysis>easy</analysis>B", {"mode": "auto"}) == 0.0


def test_repetition_penalty():
    assert repetition_penalty("The quick brown fox jumps over the lazy dog near the river bank today.", {}) == 0.0
    looped = "I will check the answer again. " * 40
    assert repetition_penalty(looped, {}) < -0.8
    assert repetition_penalty("我们来计算一下这个问题" * 30, {}) < -0.8  # CJK without spaces
    assert -1.0 <= repetition_penalty("a b c a b c a b c d", {}, ngram=2, threshold=0.1) < 0


def test_code_success_reward():
    ok = "<sandbox_output><image></sandbox_output>"
    bad = "<sandbox_output>Sandbox for 3: SyntaxError</sandbox_output>"
    assert code_success_reward(f"<think>{ok}{bad}{ok}</think>", {}) == pytest.approx(2 / 3)
    assert code_success_reward(think("B"), {}) == 0.0


def test_thyme_reward_with_callable_judge():
    calls = []

    def judge(prompt):
        calls.append(prompt)
        return 'Sure: {"Consistency": 1}' if "Consistency" in prompt else '{"Correctness": 0}'

    good = think("B", "long careful reasoning")
    assert thyme_reward(good, {"solution": "B"}) == 1.5  # no judge: no consistency term
    assert thyme_reward(good, {"solution": "B", "judge": judge}) == 2.0
    assert thyme_reward("B", {"solution": "B", "judge": judge}) == 1.0  # correct but wrong format
    calls.clear()
    assert thyme_reward(think("C"), {"solution": "B", "judge": judge}) == 0.5  # gated: wrong by rule, no cons
    assert calls == []  # a letter the rules read is decided: the judge is asked only what they cannot decide


def test_combiner_from_typed_config_with_gate_and_kwargs():
    cfg = from_dict(
        RewardConfig,
        {
            "terms": [
                {"fn": "train.rl.rewards:accuracy_reward", "weight": 1.0, "name": "acc"},
                {"fn": "format_reward", "weight": 0.5},
                {"fn": "code_success_reward", "weight": 0.2, "gated": True},
                {"fn": "repetition_penalty", "weight": 1.0, "kwargs": {"ngram": 2, "threshold": 0.0}},
            ],
            "gate": "acc",
        },
    )
    comb = RewardCombiner(cfg)
    code = "<think>x<code>c</code><sandbox_output>1</sandbox_output></think><answer>B</answer>"
    total, parts = comb(code, {"solution": "B", "mode": "think"})
    rep = repetition_penalty(code, {}, ngram=2, threshold=0.0)
    assert rep < 0 and repetition_penalty(code, {}) == 0.0  # the configured kwargs reached the function
    assert parts == {"acc": 1.0, "format_reward": 1.0, "code_success_reward": 1.0, "repetition_penalty": rep}
    assert total == pytest.approx(1.7 + rep)
    total, parts = comb(code.replace("B", "C"), {"solution": "B", "mode": "think"})
    assert parts["acc"] == 0.0 and parts["code_success_reward"] == 0.0  # gated off by accuracy
    assert total == pytest.approx(0.5 + rep)
    totals, cols = comb.score_batch([code, "x"], [{"solution": "B", "mode": "think"}] * 2)
    assert totals[0] == pytest.approx(1.7 + rep) and cols["format_reward"] == [1.0, 0.0]


def test_resolve_and_config_errors():
    assert resolve_reward("train.rl.rewards:thyme_reward") is thyme_reward
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        resolve_reward("train.rl.rewards:nope")
    with pytest.raises(ValueError, match="cannot import module"):
        resolve_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="gate: 'acc' is not one of"):
        RewardCombiner(RewardConfig(gate="acc"))
    with pytest.raises(ValueError, match="needs a judge"):
        R.consistency_reward(think("B"), {"solution": "B"})


def _grade(body: dict) -> str:
    verdict = 1 if "模型回答：forty-two" in body["messages"][0]["content"] else 0  # keye.judge.GRADE_PROMPT
    return json.dumps({"Correctness": verdict})


def test_openai_compatible_judge_over_local_http():
    cfg = {"terms": [{"fn": "accuracy_reward"}], "judge_url": "", "judge_model": "judge-7b"}
    with judge_server(_grade) as (url, seen):
        cfg["judge_url"] = url
        comb = RewardCombiner(from_dict(RewardConfig, cfg))
        assert isinstance(comb.judge, OpenAICompatibleJudge)
        total, _ = comb(think("forty-two"), {"solution": "42", "question": "6*7?"})
        assert total == 1.0  # rules fail ("forty-two" vs 42), the judge says correct
        total, _ = comb(think("forty-one"), {"solution": "42", "question": "6*7?"})
        assert total == 0.0
        assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["model"] == "judge-7b"
        assert seen[0]["temperature"] == 0.1
        seen.clear()
        assert comb(think("42"), {"solution": "42"})[0] == 1.0 and not seen  # rules first, judge unused
