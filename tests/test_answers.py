"""One answer checker: eval's score on a set of outputs equals the mean RL accuracy reward on the same outputs.

The table is real-looking model output in English and Chinese, with and without <think>, <analysis>, <answer> and
\\boxed{}; eval scores it through the whole harness (loaders, fake engine, predictions.jsonl, results.json), the
reward through ``accuracy_reward`` on RL records carrying the same truth.
"""

import json

import pytest

from eval.config import EvalConfig
from eval.runner import run_eval
from keye.answers import AMBIGUOUS, OK, Check, check_answer, extract_yes_no_list, match_yes_no
from keye.judge import CallableJudge
from keye.typed_config import from_dict
from tests.eval_fake_engine import write_kc, write_time
from train.rl.rewards import RewardCombiner, RewardConfig, RewardTerm, accuracy_reward

OPTS4 = ["up", "down", "left", "up-left"]

# (reply, gold, correct by the rules): the expected verdicts pin the rules, the agreement test pins eval == RL.
MCQ = [
    ("<answer>答案是B</answer>", "B", True),
    ("<answer>I think B</answer>", "B", True),
    ("<think>可能是A，也可能是C……再看一遍，箭头向下。</think><answer>(B)</answer>", "B", True),
    ("<analysis>This is easy.</analysis>The answer is B.", "B", True),
    ("<think>The arrow points down.</think>\n<answer>\\boxed{B}</answer>", "B", True),
    ("It moves down.", "B", True),
    ("<answer>D. up-left</answer>", "D", True),
    ("A or B", "B", False),
    ("选C", "B", False),
    ("<think>the reasoning was cut off before any answer", "B", False),
    ("", "A", False),
]
YES_NO = [
    ("<think>两个商品的颜色和款式一致……</think>是", "是", True),
    ("否", "是", False),
    ("Yes.", "是", True),
    ("<analysis>简单</analysis>不是", "否", True),
    ("该评论没有色情内容，是正常评论", "否", False),  # no conclusion: ambiguous, a judge decides it
    ("结论：否。该评论只是普通的调侃", "否", True),
    ("<answer>\\boxed{否}</answer>", "否", True),
    ("是，这两个视频是同款商品", "是", True),
    ("<think>点赞数很高吗？</think><answer>No, the like count is ordinary.</answer>", "否", True),
    ("", "是", False),
]
LISTS = [
    ("[是, 否, 是]", "是_否_是", True),
    ("<think>第一个视频……第三个视频……</think>结论：是，否，是", "是_否_是", True),
    ("【否，否】", "否_否", True),
    ("<answer>是_是</answer>", "是_否", False),
    ("第二个视频和第一个相同", "是_否", False),
]
VQA = [
    ("红色。", "红色", True),
    ("<think>衣服是红色的</think><answer>红色</answer>", "红色", True),
    ("短袖", "长袖", False),
    ("<answer>答案是：长袖</answer>", "长袖", True),
    ("<think>数一数</think>The answer is 3.", "3", True),
    ("<answer>第\\boxed{2}集</answer>", "2", True),
    ("<answer>第2集和第3集</answer>", "2", False),
    ("", "红色", False),
]


def _write(tmp_path):
    write_time(
        tmp_path / "time",
        [
            {"id": f"m{i}", "dimension": "Dynamic", "options": OPTS4, "answer": g, "reply": r}
            for i, (r, g, _) in enumerate(MCQ)
        ],
    )
    kc = {
        "SPU.tsv": [{"id": i, "answer": g, "reply": r} for i, (r, g, _) in enumerate(YES_NO)],
        "Video_Topic.tsv": [{"id": i, "answer": g, "reply": r} for i, (r, g, _) in enumerate(LISTS)],
        "CPV.tsv": [{"id": i, "answer": g, "reply": r} for i, (r, g, _) in enumerate(VQA)],
    }
    write_kc(tmp_path / "kc_mmbench", kc)


