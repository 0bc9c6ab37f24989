"""Progressive prompt hinting: hint placement, minimal-level search with a scripted model, resume, ladder building."""

import importlib.util
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from train.rl.hints import HintScheduler, build_ladders, hinted_messages, parse_ladder

LADDER = [f"hint-L{i}" for i in range(1, 6)]


def record(pid="p1", text="How many cubes? /think"):
    return {
        "id": pid,
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": text}],
        "hints": LADDER,
        "solution": "7",
    }


def test_hinted_messages_places_hint_before_mode_suffix_and_copies():
    rec = record()
    out = hinted_messages(rec["messages"], LADDER, 3)
    assert out[1]["content"] == "How many cubes?\n\nHint: hint-L3 /think"
    assert rec["messages"][1]["content"] == "How many cubes? /think"  # the record is not mutated
    plain = hinted_messages(rec["messages"], LADDER, 0)
    assert plain == rec["messages"] and plain is not rec["messages"]
    assert hinted_messages([{"role": "user", "content": "Q"}], LADDER, 1)[0]["content"] == "Q\n\nHint: hint-L1"


def test_hinted_messages_with_typed_content_and_errors():
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens? /no_think"}]}]
    out = hinted_messages(msgs, LADDER, 5)
    assert out[0]["content"][0] == {"type": "video"}
    assert out[0]["content"][1]["text"] == "What happens?\n\nHint: hint-L5 /no_think"
    only_image = [{"role": "user", "content": [{"type": "image"}]}]
    assert hinted_messages(only_image, LADDER, 2)[0]["content"][1] == {"type": "text", "text": "Hint: hint-L2"}
    with pytest.raises(ValueError, match="expected 0..5, got 6"):
        hinted_messages(msgs, LADDER, 6)
    with pytest.raises(ValueError, match="list of 5 hint strings"):
        hinted_messages(msgs, LADDER[:4], 2)
    with pytest.raises(ValueError, match="no user turn"):
        hinted_messages([{"role": "system", "content": "s"}], LADDER, 1)


class ScriptedModel:
    """Solves a prompt once the hint in its user turn is at least ``needed``; ``wins`` of k samples are right."""

    def __init__(self, needed, wins=1):
        self.needed, self.wins, self.calls = needed, wins, []

    def level_of(self, messages):
        text = messages[-1]["content"]
        return max([i for i in range(1, 6) if f"hint-L{i}" in text], default=0)

    def __call__(self, messages, k):
        level = self.level_of(messages)
        self.calls.append(level)
        ok = level >= self.needed[messages[-1]["content"].split("?")[0]]
        return ["7" if ok and j < self.wins else "3" for j in range(k)]


def verifier(completion, rec):
    return completion == rec["solution"]


def test_scheduler_picks_minimal_succeeding_level_and_counts():
    model = ScriptedModel({"How many cubes": 3})
    sched = HintScheduler(k=4)
    rec = record()
    assert sched.observe(rec, [False] * 8, model, verifier) == 3
    assert model.calls == [1, 2, 3]  # from L1 upwards, stopping at the first success
    assert sched.level_for(rec) == 3 and sched.level_for("p1") == 3
    assert "hint-L3" in sched.messages_for(rec)[-1]["content"]
    stats = sched.stats()
    assert stats["hint/probes_L1"] == 4 and stats["hint/pass_rate_L1"] == 0.0
    assert stats["hint/pass_rate_L3"] == pytest.approx(0.25) and stats["hint/prompts_L3"] == 1
    # a group that passes at the hinted level keeps it, without probing
    assert sched.observe(rec, [True, False], model, verifier) == 3 and len(model.calls) == 3
    # still failing at L3 (e.g. the model drifted): continue from L4
    model.needed["How many cubes"] = 4
    assert sched.observe(rec, [False] * 8, model, verifier) == 4 and model.calls[3:] == [4]


def test_min_passes_and_unsolvable_prompts():
    sched = HintScheduler(k=4, min_passes=2)
    model = ScriptedModel({"How many cubes": 2}, wins=1)  # only 1 of 4 right anywhere: never enough
    assert sched.observe(record(), [False] * 4, model, verifier) == 5
    assert sched.stats()["hint/unsolved"] == 1 and model.calls == [1, 2, 3, 4, 5]
    model2 = ScriptedModel({"How many cubes": 2}, wins=2)
    assert HintScheduler(k=4, min_passes=2).observe(record(), [False] * 4, model2, verifier) == 2


def test_level_is_lowered_when_solved_unhinted():
    model = ScriptedModel({"How many cubes": 4})
    sched = HintScheduler(k=2)
    rec = record()
    sched.observe(rec, [False] * 4, model, verifier)
    assert sched.level_for(rec) == 4
    model.needed["How many cubes"] = 2  # the model got better
    assert sched.reprobe(rec, model, verifier) == 2 and model.calls[-3:] == [0, 1, 2]
    model.needed["How many cubes"] = 0
    assert sched.reprobe(rec, model, verifier) == 0 and "p1" not in sched.levels
    sched.observe(rec, [False] * 4, ScriptedModel({"How many cubes": 1}), verifier)
    assert sched.level_for(rec) == 1
    assert sched.observe(rec, [True], model, verifier, level=0) == 0  # an unhinted pass forgets the level


