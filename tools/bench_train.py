#!/usr/bin/env python
"""Training-step benchmark: tokens/s and MFU of a Keye model on packed video rows (one GPU, no DeepSpeed).

    python tools/bench_train.py [--config configs/model/keye_1_7b.yaml] [--seq 8192 32768] [--attn auto]
    python tools/bench_train.py --tiny          # CPU smoke check: tiny config, short rows, one step

Each row is packed like the trainer's: synthetic Keye-1.5 video samples (text prompt, ``<|vision_start|>``, per frame
``<|frame|>`` + a timestamp + its ``<|video_pad|>`` tokens, fast frames wrapped in ``<|fast_start|>…<|fast_end|>``,
``<|vision_end|>``, a labelled answer), topped up with one text sample so the row holds no padding. The step is
the model's own forward (ViT on every frame, varlen attention within samples, chunked cross-entropy over the label
tokens), backward and AdamW, in bf16 with activation checkpointing, the same setup as the plain-transformers
anchors (``/work/shared/anchors``: bf16 parameters, fused AdamW, 3 warm-up steps, mean of the timed steps).

FLOPs per step: ``train.metrics.step_flops`` (the formulas are in ``train/metrics.py``; activation recomputation is
*not* counted, so this is MFU, not HFU).

``mfu_llm`` counts the LLM terms, ``mfu_llm_vit`` adds the ViT terms. ``mfu_llm_anchor`` uses the anchors'
convention (LM head on every token) for a like-for-like comparison with ``hf_qwen3_train_mfu.py``; the anchors
attend over the whole row (``seq²``) where packed varlen attention needs only ``Σ s_i²``. Peak: H100 SXM dense
bf16, 989 TFLOP/s (``--peak-tflops``). Prints one JSON line per row length.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_pipelines.encoded import IGNORE_INDEX, EncodedSample, PackedBatch, TokenIds, VisualInputs  # noqa: E402
from data_pipelines.packing import pack_row  # noqa: E402
from keye.attention import resolve_backend  # noqa: E402
from keye.compat import enable_activation_checkpointing  # noqa: E402
from keye.configuration import KeyeVLConfig  # noqa: E402
from keye.model_config import load_model_config  # noqa: E402
from keye.modeling import KeyeVLForConditionalGeneration  # noqa: E402
from keye.rope import multimodal_position_ids  # noqa: E402
from train.metrics import flop_totals, param_count, step_flops  # noqa: E402

H100_BF16_TFLOPS = 989.0
TEXT_ID_RANGE = 150_000  # ordinary vocabulary ids (below the special tokens)


@dataclass
class VideoShape:
    """One synthetic video sample. Grids are in 14-px patches; a frame is slow when ``i % slow_every == 0``."""

    frames: int = 16
    slow_every: int = 4
    slow_grid: tuple[int, int] = (32, 32)  # 448×448 px, 256 tokens
    fast_grid: tuple[int, int] = (16, 16)  # 224×224 px, 64 tokens (≈0.3 of a slow frame, as in 1.5)
    prompt_tokens: int = 48
    answer_tokens: int = 128


TINY_SHAPE = VideoShape(frames=4, slow_every=2, slow_grid=(8, 8), fast_grid=(4, 4), prompt_tokens=16, answer_tokens=32)


def _text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, TEXT_ID_RANGE, (n,), generator=gen).tolist()


def video_sample(cfg: KeyeVLConfig, shape: VideoShape, gen: torch.Generator) -> EncodedSample:
    """A Keye-1.5-formatted video sample with random text, pixels and one labelled answer."""
    merge = cfg.vision_config.spatial_merge_size
    patch_dim = 3 * cfg.vision_config.patch_size**2
    ids = _text(shape.prompt_tokens, gen) + [cfg.vision_start_token_id]
    grids = []
    for i in range(shape.frames):
        slow = i % shape.slow_every == 0
        h, w = shape.slow_grid if slow else shape.fast_grid
        grids.append([1, h, w])
        pads = [cfg.video_token_id] * (h * w // merge**2)
        ids += [cfg.frame_token_id, *_text(3, gen)]  # the timestamp, e.g. "12.5", as text tokens
        ids += pads if slow else [cfg.fast_start_token_id, *pads, cfg.fast_end_token_id]
    ids += [cfg.vision_end_token_id]
    prompt_len = len(ids)
    ids += _text(shape.answer_tokens, gen)
    input_ids = torch.tensor(ids)
    labels = input_ids.clone()
    labels[:prompt_len] = IGNORE_INDEX
    grid = torch.tensor(grids)
    n_patches = int(grid.prod(-1).sum())
    return EncodedSample(
        input_ids=input_ids,
        labels=labels,
        position_ids=multimodal_position_ids(input_ids, cfg.image_token_id, cfg.video_token_id, None, grid, merge),
        token_ids=token_ids(cfg),
        visual=VisualInputs(pixel_values_videos=torch.randn(n_patches, patch_dim, generator=gen), video_grid_thw=grid),
    )


def token_ids(cfg: KeyeVLConfig) -> TokenIds:
    return TokenIds.from_config(cfg, cfg.text_config.pad_token_id)


def text_sample(cfg: KeyeVLConfig, n: int, gen: torch.Generator) -> EncodedSample:
    ids = torch.tensor(_text(n, gen))
    labels = ids.clone()
    labels[: n // 4] = IGNORE_INDEX
    position_ids = torch.arange(n).expand(3, n).clone()
    return EncodedSample(input_ids=ids, labels=labels, position_ids=position_ids, token_ids=token_ids(cfg))


def video_row(cfg: KeyeVLConfig, seq_len: int, shape: VideoShape, seed: int = 0) -> PackedBatch:
    """Video samples packed into one ``seq_len`` row, the remainder filled by a text sample."""
    gen = torch.Generator().manual_seed(seed)
    samples: list[EncodedSample] = []
    used = 0
    while True:
        sample = video_sample(cfg, shape, gen)
        if used + len(sample) > seq_len:
            break
        samples.append(sample)
        used += len(sample)
    if seq_len - used >= 8:
        samples.append(text_sample(cfg, seq_len - used, gen))
    if not samples:
        raise ValueError(f"a row of {seq_len} tokens holds no sample (one video sample is longer)")
    return pack_row(samples, seq_len)


def _sig(x: float) -> float:
    """Four significant digits (CPU smoke runs give MFUs of 1e-6 %)."""
    return float(f"{x:.4g}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_row(model, opt, row: PackedBatch, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per training step (mean over ``steps`` after ``warmup``)."""
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in row.model_inputs().items()}
    dtype = next(model.parameters()).dtype
    for key in ("pixel_values", "pixel_values_videos"):
        if inputs[key] is not None:
            inputs[key] = inputs[key].to(dtype)

    def step() -> None:
        out = model(**inputs)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="model YAML (default configs/model/keye_1_7b.yaml)")
    p.add_argument("--seq", type=int, nargs="+", default=None, help="row lengths (default 8192 32768)")
    p.add_argument("--attn", default="auto", choices=("auto", "flash_attn", "torch_varlen", "sdpa"))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10, --tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, --tiny 0)")
    p.add_argument("--no-ckpt", action="store_true", help="disable activation checkpointing")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=None, help="default cuda when available")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS)
    p.add_argument("--frames", type=int, default=None, help="frames per video sample")
    p.add_argument("--tiny", action="store_true", help="tiny config, 512/1024-token rows, CPU smoke check")
    args = p.parse_args(argv)
    args.config = args.config or str(ROOT / "configs/model" / ("tiny.yaml" if args.tiny else "keye_1_7b.yaml"))
    args.seq = args.seq or ([512, 1024] if args.tiny else [8192, 32768])
    args.steps = args.steps if args.steps is not None else (1 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 3)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = load_model_config(args.config)
    cfg.attn_backend = args.attn
    shape = TINY_SHAPE if args.tiny else VideoShape()
    if args.frames:
        shape.frames = args.frames
    torch.manual_seed(0)
    with torch.device(device):
        model = KeyeVLForConditionalGeneration(cfg)
    model = model.to(dtype).train()
    if not args.no_ckpt:
        enable_activation_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    backend = resolve_backend(args.attn, device, dtype)
    for seq in args.seq:
        row = video_row(cfg, seq, shape)
        record = {
            "config": Path(args.config).name,
            "params": param_count(model),
            "params_vit": param_count(model.visual),
            "seq_len": seq,
            "samples": row.num_samples,
            "visual_tokens": int((row.input_ids == cfg.video_token_id).sum()),
            "patches": int(row.visual.video_grid_thw.prod(-1).sum()) if row.visual.video_grid_thw is not None else 0,
            "label_tokens": int((row.labels != IGNORE_INDEX).sum()),
            "attn": backend,
            "dtype": args.dtype,
            "ckpt": not args.no_ckpt,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            dt = bench_row(model, opt, row, args.steps, args.warmup, device)
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(json.dumps({**record, "error": "out of memory"}), flush=True)
            continue
        flops = step_flops(model, row)
        total = flop_totals(flops)
        peak = args.peak_tflops * 1e12
        record.update(
            step_ms=round(dt * 1e3, 2),
            tokens_per_s=round(seq / dt, 1),
            mfu_llm=_sig(100 * total["llm"] / dt / peak),
            mfu_llm_vit=_sig(100 * total["llm_vit"] / dt / peak),
            mfu_llm_anchor=_sig(100 * total["llm_anchor"] / dt / peak),
            peak_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
            tflops_per_step={k: _sig(v / 1e12) for k, v in flops.items()},
        )
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
