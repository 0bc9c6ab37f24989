"""tools/bench_train.py --tiny: one CPU training step on a packed video row, with consistent FLOP accounting."""

from __future__ import annotations

import json

from keye.model_config import load_model_config
from tools.bench_train import TINY_SHAPE, main, video_row


def test_video_row_is_full_and_consistent():
    cfg = load_model_config("configs/model/tiny.yaml")
    row = video_row(cfg, 300, TINY_SHAPE)
    assert row.input_ids.shape == (1, 300) and int(row.cu_seqlens[-1]) == 300
    n_video = int((row.input_ids == cfg.video_token_id).sum())
    assert n_video == int(row.visual.video_grid_thw.prod(-1).sum()) // 4 > 0  # 2×2 merge
    assert row.num_samples >= 2  # videos plus the text top-up


def test_tiny_step_reports_tokens_and_mfu(capsys):
    assert main(["--tiny", "--seq", "256", "--steps", "1"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    r = json.loads(line)
    assert r["seq_len"] == 256 and r["device"] == "cpu" and r["attn"] == "sdpa" and r["ckpt"]
    assert r["tokens_per_s"] > 0 and r["step_ms"] > 0
    assert 0 < r["mfu_llm"] <= r["mfu_llm_vit"] and r["mfu_llm"] <= r["mfu_llm_anchor"]
    f = r["tflops_per_step"]
    assert f["lm_head"] < f["lm_head_all_tokens"] and f["vit_linear"] > 0