def test_prompt_without_ladder_stays_unhinted():
    rec = record()
    del rec["hints"]
    model = ScriptedModel({"How many cubes": 1})
    assert HintScheduler().observe(rec, [False] * 4, model, verifier) == 0 and model.calls == []


def test_state_dict_round_trip_through_json():
    sched = HintScheduler(k=3)
    sched.observe(record("a", "A?"), [False], ScriptedModel({"A": 2}), verifier)
    sched.observe(record("b", "B?"), [False], ScriptedModel({"B": 9}), verifier)
    state = json.loads(json.dumps(sched.state_dict()))
    other = HintScheduler()
    other.load_state_dict(state)
    assert other.levels == {"a": 2, "b": 5} and other.k == 3
    assert other.stats() == sched.stats()
    with pytest.raises(KeyError, match="missing 'levels'"):
        HintScheduler().load_state_dict({"probes": []})


def test_parse_ladder_formats():
    js = json.dumps({f"L{i}": f"h{i}" for i in range(1, 6)})
    assert parse_ladder(js) == ["h1", "h2", "h3", "h4", "h5"]
    assert parse_ladder(f"<think>plan {{x}}</think>```json\n{js}\n```") == ["h1", "h2", "h3", "h4", "h5"]
    lines = "Here:\nL1: notice the\nsymmetry\n**L2**: count layers\nL3) use n^3\nL4. 2^3 = 8\nL5 - 8 - 1 = 7"
    assert parse_ladder(lines) == ["notice the\nsymmetry", "count layers", "use n^3", "2^3 = 8", "8 - 1 = 7"]
    with pytest.raises(ValueError, match="L4 steps"):
        parse_ladder('{"L1": "a", "L2": "b", "L3": "c", "L5": "e"}')


class ScriptedEngine:
    """Answers ladder requests; the first reply for ``bad_once`` prompts is unparsable."""

    def __init__(self, bad_once=(), bad_always=()):
        self.bad_once, self.bad_always, self.requests = set(bad_once), set(bad_always), []

    def generate(self, conversations, settings):
        out = []
        for conv in conversations:
            text = conv[-1]["content"]
            self.requests.append(text)
            key = text.split("Problem:\n")[1].split("\n")[0]
            if key in self.bad_always or key in self.bad_once:
                self.bad_once.discard(key)
                out.append("I cannot help.")
            else:
                out.append(json.dumps({f"L{i}": f"{key}-{i}" for i in range(1, 6)}))
        return out


def test_build_ladders_batches_retries_and_keeps_order():
    recs = [
        {"id": 1, "question": "q1", "solution": "s1"},
        {"id": 2, "question": "q2", "solution": "s2", "hints": ["x"] * 5},
        {
            "id": 3,
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q3"}]}],
            "solution": "s3",
        },
        {"id": 4, "question": "q4"},
        {"id": 5, "question": "q5", "solution": "s5"},
    ]
    engine = ScriptedEngine(bad_once={"q3"}, bad_always={"q5"})
    failures = []
    out = list(build_ladders(recs, engine, settings=None, batch_size=2, retries=1, failures=failures))
    assert [r["id"] for r in out] == [1, 2, 3, 4, 5]
    assert out[0]["hints"] == [f"q1-{i}" for i in range(1, 6)] and out[1]["hints"] == ["x"] * 5
    assert out[2]["hints"][0] == "q3-1" and "hints" not in out[3] and "hints" not in out[4]
    assert sorted(pid for pid, _ in failures) == ["4", "5"]
    assert "Reference solution:\ns1" in engine.requests[0]
    assert not any("q2" in r for r in engine.requests)


def test_build_hint_ladders_tool(tmp_path, monkeypatch):
    @dataclass
    class GenerationSettings:
        max_new_tokens: int = 16

    class ChatEngine(ScriptedEngine):
        @classmethod
        def from_pretrained(cls, model_dir):
            assert model_dir == "ckpt"
            return cls()

    fake = types.ModuleType("keye.inference")
    fake.ChatEngine, fake.GenerationSettings = ChatEngine, GenerationSettings
    monkeypatch.setitem(sys.modules, "keye.inference", fake)
    spec = importlib.util.spec_from_file_location(
        "build_hint_ladders", Path(__file__).parents[1] / "tools/build_hint_ladders.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps({"id": i, "question": f"q{i}", "solution": "s"}) for i in range(3)) + "\n")
    assert tool.main(["--input", str(src), "--output", str(dst), "--model", "ckpt", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["hints"][4] for r in rows] == ["q0-5", "q1-5", "q2-5"]
