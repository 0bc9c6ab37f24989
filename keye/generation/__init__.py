"""Generation engines: one interface, two implementations, used by eval, GSPO rollouts and the Thyme tool loop.

- ``transformers`` (default): :class:`keye.inference.ChatEngine`, our model's ``generate`` with a KV cache; needs
  nothing beyond the project.
- ``vllm``: :class:`keye.generation.vllm_engine.VLLMEngine`, vLLM's ``KeyeVL1_5ForConditionalGeneration`` loading
  the same checkpoint. It receives our prompt token ids and our visual inputs (never text to re-tokenise), so what
  the model sees is decided by ``keye.processing`` alone; every request checks that vLLM's expanded prompt equals
  ours.

Both take :class:`~data_pipelines.encoded.EncodedSample` prompts and return a :class:`~keye.inference.GenerationResult`;
``update_weights`` refreshes an engine that holds its own copy of the weights (a trainer pushes into it in place).
vLLM is an optional install (``make vllm-env``): :func:`check_engine` is what configs call at load time, so a run
asking for it without it fails before any work with a one-line message.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # configs import this module: it must not pull in the model stack
    import torch

    from data_pipelines.encoded import EncodedSample
    from keye.inference import GenerationResult, GenerationSettings
    from keye.processing import KeyeVLProcessor

ENGINES = ("transformers", "vllm")
VLLM_INSTALL_HINT = (
    "vLLM is not installed in this environment: run `make vllm-env` and use .venv-vllm/bin/keye "
    "(on a GPU machine: pip install vllm beside the project)"
)


@dataclass
class VLLMSettings:
    """Engine-construction options of the vLLM engine (decoding settings stay in ``GenerationSettings``).

    ``max_model_len`` 0 = the checkpoint's context. ``gpu_memory_utilization`` is the GPU share vLLM may take for
    weights + KV cache (keep it low when it shares the GPU with a trainer). ``cpu_kv_cache_gb``: the KV cache on a
    CPU machine (vLLM would otherwise reserve most of the host's memory). ``sleep_level`` (GPU only): 1 or 2 puts
    the engine to sleep between rollouts so a colocated trainer gets the GPU memory back (1 keeps the weights in
    host memory, 2 drops them: they are pushed anew before the next rollout anyway).
    """

    max_model_len: int = 0
    gpu_memory_utilization: float = 0.35
    cpu_kv_cache_gb: float = 1.0
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    sleep_level: int = 0
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: {"image": 8, "video": 1})

    def __post_init__(self) -> None:
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"vllm.sleep_level must be 0, 1 or 2, got {self.sleep_level}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


class GenerationEngine(Protocol):
    """What eval, the RL sampler and the Thyme loop need from an engine. ``holds_weights``: the engine has its own
    copy of the weights, which a trainer refreshes with ``update_weights`` (:class:`WeightHoldingEngine`); the
    transformers engine generates with the model it was given, so a trainer's updates reach it at once."""

    name: str
    holds_weights: bool
    processor: KeyeVLProcessor

    def encode(self, conversations: Sequence[Sequence[dict]], mode: str | None = None) -> list[EncodedSample]: ...

    def generate_encoded(self, samples: Sequence[EncodedSample], settings: GenerationSettings) -> GenerationResult: ...

    def generate(
        self, conversations: Sequence[Sequence[dict]], settings: GenerationSettings | None = None, mode=None
    ) -> list[str]: ...


class WeightHoldingEngine(GenerationEngine, Protocol):
    """An engine with its own weights (vLLM): ``update_weights`` loads ``(name, tensor)`` pairs in place."""

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> float: ...


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_engine(name: str, key: str) -> None:
    """Raise a one-line ``ValueError`` naming ``key`` when ``name`` is no engine or cannot run here."""
    if name not in ENGINES:
        raise ValueError(f"{key}: unknown generation engine {name!r} (known: {', '.join(ENGINES)})")
    if name == "vllm" and not vllm_available():
        raise ValueError(f"{key}: vllm: {VLLM_INSTALL_HINT}")


def load_engine(
    name: str,
    model_dir: str | Path,
    media: dict | None = None,
    device: str | None = None,
    dtype: str = "auto",
    vllm: VLLMSettings | None = None,
    seed: int = 0,
) -> GenerationEngine:
    """An engine of kind ``name`` for the checkpoint at ``model_dir`` (``media`` overrides video options)."""
    check_engine(name, "engine")
    if name == "transformers":
        from keye.inference import ChatEngine

        return ChatEngine.from_pretrained(model_dir, media=media, device=device, dtype=dtype)
    from keye.generation.vllm_engine import VLLMEngine

    return VLLMEngine.from_pretrained(model_dir, media=media, device=device, dtype=dtype, settings=vllm, seed=seed)
