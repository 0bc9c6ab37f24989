"""Paths users hand to commands: the repository's ``configs/`` (from any working directory) and checkpoint
directories (``--model``), checked with a pointer to the directory meant when the one given is a step short."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# What a training run writes (train/loop.py, train/checkpoint.py): RUN/hf (the final export) and
# RUN/checkpoints/step_NNNNNNNN/hf (the export saved with each checkpoint, when enabled).
EXPORT_DIR = "hf"
CHECKPOINTS_DIR = "checkpoints"
_STEP = re.compile(r"^step_(\d+)$")


def config_path(relative: str) -> Path:
    """``configs/<relative>`` in the checkout (an existing path given as-is is returned unchanged)."""
    given = Path(relative)
    if given.exists():
        return given
    candidate = REPO_ROOT / "configs" / relative
    if not candidate.exists():
        raise FileNotFoundError(f"config {relative} not found (looked in . and {REPO_ROOT / 'configs'})")
    return candidate


class NotACheckpointError(FileNotFoundError):
    """``--model`` names no checkpoint directory; the message says which directory was probably meant."""


def _is_checkpoint(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def _latest_step_export(checkpoints: Path) -> Path | None:
    """``checkpoints/step_N/hf`` with the largest N that holds a checkpoint."""
    if not checkpoints.is_dir():
        return None
    steps = sorted(
        (int(m.group(1)), d / EXPORT_DIR)
        for d in checkpoints.iterdir()
        if (m := _STEP.match(d.name)) and _is_checkpoint(d / EXPORT_DIR)
    )
    return steps[-1][1] if steps else None


def checkpoint_suggestion(directory: str | os.PathLike) -> tuple[Path, str] | None:
    """The checkpoint under (or above) ``directory`` that was probably meant, with what it is; None if none.

    ``RUN`` → ``RUN/hf`` (the final export), else ``RUN/checkpoints/step_N/hf`` (the latest exported step);
    ``RUN/checkpoints`` → its latest ``step_N/hf``; ``step_N`` → ``step_N/hf``; a file inside a checkpoint
    (``…/hf/config.json``, ``model.safetensors``) → its directory; a missing ``RUN/hf`` (a run stopped before its
    final export) → ``RUN``'s latest ``checkpoints/step_N/hf``.
    """
    path = Path(directory)
    if not path.exists():
        if path.name == EXPORT_DIR:  # a run stopped before its final export: its last exported step
            latest = _latest_step_export(path.parent / CHECKPOINTS_DIR)
            return (latest, "the run's latest exported checkpoint step") if latest is not None else None
        return None
    if path.is_file():
        return (path.parent, "the directory holding it") if _is_checkpoint(path.parent) else None
    if _is_checkpoint(path / EXPORT_DIR):
        if _STEP.match(path.name):
            return path / EXPORT_DIR, "the export of this checkpoint step"
        return path / EXPORT_DIR, "the run's final export"
    latest = _latest_step_export(path / CHECKPOINTS_DIR) or _latest_step_export(path)
    if latest is not None:
        return latest, "the run's latest exported checkpoint step"
    return None


def checkpoint_dir(directory: str | os.PathLike) -> Path:
    """``directory`` as a Keye checkpoint (it holds ``config.json``), or ``NotACheckpointError`` saying so, with
    "did you mean RUN/hf?" when the directory given is a run, a ``checkpoints/step_N`` folder or a file one step
    away from a checkpoint. Every command taking ``--model`` checks its argument here."""
    path = Path(directory)
    if path.is_dir() and _is_checkpoint(path):
        return path
    if not path.exists():
        problem = "no such directory"
    elif path.is_file():
        problem = "a file; a checkpoint is a directory"
    else:
        problem = "no config.json"
    message = f"{path} is not a Keye checkpoint ({problem})"
    suggestion = checkpoint_suggestion(path)
    if suggestion is not None:
        meant, what = suggestion
        message += f"; did you mean {meant} ({what})?"
    raise NotACheckpointError(message)
