"""GPU checks, run by ``tools/gpu_check.sh`` (``pytest -m gpu``): the bf16 path against fp32 and the CPU, the
varlen CUDA attention kernel against SDPA, greedy decoding, the chunked loss's memory, and one-GPU DeepSpeed
training (NCCL, bf16) under ZeRO-2 and ZeRO-3 that lowers the loss and resumes bit-identically.

Without a GPU they are skipped, except in the GPU check's dry run (``KEYE_GPU_DRY_RUN=1``), which runs the same
code on the CPU (fp32, SDPA) so that it cannot rot between GPU sessions; comparisons that need a GPU then compare
the CPU with itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from data_pipelines.packing import pack_row
from keye.attention import resolve_backend
from keye.configuration import KeyeVLConfig
from keye.modeling import KeyeVLForConditionalGeneration
from tests import train_helpers as th
from tests.spine_fixtures import micro_config, random_clip, random_image

pytestmark = pytest.mark.gpu


def gpu_config() -> KeyeVLConfig:
    """Small, but with head sizes the CUDA varlen kernels take (64), and the real vocabulary."""
    return micro_config(
        text=dict(hidden_size=256, intermediate_size=512, head_dim=64),
        vision=dict(hidden_size=128, intermediate_size=256),
        mrope_section=[8, 12, 12],
    )


@pytest.fixture(scope="module")
def processor():
    from keye.processing import KeyeVLProcessor

    return KeyeVLProcessor()


def _chat(items: list, answer: str) -> list[dict]:
    return [{"role": "user", "content": items}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def packed_row(processor):
    """One packed row of a text, an image and a Slow-Fast video sample (labels on the answers)."""
    convs = [
        _chat([{"type": "text", "text": "Say something."}], "Something short and plain."),
        _chat([{"type": "image", "image": random_image(112, 168)}, {"type": "text", "text": "What?"}], "Noise."),
        _chat(
            [
                {"type": "video", "video": random_clip(4, slow_hw=(56, 84), fast_hw=(28, 56))},
                {"type": "text", "text": "?"},
            ],
            "Frames of noise, some slow and some fast.",
        ),
    ]
    samples = [processor.encode_conversation(c) for c in convs]
    return pack_row(samples, sum(len(s) for s in samples) + 7)  # + a padding segment


def _model(dtype: torch.dtype, device: torch.device) -> KeyeVLForConditionalGeneration:
    torch.manual_seed(0)
    return KeyeVLForConditionalGeneration(gpu_config()).to(device=device, dtype=dtype)


def _step(model, row, backend: str):
    """Loss, logits and parameter gradients of one forward + backward on ``row`` with attention ``backend``."""
    model.config.attn_backend = backend
    model.zero_grad(set_to_none=True)
    device, dtype = model.device, model.dtype
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in row.model_inputs().items()}
    for key in ("pixel_values", "pixel_values_videos"):
        inputs[key] = inputs[key].to(dtype)
    loss = model(**inputs).loss
    loss.backward()
    inputs.pop("labels")
    with torch.no_grad():
        logits = model(**inputs).logits
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float().cpu(), logits.float().cpu(), grads


def _no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_bf16_varlen_kernel_matches_sdpa_on_packed_image_video_rows(gpu, packed_row):
    """bf16, same weights: the CUDA varlen kernel (what ``auto`` picks on a GPU) against block-diagonal SDPA.

    Tolerances (bf16 has an 8-bit mantissa; both sides round differently inside attention): loss within 1 %
    relative, logits within 0.1 absolute (|logits| ~ 1), every gradient tensor with cosine similarity ≥ 0.99.
    """
    dtype = torch.bfloat16 if gpu.type == "cuda" else torch.float32
    backend = resolve_backend("auto", gpu, dtype)
    if gpu.type == "cuda":
        assert backend in ("torch_varlen", "flash_attn"), f"auto picked {backend} on a GPU in bf16"
    model = _model(dtype, gpu)
    loss_k, logits_k, grads_k = _step(model, packed_row, backend)
    loss_s, logits_s, grads_s = _step(model, packed_row, "sdpa")
    assert torch.isfinite(loss_k) and abs(loss_k - loss_s) <= 0.01 * abs(loss_s)
    assert (logits_k - logits_s).abs().max() <= 0.1
    assert grads_k.keys() == grads_s.keys() and len(grads_k) > 20
    for name, g in grads_k.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), grads_s[name].flatten(), dim=0)
        assert cos >= 0.99 or g.abs().max() == grads_s[name].abs().max() == 0, (name, float(cos))


def test_fp32_on_the_gpu_matches_the_cpu(gpu, packed_row):
    """fp32 with TF32 off, SDPA on both: GPU loss, logits and gradients equal the CPU's to float32 rounding
    (loss 1e-5 relative; logits 1e-4 absolute; gradients 1e-4 absolute + 1e-3 relative)."""
    _no_tf32()
    loss_c, logits_c, grads_c = _step(_model(torch.float32, torch.device("cpu")), packed_row, "sdpa")
    loss_g, logits_g, grads_g = _step(_model(torch.float32, gpu), packed_row, "sdpa")
    torch.testing.assert_close(loss_g, loss_c, rtol=1e-5, atol=0)
    torch.testing.assert_close(logits_g, logits_c, rtol=0, atol=1e-4)
    assert grads_g.keys() == grads_c.keys()
    for name in grads_c:
        torch.testing.assert_close(grads_g[name], grads_c[name], rtol=1e-3, atol=1e-4, msg=name)


def test_greedy_generation_on_the_gpu_equals_the_cpu(gpu, processor):
    """fp32, TF32 off: the same 12 greedy tokens for an image prompt and a video prompt, batched (left padding)."""
    _no_tf32()
    convs = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": random_image(56, 84)}, {"type": "text", "text": "?"}],
            }
        ],
        [{"role": "user", "content": [{"type": "video", "video": random_clip()}, {"type": "text", "text": "Why?"}]}],
    ]
    batch = processor(convs)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=151643, eos_token_id=None)
    outs = []
    for device in (torch.device("cpu"), gpu):
        model = _model(torch.float32, device).eval()
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        with torch.no_grad():
            outs.append(model.generate(**inputs, **kw).cpu())
    assert torch.equal(outs[0], outs[1])


def test_a_long_row_never_holds_its_full_logits(gpu):
    """The chunked loss projects a few thousand positions at a time: an 8K-token row's fp32 logits would be
    8192 × 151936 × 4 B = 5.0 GB; the whole training step of this small model stays under 1.5 GB."""
    length = 8192 if gpu.type == "cuda" else 512
    model = _model(torch.bfloat16 if gpu.type == "cuda" else torch.float32, gpu)
    ids = torch.randint(0, 150_000, (1, length), device=gpu)
    if gpu.type == "cuda":
        torch.cuda.reset_peak_memory_stats(gpu)
    model(input_ids=ids, labels=ids).loss.backward()
    if gpu.type == "cuda":
        peak = torch.cuda.max_memory_allocated(gpu)
        assert peak < 1.5e9, f"peak {peak / 1e9:.2f} GB"


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    """Image, video and text shards and an initial checkpoint of the nano model."""
    from keye.cli.init import init_checkpoint

    root = tmp_path_factory.mktemp("gpu_train")
    media = root / "media"
    media.mkdir()
    shards = th.write_shard_set(root, "mix", th.make_records(media, 3, 2, 5), media)
    init_checkpoint(root / "init", config=str(th.write_nano_model(root / "nano.yaml")), seed=0)
    return root, shards


STEPS = 6


def _train_config(root: Path, shards: Path, name: str, stage: int) -> Path:
    cfg = th.run_config(root / name, root / "nano.yaml", [str(shards)])
    cfg["model"] = {"path": str(root / "init")}
    cfg["data"].update(max_seq_len=96, lookahead=1, shuffle=False)
    cfg["max_steps"] = STEPS
    cfg["optim"]["lr"] = 1e-2
    cfg["distributed"].update(zero_stage=stage, deterministic=True)  # precision auto: bf16 on a GPU
    cfg["checkpoint"].update(every_steps=3, export_hf=True)
    return th.write_config(root / f"{name}.yaml", cfg)


@pytest.mark.parametrize("stage", [2, 3])
def test_one_gpu_training_lowers_the_loss_and_resumes_bit_identically(train_setup, stage):
    root, shards = train_setup
    ref = root / f"z{stage}"
    out = th.run(_train_config(root, shards, ref.name, stage), nproc=1, timeout=240)
    losses = th.losses(ref)
    assert sorted(losses) == list(range(1, STEPS + 1)), out[-2000:]
    assert sum(losses[s] for s in (5, 6)) < sum(losses[s] for s in (1, 2)), losses
    assert (ref / "hf" / "config.json").is_file()

    resumed = root / f"z{stage}_resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints/step_00000003", resumed / "checkpoints/step_00000003")
    th.run(_train_config(root, shards, resumed.name, stage), nproc=1, timeout=240)
    got = th.losses(resumed)
    assert sorted(got) == [4, 5, 6] and all(got[s] == losses[s] for s in got), (got, losses)
    a, b = th.hf_state(resumed / "hf"), th.hf_state(ref / "hf")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
