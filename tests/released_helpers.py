"""Checkpoints for the released-layout and vLLM tests: every tensor perturbed, written the way training exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from keye.modeling import KeyeVLForConditionalGeneration
from keye.processing import KeyeVLProcessor
from tests.spine_fixtures import micro_config
from train.checkpoint import export_hf

REPO = Path(__file__).resolve().parent.parent
# Blocks the project's packages in a subprocess, so remote code that leaned on them would fail loudly.
BLOCK_PROJECT = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"keye", "data_pipelines", "train", "eval", "tests"}:
            raise ImportError("the project's package " + name + " must not be needed by a checkpoint")
sys.meta_path.insert(0, _Block())
"""


def perturbed_model(seed: int = 0, **config) -> KeyeVLForConditionalGeneration:
    """A micro model whose every tensor differs from its init (norms away from 1, biases away from 0), so a
    weight that a reader maps to the wrong place, or drops, changes the output."""
    torch.manual_seed(seed)
    model = KeyeVLForConditionalGeneration(micro_config(**config)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def export(model: KeyeVLForConditionalGeneration, out: Path, processor: KeyeVLProcessor | None = None) -> Path:
    """Write ``model`` through the training export (``train.checkpoint.export_hf``) on one rank."""
    engine = SimpleNamespace(module=model, zero_optimization_partition_weights=lambda: False)
    export_hf(engine, processor or KeyeVLProcessor(), out, rank=0)
    return out


def run_isolated(script: str, cwd: Path, timeout: float = 300) -> str:
    """Run ``script`` in a fresh interpreter of this venv with the project's packages blocked."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "hf_modules"), OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_PROJECT + script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode:
        raise AssertionError(f"isolated run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
