"""The one place that absorbs API differences across the supported torch and transformers ranges (setup.py).

transformers 5.24 renamed the KV cache's argument and output field from ``past_key_values`` to ``cache``:
``generate`` passes ``cache=`` to ``forward``, reads ``outputs.cache``, and decoder layers and masks take ``cache=``.
5.17–5.23 use ``past_key_values`` everywhere. The model code follows the current name; calls into transformers and
the outputs handed back to it go through these helpers, so no version test is scattered through the code. The
test ``tests/test_compat.py`` runs in CI on the floor and on the newest releases.

``torch.nn.attention.varlen.varlen_attn`` takes ``enable_gqa`` in 2.14 but not in 2.11 (``torch_varlen_kwargs``).
torch before 2.14 guards a JIT extension build with a ``lock`` file whose existence blocks (a killed build leaves it
behind); 2.14 holds an OS lock on it instead (``train.extension_locks`` clears the first kind).
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

#: The name this transformers uses for the KV cache (argument and output field): ``cache`` from 5.24.
CACHE_NAME: str = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
#: The name transformers used before 5.24 (its ``generate`` still passes it to ``forward``).
LEGACY_CACHE_NAME = "past_key_values"


def cache_kwarg(cache: Cache | None) -> dict[str, Cache | None]:
    """``{name: cache}`` under the name this transformers' layers, masks and output classes take."""
    return {CACHE_NAME: cache}


def take_cache(cache: Cache | None, kwargs: dict[str, Any]) -> Cache | None:
    """The cache a ``forward`` received under either name (removing the old name from ``kwargs``)."""
    legacy = kwargs.pop(LEGACY_CACHE_NAME, None)
    if legacy is not None and cache is not None:
        raise ValueError(f"pass the KV cache once, as `cache` (got both `cache` and `{LEGACY_CACHE_NAME}`)")
    return cache if cache is not None else legacy


def output_cache(output: Any) -> Cache | None:
    """The KV cache carried by a transformers model output, whatever the field is called."""
    return getattr(output, CACHE_NAME, None)


def torch_build_lock_is_file() -> bool:
    """Whether torch's extension builds wait on a plain ``lock`` file (``FileBaton``, torch < 2.14).

    Imported lazily: ``torch.utils.cpp_extension`` logs a CUDA_HOME warning at import on machines without CUDA.
    """
    import torch.utils.cpp_extension

    return hasattr(torch.utils.cpp_extension, "FileBaton")


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute activations of every checkpointable layer in the backward pass (non-reentrant).

    transformers 5.24 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old name
    warns and goes in v6).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def torch_varlen_kwargs(varlen_attn: Any, causal: bool, gqa: bool) -> dict[str, Any]:
    """Keyword arguments that make this torch's ``varlen_attn`` causal and grouped-query, as asked.

    Without ``enable_gqa`` in the result the caller must repeat k/v heads to the query heads itself.
    """
    kwargs: dict[str, Any] = {"window_size": (-1, 0)} if causal else {}
    if gqa and "enable_gqa" in inspect.signature(varlen_attn).parameters:
        kwargs["enable_gqa"] = True
    return kwargs
