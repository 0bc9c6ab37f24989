"""Keye: Keye-VL 1.5-style video-language models: model, processor, generation and tools.

Heavy modules (torch, transformers) load on first attribute access, so light tools such as the sandbox
start fast. Importing ``KeyeVLForConditionalGeneration`` also registers the classes with transformers' Auto
classes (``AutoConfig``, ``AutoModelForImageTextToText``, ``AutoModelForCausalLM``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "KeyeVLConfig": "keye.configuration",
    "KeyeVisionConfig": "keye.configuration",
    "KeyeVLForConditionalGeneration": "keye.modeling",
    "KeyeVLProcessor": "keye.processing",
    "load_tokenizer": "keye.tokenizer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        if module.__name__ == "keye.modeling":
            importlib.import_module("keye.auto")
        return getattr(module, name)
    raise AttributeError(f"module 'keye' has no attribute {name!r}")
