"""Checkpoints: a DeepSpeed checkpoint (weights, optimizer, scheduler) plus, per rank, RNG and data states, plus
an HF-format export (model + processor) that ``keye chat`` / ``keye eval`` / the next stage load directly.

A checkpoint directory counts only once its ``COMPLETE`` marker exists (written last, after every rank finished),
so a run killed mid-save resumes from the previous one. Only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from keye.typed_config import save_config

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of the complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = TAG.match(d.name)
            if m and (d / COMPLETE).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def export_hf(engine: Any, processor: Any, out: str | Path, rank: int) -> None:
    """Write the model (gathered from ZeRO-3 partitions when needed) and processor in HF format."""
    module = engine.module
    state_dict = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_partition_weights() else None
    if rank == 0:
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if state_dict is None:
            state_dict = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        module.save_pretrained(str(tmp), state_dict=state_dict)
        processor.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, quota, I/O error); the message is one line."""


def remove_incomplete(root: str | Path) -> list[Path]:
    """Delete the ``step_*`` directories under ``root`` that lack their ``COMPLETE`` marker (saves that died
    midway: they would never be resumed, only fill the disk); a complete checkpoint is never touched."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if TAG.match(d.name) and d.is_dir() and not (d / COMPLETE).is_file():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe_failed_save(ckpt: Path, exc: BaseException) -> str:
    """One line: what failed, where, the space left there and what the last complete checkpoint took."""
    if getattr(exc, "errno", None) == errno.ENOSPC:
        reason = "no space left on device"
    else:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    line = f"writing checkpoint {ckpt} failed ({reason[:200]})"
    with contextlib.suppress(OSError):
        line += f"; {shutil.disk_usage(ckpt.parent).free / 1e6:.0f} MB free on its filesystem"
    previous = complete_checkpoints(ckpt.parent)
    if previous:
        line += (
            f", the last complete checkpoint ({previous[-1][1].name}) takes {_dir_bytes(previous[-1][1]) / 1e6:.0f} MB"
        )
    return line + "; free space or set output_dir elsewhere, then rerun (it resumes from the last complete checkpoint)"


def _write_marker(path: Path) -> None:
    with open(path, "w") as fh:
        fh.write("ok\n")
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint(engine: Any, cfg: Any, step: int, rank_state: dict[str, Any], processor: Any, rank: int) -> Path:
    """Save everything needed to resume at ``step`` in ``cfg.output_dir``/checkpoints and keep the newest
    ``checkpoint.keep_last`` (collective: every rank calls it)."""
    root, keep_last = Path(cfg.output_dir) / "checkpoints", cfg.checkpoint.keep_last
    tag = tag_for(step)
    ckpt = root / tag
    if rank == 0:
        if (ckpt / COMPLETE).exists():
            (ckpt / COMPLETE).unlink()  # being rewritten (a resumed run passing an old step again)
        for d in remove_incomplete(root):
            log.warning("removed %s: a checkpoint whose save did not finish", d)
    dist.barrier()
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
        (ckpt / "train_state").mkdir(parents=True, exist_ok=True)
        torch.save(rank_state, ckpt / "train_state" / f"rank_{rank:05d}.pt")
        if cfg.checkpoint.export_hf:
            export_hf(engine, processor, ckpt / "hf", rank)
    except Exception as exc:  # noqa: BLE001 - any failure to write becomes one line, and the partial save goes
        message = describe_failed_save(ckpt, exc)
        shutil.rmtree(ckpt, ignore_errors=True)  # the export's hf.tmp lies inside it
        raise CheckpointWriteError(message) from exc
    dist.barrier()
    if rank == 0:
        save_config(cfg, ckpt / "config.yaml")
        _write_marker(ckpt / COMPLETE)
        for _, old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return ckpt


def load_checkpoint(engine: Any, ckpt: Path, rank: int, world: int) -> dict[str, Any]:
    """Restore engine state and return this rank's saved state (RNG restored here; data state for the caller)."""
    saved = sorted((ckpt / "train_state").glob("rank_*.pt"))
    if len(saved) != world:
        raise RuntimeError(
            f"checkpoint {ckpt} was saved by {len(saved)} ranks, this run has {world}; exact resume needs the same "
            "world size (use tools/merge_checkpoints.py or an HF export to change it)"
        )
    load_path, client = engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt}")
    state = torch.load(ckpt / "train_state" / f"rank_{rank:05d}.pt", weights_only=False)
    set_rng_state(state["rng"])
    return state
