"""SFT mix configs (cold-start proportions) and the response-fits-mode filter."""

from __future__ import annotations

import pytest

from keye.typed_config import ConfigError
from train.sft_mix import ModeFilter, filter_by_mode, load_mix


def _rec(source: str, reply, mode: str | None = None, media: str = "image") -> dict:
    rec = {
        "id": f"{source}-x",
        "source": source,
        "messages": [
            {"role": "user", "content": [{"type": media, media: "m"}, {"type": "text", "text": "Q?"}]},
            {"role": "assistant", "content": reply},
        ],
    }
    if mode:
        rec["mode"] = mode
    return rec


THYME = [
    {"type": "text", "text": "<think>zoom<code>x</code><sandbox_output>"},
    {"type": "image", "image": "crop.png"},
    {"type": "text", "text": "</sandbox_output>red.</think><answer>red</answer>"},
]


def test_cold_start_mix_has_the_published_proportions():
    mix = load_mix("configs/sft/cold_start.yaml")
    counts = {"non_thinking": 330, "thinking": 230, "auto_think": 20, "think_with_image": 100, "video": 104}
    total = sum(counts.values())
    for mode, share in mix.mode_proportions().items():
        assert share == pytest.approx(counts[mode] / total)
    assert mix.proportions()["video_thinking"] == pytest.approx(24 / total)
    assert [s["name"] for s in mix.data_sources()][:2] == ["non_reasoning", "reasoning"]
    tiny = load_mix("configs/sft/tiny.yaml")
    assert tiny.mode_proportions() == pytest.approx(mix.mode_proportions())
    assert {s.mode for s in tiny.sources} == set(counts)
    assert all(len(s.shards) == 1 and s.shards[0].startswith("shards/sft/") for s in tiny.sources)


def test_mix_rejects_bad_modes_and_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - {name: a, mode: thinkin, weight: 1}\n")
    with pytest.raises(ConfigError, match="thinkin"):
        load_mix(bad)
    bad.write_text("sources:\n  - {name: a, mode: thinking, wieght: 1}\n")
    with pytest.raises(ConfigError, match="wieght"):
        load_mix(bad)


def test_filter_keeps_fitting_samples_and_names_the_problem():
    good = [
        _rec("thinking", "<think>It is red.</think><answer>red</answer>", "think"),
        _rec("non_thinking", "red", "no_think"),
        _rec("auto_think", "<analysis>Easy.</analysis>red", "auto"),
        _rec("think_with_image", THYME, "think"),
        _rec("video", "<think>2 cuts.</think><answer>2</answer>", "think", media="video"),
        _rec("video", "2", "no_think", media="video"),
    ]
    assert [filter_by_mode(r) for r in good] == [None] * len(good)
    assert filter_by_mode(_rec("thinking", "red", "think")) == "thinking: think mode needs exactly one <think>, found 0"
    assert "must not contain <think>" in filter_by_mode(_rec("non_thinking", "<think>a</think><answer>b</answer>"))
    assert "disagrees" in filter_by_mode(_rec("thinking", "<think>a</think><answer>b</answer>", "no_think"))
    assert "no <code> round" in filter_by_mode(_rec("think_with_image", "<think>a</think><answer>b</answer>"))
    assert "no video" in filter_by_mode(_rec("video", "2", "no_think"))
    assert "auto mode must start" in filter_by_mode(_rec("auto_think", "red"))
    assert filter_by_mode({"messages": []}).startswith("unknown:")
    # the mix's mode wins over the record's source field
    assert filter_by_mode(_rec("other", "red", "no_think"), "non_thinking") is None


def test_mode_filter_counts_kept_and_dropped_per_reason():
    mix = load_mix("configs/sft/cold_start.yaml")
    keep = ModeFilter(mix)
    records = [
        (_rec("x", "<think>a</think><answer>b</answer>"), "reasoning"),
        (_rec("x", "b"), "reasoning"),
        (_rec("x", "b"), "reasoning"),
        (_rec("x", "b"), "non_reasoning"),
    ]
    assert [keep(r, source) for r, source in records] == [True, False, False, True]
    assert keep.counts["kept"] == 2 and keep.dropped == 2
    assert keep.counts["dropped/thinking: think mode needs exactly one <think>, found 0"] == 2
