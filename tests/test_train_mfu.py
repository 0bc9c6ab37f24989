"""Throughput and MFU (``train.metrics``): the model FLOPs of a step on a tiny config, exactly as counted by hand;
tokens/s and MFU from them for a given step time and peak; the peak's sources; and ``mfu_llm`` / ``mfu_llm_vit``
beside ``tokens_per_s`` in the metrics of a ``keye train`` run whose config sets ``logging.peak_tflops``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from data_pipelines.encoded import IGNORE_INDEX
from keye.loss import shift_labels
from keye.model_config import load_model_config
from keye.modeling import KeyeVLForConditionalGeneration
from tests import train_helpers as th
from train.metrics import flop_totals, param_count, peak_flops, rate_metrics, step_flops

V, H, L, HEADS, HEAD_DIM, FFN = 151936, 32, 2, 2, 16, 64  # train_helpers.NANO_MODEL's text config
# per decoder layer: q, o (H × heads·d), k, v (H × 1 kv head·d), q/k norms, gate/up/down, two RMSNorms; + final norm
BODY = L * (2 * H * HEADS * HEAD_DIM + 2 * H * HEAD_DIM + 2 * HEAD_DIM + 3 * H * FFN + 2 * H) + H


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    cfg = load_model_config(str(th.write_nano_model(tmp_path_factory.mktemp("nano") / "nano.yaml")))
    return KeyeVLForConditionalGeneration(cfg)


def _row():
    """Two packed samples (5 and 3 tokens, 3 + 2 labelled targets after the shift) and one 4×4-patch image."""
    labels = torch.full((1, 8), IGNORE_INDEX)
    labels[0, 2:5] = 1  # sample 1: targets at positions 1, 2, 3
    labels[0, 6:8] = 1  # sample 2: targets at positions 5, 6
    visual = SimpleNamespace(image_grid_thw=torch.tensor([[1, 4, 4]]), video_grid_thw=None)
    return SimpleNamespace(
        input_ids=torch.zeros(1, 8, dtype=torch.long), labels=labels, cu_seqlens=torch.tensor([0, 5, 8]), visual=visual
    )


def test_step_flops_and_mfu_equal_the_hand_count(nano):
    assert param_count(nano.model) - param_count(nano.model.embed_tokens) == BODY == 18656
    vit, proj = param_count(nano.visual), param_count(nano.mlp_AR)
    f = step_flops(nano, _row())
    assert f == {
        "llm_linear": 6.0 * BODY * 8,
        "lm_head": 6.0 * V * H * 5,
        "lm_head_all_tokens": 6.0 * V * H * 8,
        "llm_attention": 6.0 * L * HEADS * HEAD_DIM * (5**2 + 3**2),
        "vit_linear": 6.0 * vit * 16,
        "vit_attention": 12.0 * 1 * 32 * 16**2,  # one ViT layer of width 32, one frame of 16 patches
        "projector": 6.0 * proj * 16 / 4,
    }
    llm = 6 * BODY * 8 + 6 * V * H * 5 + 6 * L * HEADS * HEAD_DIM * 34
    assert llm == 146_767_104
    totals = flop_totals(f)
    assert totals["llm"] == llm and totals["llm_vit"] == llm + 6 * vit * 16 + 12 * 32 * 256 + 6 * proj * 4

    # two GPUs each ran this row in a 0.5 s step, at a peak of 1 TFLOP/s each
    both = {k: 2 * v for k, v in totals.items()}
    got = rate_metrics(16, both, 0.5, 2, 1e12)
    assert got["tokens_per_s"] == 32.0
    assert got["mfu_llm"] == pytest.approx(100 * llm / 0.5 / 1e12, rel=1e-12)  # 0.0293534208 %
    assert got["mfu_llm"] == pytest.approx(0.0293534208, rel=1e-12)
    assert got["mfu_llm_vit"] == pytest.approx(100 * totals["llm_vit"] / 0.5 / 1e12, rel=1e-12)
    assert rate_metrics(16, both, 0.5, 2, None) == {"tokens_per_s": 32.0}  # no peak known: no MFU


def test_sequence_parallel_slices_sum_to_the_row(nano):
    row = _row()
    targets = shift_labels(row.labels, row.cu_seqlens)
    whole = step_flops(nano, row)
    halves = [
        step_flops(
            nano,
            SimpleNamespace(
                **{**vars(row), "input_ids": row.input_ids[:, s], "sp_size": 2}, shift_labels=targets[:, s]
            ),
        )
        for s in (slice(0, 4), slice(4, 8))
    ]
    for key, value in whole.items():
        assert halves[0][key] + halves[1][key] == pytest.approx(value, rel=1e-12), key


def test_zero3_partitioned_parameters_count_at_full_size():
    module = torch.nn.Linear(4, 4)
    module.weight.ds_numel = 1000  # what DeepSpeed ZeRO-3 sets on a partitioned parameter (whose numel() is 0)
    assert param_count(module) == 1000 + 4


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA L4", None),
    ],
)
def test_peak_from_the_gpu_name_unless_configured(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    assert peak_flops(None, cuda) == peak
    assert peak_flops(500.0, cuda) == 500e12
    assert peak_flops(None, torch.device("cpu")) is None and peak_flops(2.5, torch.device("cpu")) == 2.5e12


@pytest.mark.slow
def test_keye_train_logs_tokens_per_s_and_mfu_with_a_configured_peak(tmp_path, fresh_process_group):
    from keye.cli.main import main as keye_main

    media = tmp_path / "media"
    media.mkdir()
    shards = th.write_shard_set(tmp_path, "d", th.make_records(media, 2, 0, 2), media)
    out = tmp_path / "out"
    cfg = th.run_config(out, th.write_nano_model(tmp_path / "nano.yaml"), [str(shards)], max_steps=2)
    cfg["distributed"]["zero_stage"] = 3  # partitioned parameters: counted at their full size
    config = th.write_config(tmp_path / "run.yaml", cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert keye_main(["train", str(config), "logging.peak_tflops=0.001"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [r for r in th.metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu_llm"] < r["mfu_llm_vit"], r
        # MFU / tokens/s is the step's model FLOPs per token (÷ peak): at least the LLM body's 6·N per token
        assert r["mfu_llm"] / 100 * 1e9 / r["tokens_per_s"] > 6 * BODY
