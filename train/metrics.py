"""Rank-0 metrics: a tqdm bar, ``metrics.jsonl`` in the output directory, and wandb (offline and silent by default,
its files under the output directory); throughput and MFU.

Model FLOPs of a training step (fwd + bwd = 3 × fwd; recomputation not counted: MFU, not HFU), ``T`` row tokens:
LLM linear ``6·N_body·T`` (decoder layers + final norm) + LM head ``6·V·H·T_label`` (the chunked loss projects only
labelled positions) + attention ``6·L·H_q·d_head·Σ s_i²`` (causal, within each packed sample); ViT ``6·N_vit·P``
(``P`` patches) + ``12·L_vit·d_vit·Σ n_f²`` (per frame of ``n_f`` patches) + projector ``6·N_proj·P/4``.
``mfu_llm`` counts the LLM terms, ``mfu_llm_vit`` adds the ViT's (percent of every GPU's peak FLOP/s).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from data_pipelines.encoded import IGNORE_INDEX
from keye.jsonl import open_append
from keye.loss import shift_labels
from train.config import TrainConfig

log = logging.getLogger(__name__)


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory (GPU) or resident set size (CPU) of this process, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return 0.0


class MetricLogger:
    """Writes one JSON line per logging interval (every rank calls it; only rank 0 writes)."""

    def __init__(self, cfg: TrainConfig, rank: int, start_step: int, resumed: bool) -> None:
        self.rank, self.cfg = rank, cfg
        self.enabled = rank == 0
        self.bar = None
        self.wandb = None
        self.file = None
        if not self.enabled:
            return
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.file = open_append(out / "metrics.jsonl")
        if cfg.logging.progress:
            from tqdm.auto import tqdm
            from transformers.utils import logging as hf_logging

            # One bar per run: transformers' own ("Writing model shards" at every checkpoint export) would nest
            # inside it and print it again around each checkpoint.
            hf_logging.disable_progress_bar()
            self.bar = tqdm(total=cfg.max_steps, initial=start_step, desc=cfg.stage, unit="step", dynamic_ncols=True)
        if cfg.wandb.mode != "none":
            from keye.quiet import is_verbose

            if not is_verbose():  # no banner or run summary on the console (read before wandb sets itself up)
                os.environ.setdefault("WANDB_SILENT", "true")
            try:
                import wandb
            except ImportError:
                log.warning("wandb is not installed; metrics go to metrics.jsonl only")
            else:
                from keye.typed_config import to_dict

                self.wandb = wandb.init(
                    project=cfg.wandb.project,
                    name=cfg.wandb.name or f"{cfg.stage}-{out.name}",
                    mode=cfg.wandb.mode,
                    dir=str(out),
                    config=to_dict(cfg),
                    resume="allow" if resumed else None,
                    id=_run_id(out),
                )

    def event(self, kind: str, console: bool = True, **fields: Any) -> None:
        """A non-metric line (resume, skipped step, checkpoint) in metrics.jsonl and, unless ``console`` is off
        (e.g. ``finished``, which the command's last line says), on the console."""
        if not self.enabled:
            return
        row = {"event": kind, **fields}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if not console:
            return
        message = f"[{self.cfg.stage}] {kind}: " + ", ".join(f"{k}={v}" for k, v in fields.items())
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info(message)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", lr=f"{values.get('lr', 0):.2e}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.file is not None:
            self.file.close()


def _run_id(out: Path) -> str:
    """A stable wandb run id per output directory, so a resumed run continues the same wandb run."""
    path = out / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id


class Throughput:
    """Steps (and of those, applied ones), tokens, model FLOPs (:func:`flop_totals`) and wall time since the last
    logging step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0, self.steps, self.applied, self.tokens = time.perf_counter(), 0, 0, 0
        self.flops = {"llm": 0.0, "llm_vit": 0.0}

    def step_time(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9) / max(self.steps, 1)


# bf16 dense peak FLOP/s by ``torch.cuda.get_device_name()`` substring, first match (H100 NVL: unknown, no MFU)
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", None), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12))


def peak_flops(tflops: float | None, device: torch.device) -> float | None:
    """Per-GPU peak FLOP/s: ``logging.peak_tflops`` when set, else the table by GPU name; None on CPU or unknown."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return tflops * 1e12 if tflops else next((peak for key, peak in PEAK_FLOPS if name and key in name), None)


def param_count(module: torch.nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())  # ZeRO-3: the full size


def flop_params(model: torch.nn.Module) -> dict[str, int]:
    """The parameter counts the FLOP formulas use (full size under ZeRO-3): constant for a run, so a training
    loop counts them once instead of walking every parameter per micro-batch."""
    return {
        "llm_body": param_count(model.model) - param_count(model.model.embed_tokens),
        "vit": param_count(model.visual),
        "projector": param_count(model.mlp_AR),
    }


def step_flops(model: torch.nn.Module, row: Any, params: dict[str, int] | None = None) -> dict[str, float]:
    """Model FLOPs of one training step on the packed ``row`` (module docstring); a sequence-parallel slice
    (``keye.sequence_parallel.ShardedBatch``) counts its share of the row, so the ranks' sum is the row's.
    ``params``: :func:`flop_params` of ``model``, counted here when not given."""
    params = params or flop_params(model)
    tc, vc = model.config.text_config, model.config.vision_config
    sp = getattr(row, "sp_size", 1)
    targets = row.shift_labels if sp > 1 else shift_labels(row.labels, row.cu_seqlens)
    seg = torch.diff(row.cu_seqlens.long()).double()
    grids = [g for g in (row.visual.image_grid_thw, row.visual.video_grid_thw) if g is not None]
    frames = torch.cat(grids).prod(-1).double() if grids else torch.zeros(0, dtype=torch.float64)
    head = tc.vocab_size * tc.hidden_size
    attention = 6.0 * tc.num_hidden_layers * tc.num_attention_heads * tc.head_dim
    return {
        "llm_linear": 6.0 * params["llm_body"] * row.input_ids.numel(),
        "lm_head": 6.0 * head * int((targets != IGNORE_INDEX).sum()),
        "lm_head_all_tokens": 6.0 * head * row.input_ids.numel(),
        "llm_attention": attention * float(seg.square().sum()) / sp,
        "vit_linear": 6.0 * params["vit"] * float(frames.sum()) / sp,
        "vit_attention": 12.0 * vc.num_hidden_layers * vc.hidden_size * float(frames.square().sum()) / sp,
        "projector": 6.0 * params["projector"] * float(frames.sum()) / 4 / sp,
    }


def flop_totals(f: dict[str, float]) -> dict[str, float]:
    """What the MFU figures count: ``llm`` (linear, LM head on labelled positions, attention), ``llm_vit`` (plus
    ViT and projector) and ``llm_anchor`` (LM head on every token: the plain-transformers anchors' convention)."""
    llm = f["llm_linear"] + f["lm_head"] + f["llm_attention"]
    vit = f["vit_linear"] + f["vit_attention"] + f["projector"]
    anchor = f["llm_linear"] + f["lm_head_all_tokens"] + f["llm_attention"]
    return {"llm": llm, "llm_vit": llm + vit, "llm_anchor": anchor}


def rate_metrics(tokens: float, flops: dict[str, float], seconds: float, gpus: int, peak: float | None) -> dict:
    """``tokens_per_s`` and, when the per-GPU ``peak`` is known, ``mfu_llm`` / ``mfu_llm_vit`` (percent) of
    ``tokens`` and ``flops`` (:func:`flop_totals`, summed over ``gpus``) done in ``seconds``."""
    seconds = max(seconds, 1e-9)
    out = {"tokens_per_s": tokens / seconds}
    if peak:
        out.update({f"mfu_{k}": 100 * flops[k] / (seconds * gpus * peak) for k in ("llm", "llm_vit")})
    return out
