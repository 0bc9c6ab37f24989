"""Stage 0 (``objective: siglip``): the sigmoid loss against a hand-written reference, and a short in-process run
that lowers the loss on a small overfit set, leaves the LLM and projector bit-identical and exports the text tower
beside the Keye checkpoint so that stage 0 can continue from it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests import train_helpers as th


def reference_loss(x: torch.Tensor, y: torch.Tensor, t: float, b: float) -> float:
    """-(1/n) Σ_i Σ_j log σ(z_ij (t·x_i·y_j + b)), z = +1 on the diagonal, written out term by term."""
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(y.shape[0]):
            z = 1.0 if i == j else -1.0
            logit = t * float(x[i] @ y[j]) + b
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return total / n


def test_sigmoid_loss_equals_the_reference_on_a_tiny_batch():
    from keye.modeling import KeyeVLForConditionalGeneration
    from tests.spine_fixtures import micro_config
    from train.config import SiglipConfig
    from train.siglip import build_tower, sigmoid_loss_sum

    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    scale, bias = torch.tensor([math.log(10.0)], dtype=torch.float64), torch.tensor([-10.0], dtype=torch.float64)
    got = sigmoid_loss_sum(x, y, 2, scale, bias) / 3  # image i matches text 2 + i (a later rank's slice)
    assert float(got) == pytest.approx(reference_loss(x, y[2:], 10.0, -10.0) + _off(x, y[:2], 10.0, -10.0), rel=1e-9)

    # the whole tower on 3 native-resolution images of different sizes: ViT → mean pool → head, text tower
    model = KeyeVLForConditionalGeneration(micro_config())
    from keye.processing import KeyeVLProcessor

    tok = KeyeVLProcessor().tokenizer
    sig = SiglipConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "projection_size": 16,
        },
        max_text_len=8,
    )
    tower = build_tower(model, sig, tok, seed=0)
    with torch.no_grad():
        tower.logit_scale.fill_(math.log(3.0))
        tower.logit_bias.fill_(-1.5)  # away from the init, where every term is ≈ 0 or ≈ 10
    grids = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 4, 2]])
    pixels = torch.randn(int(grids.prod(-1).sum()), 3 * 14 * 14)
    ids = torch.stack(
        [
            torch.tensor(tok(c, max_length=8, truncation=True, padding="max_length")["input_ids"])
            for c in ("a red square", "a blue circle", "green dots")
        ]
    )
    with torch.no_grad():
        loss = tower(pixels, grids, ids)
        xi, yj = tower.embed_images(pixels, grids).double(), tower.embed_texts(ids).double()
    assert float(loss) == pytest.approx(reference_loss(xi, yj, 3.0, -1.5), rel=1e-5)
    feats = tower.visual(pixels, grids)  # mean pooling is per image
    first = torch.nn.functional.normalize(tower.head(feats[:4].mean(0)), dim=-1)
    torch.testing.assert_close(first.detach(), tower.embed_images(pixels, grids)[0].detach().to(first.dtype))


def _off(x: torch.Tensor, y: torch.Tensor, t: float, b: float) -> float:
    """The negative-only terms of texts that match no image here (other ranks' captions), per image."""
    total = sum(-math.log(1.0 / (1.0 + math.exp(t * float(xi @ yj) + b))) for xi in x for yj in y)
    return total / x.shape[0]


@pytest.fixture
def in_process(fresh_process_group):
    """``run(config_path)``: a whole training run in this process (a process group of one), torn down after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched runs (OMP_NUM_THREADS=1): 2 shared cores, other work beside

    def run(config: Path) -> dict:
        from train.config import load_train_config
        from train.loop import run_training

        return run_training(load_train_config(config))

    yield run
    torch.set_num_threads(threads)


def test_stage0_run_lowers_the_loss_and_keeps_the_llm(tmp_path, in_process):
    from keye.cli.init import init_checkpoint
    from train.config import SiglipConfig
    from train.siglip import load_text_tower

    media = tmp_path / "media"
    media.mkdir()
    records = th.make_records(media, 4, 1, 1)  # four image pairs; the video and text records are skipped
    shards = th.write_shard_set(tmp_path, "pairs", records, media)
    init_checkpoint(tmp_path / "init", config=str(th.write_nano_model(tmp_path / "nano.yaml")), seed=0)
    cfg = th.run_config(tmp_path / "out", tmp_path / "nano.yaml", [str(shards)], objective="siglip", max_steps=12)
    cfg["model"] = {"path": "init"}
    cfg["output_dir"] = "out"
    cfg["paths"] = {"root": str(tmp_path)}  # model.path and output_dir relative to it
    cfg["freeze"] = ["projector", "llm"]
    cfg["optim"] = {"lr": 1e-2}
    cfg["checkpoint"] = {"every_steps": 6, "keep_last": 1, "export_hf": False}
    cfg["siglip"] = {
        "text_config": {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "projection_size": 16,
        },
        "batch_size": 4,
        "max_text_len": 12,
    }
    summary = in_process(th.write_config(tmp_path / "run.yaml", cfg))
    assert summary["step"] == 12
    losses = th.losses(tmp_path / "out")
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < 0.5 * losses[1], losses
    skipped = [r["samples_skipped"] for r in th.metrics(tmp_path / "out") if "samples_skipped" in r]
    assert skipped[-1] >= 2  # the video and the text record, every pass

    init, final = th.hf_state(tmp_path / "init"), th.hf_state(tmp_path / "out/hf")
    assert sorted(init) == sorted(final)
    kept = [k for k in init if not k.startswith("visual.")]
    assert kept and all(torch.equal(init[k], final[k]) for k in kept), "LLM or projector changed in stage 0"
    vit = [k for k in init if k.startswith("visual.")]
    assert any(not torch.equal(init[k], final[k]) for k in vit), "the ViT did not train"

    from keye.processing import KeyeVLProcessor

    sig = SiglipConfig(text_path=str(tmp_path / "out/hf/siglip"), max_text_len=12)
    text, tok, extra = load_text_tower(sig, KeyeVLProcessor().tokenizer, seed=0)
    assert sorted(extra) == ["head.bias", "head.weight", "logit_bias", "logit_scale"]
    assert float(extra["logit_bias"]) != -10.0 and tok.pad_token_id is not None
    assert text.config.hidden_size == 16


def test_record_filters_count_their_reasons_and_resume():
    """Stage 0 keeps single-image records with a caption; SFT runs (data.check_modes) drop replies that break
    their mode. Both count the drops per reason in the checkpointed state."""
    from train.data import RecordFilter, mode_rejection
    from train.siglip import pair_rejection

    def rec(i: int, source: str, reply: str, image: bool = True) -> tuple[dict, dict]:
        user = [{"type": "image", "image": "a.png"}] if image else []
        user.append({"type": "text", "text": "Q?"})
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return {"id": str(i), "source": source, "messages": msgs}, {}

    class Stream(list):
        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            pass

    samples = Stream(
        [
            rec(0, "thinking", "<think>a</think><answer>b</answer>"),
            rec(1, "thinking", "just an answer"),
            rec(2, "non_thinking", "<think>a</think>b"),
            rec(3, "non_thinking", "an answer", image=False),
        ]
    )
    modes = RecordFilter(samples, mode_rejection, "mode")
    assert [r["id"] for r, _ in modes] == ["0", "3"]
    assert len(modes.stats) == 2 and all(k.startswith("skipped_mode/") for k in modes.stats), modes.stats
    again = RecordFilter(samples, mode_rejection, "mode")
    again.load_state_dict(modes.state_dict())
    assert again.stats == modes.stats
    pairs = RecordFilter(samples, pair_rejection, "pair")
    assert [r["id"] for r, _ in pairs] == ["0", "1", "2"]
    assert dict(pairs.stats) == {"skipped_pair/0 images (a pair needs exactly one)": 1}