TABLES = {"time": (MCQ, OPTS4), "SPU": (YES_NO, []), "Hot_Videos_Aggregation": (LISTS, []), "CPV": (VQA, [])}


def test_eval_score_equals_mean_accuracy_reward(tmp_path):
    _write(tmp_path)
    cfg = {
        "benchmarks": ["time", "SPU", "Hot_Videos_Aggregation", "CPV"],
        "data": str(tmp_path),
        "out": str(tmp_path / "out"),
        "engine": "tests.eval_fake_engine:make",
        "progress": False,
    }
    results = run_eval(from_dict(EvalConfig, cfg))
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    for bench, (table, options) in TABLES.items():
        records = {p["id"]: p for p in preds if p["bench"] == bench}
        rewards = []
        for i, (reply, gold, expected) in enumerate(table):
            sid = f"m{i}" if bench == "time" else str(i)
            reward = accuracy_reward(reply, {"solution": gold, "choices": options, "question": "q"})
            assert records[sid]["prediction"] == reply
            assert (records[sid]["correct"], reward) == (expected, float(expected)), (bench, reply)
            rewards.append(reward)
        mean_reward = 100.0 * sum(rewards) / len(rewards)
        assert results["benchmarks"][bench]["overall"]["accuracy"] == pytest.approx(mean_reward, abs=0.01), bench
        assert results["benchmarks"][bench]["judge_failures"] == 0


def _fake_judge(prompt: str) -> str:
    """Grades by keyword; picks 否 for a yes/no text that says 没有 (no), as a real judge reads the conclusion."""
    if "Which of these choices" in prompt:
        return "否" if "没有" in prompt else "NONE"
    return "回答正确" if "模型回答：crimson" in prompt or "模型回答：是，否" in prompt else "回答错误"


@pytest.mark.parametrize(
    "reply, gold, kind, options",
    [
        ("该评论没有色情内容，是正常评论", "否", "yes_no", []),
        ("<answer>crimson</answer>", "红色", "text", []),
        ("<answer>cobalt</answer>", "红色", "text", []),
        ("I cannot tell which one.", "B", "mcq", OPTS4),
        ("三个视频分别是：是，否", "是_否_是", "yes_no_list", []),
        ("是", "是", "yes_no", []),
    ],
)
def test_judge_path_agrees_between_eval_and_reward(reply, gold, kind, options):
    eval_judge, rl = CallableJudge(_fake_judge), RewardCombiner(RewardConfig(terms=[RewardTerm()]), judge=_fake_judge)
    check = check_answer(reply, gold, kind, options=options, question="q", judge=eval_judge)
    _, parts = rl(reply, {"solution": gold, "choices": options, "answer_kind": kind, "question": "q"})
    assert parts["accuracy_reward"] == float(check.correct)
    assert eval_judge.failures == rl.take_judge_failures() == 0


def test_judge_failures_are_counted_not_silent():
    def broken(prompt: str) -> str:
        raise OSError("connection refused")

    rl = RewardCombiner(RewardConfig(terms=[RewardTerm()]), judge=broken)
    sample = {"solution": "红色", "question": "q"}
    assert rl("<answer>crimson</answer>", sample)[0] == 0.0
    assert rl("<answer>红色</answer>", sample)[0] == 1.0  # decided by the rules: the judge is not asked
    assert rl.take_judge_failures() == 1 and rl.take_judge_failures() == 0
    check = check_answer("<answer>crimson</answer>", "红色", "text", judge=CallableJudge(broken))
    assert check == Check(check.extracted, False, "judge", True)


def test_conclusion_not_substring():
    assert (match_yes_no("该评论没有色情内容，是正常评论").status, match_yes_no("答案是否").value) == (AMBIGUOUS, "否")
    assert match_yes_no("回答：是的，是同一个商品").value == "是"
    assert match_yes_no("The answer is no.").value == "否"
    got = extract_yes_no_list("<think>看三个视频</think>结论：是，否，是")
    assert (got.status, got.value) == (OK, "是_否_是")
    assert extract_yes_no_list("结论：是，不是").value == "是_否"
