"""tools/bench_loader.py on two generated clips: sizes, lossy error, per-core rates and cores per GPU that add up."""

from __future__ import annotations

import json

from data_pipelines import synthetic
from tools.bench_loader import KINDS, main


def test_bench_loader_reports_every_kind(tmp_path, capsys):
    videos = tmp_path / "videos"
    synthetic.scene_cuts(videos / "a.mp4", every=10, num_frames=30, fps=10.0, height=224, width=320)
    synthetic.moving_shapes(videos / "b.mp4", seconds=2.0, fps=8.0, height=112, width=160)
    args = ["--videos", str(videos), "--workdir", str(tmp_path / "work"), "--passes", "1", "--seq", "2048"]
    assert main([*args, "--gpu-tokens-per-s", "10000"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| shards | bytes/sample |") and len(out) == 7
    result = json.loads(out[-1])
    assert result["clips"] == 2 and result["video_tokens"] == 1024
    rows = {r["kind"]: r for r in result["loading"]}
    assert list(rows) == list(KINDS)
    for r in rows.values():
        assert r["samples"] == 2 and r["dropped_samples"] == 0 and r["samples_per_core_s"] > 0
        assert r["cores_per_h100"] == round(10000 / r["delivered_tokens_per_core_s"], 2)
    # the same samples, however stored; lossy frames are the smallest frame shards and are not exact
    assert len({r["visual_tokens_per_sample"] for r in rows.values()}) == 1
    assert result["sizes"]["frames-jpeg"]["bytes_per_sample"] < result["sizes"]["frames"]["bytes_per_sample"]
    assert result["lossy_error"]["pixel_max_abs"] > 0 and result["lossy_error"]["patch_mean_abs"] > 0
