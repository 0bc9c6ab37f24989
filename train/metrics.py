"""Rank-0 metrics: a tqdm bar, ``metrics.jsonl`` in the output directory, and wandb (offline and silent by default,
its files under the output directory)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from keye.jsonl import open_append
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
    """Tokens and wall time since the last logging step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.steps = 0

    def rates(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"tokens_per_s": self.tokens / dt, "step_time_s": dt / max(self.steps, 1)}
