"""``keye video-info``: JSON contract, human summary, per-file errors."""

from __future__ import annotations

import json

import pytest

from data_pipelines import synthetic
from keye.cli.main import main


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    return synthetic.scene_cuts(tmp_path_factory.mktemp("cli") / "v.mp4", every=20, num_frames=60, fps=10)


def test_json_lines_and_errors(video, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_text("nope")
    code = main(["video-info", video, str(bad), video, "--json", "--max-frames", "5"])
    out, err = capsys.readouterr()
    assert code == 1
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert len(lines) == 2
    rec = lines[0]
    assert list(rec) == [
        "path",
        "frames",
        "timestamps",
        "frame_types",
        "slow_hw",
        "fast_hw",
        "visual_tokens",
        "seconds",
    ]
    assert rec["path"] == video and len(rec["frames"]) == 5 and len(rec["timestamps"]) == 5
    assert rec["frames"] == sorted(rec["frames"]) and all(isinstance(i, int) for i in rec["frames"])
    assert rec["timestamps"][0] == 0.0 and rec["frame_types"][0] == 0
    slow, fast = rec["slow_hw"], rec["fast_hw"]
    n_fast = sum(rec["frame_types"])
    expect = (5 - n_fast) * (slow[0] // 28) * (slow[1] // 28) + n_fast * (fast[0] // 28) * (fast[1] // 28)
    assert rec["visual_tokens"] == expect and rec["seconds"] > 0
    assert err.count("\n") == 1 and "bad.mp4" in err and "corrupt" in err


def test_human_summary(video, capsys):
    assert main(["video-info", video, "--fps", "1"]) == 0
    out = capsys.readouterr().out
    assert "duration 6.00 s at 10.000 fps" in out and "sampled 6 frames" in out and "visual tokens" in out
