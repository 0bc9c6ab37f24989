"""Registration with transformers' Auto classes, so ``AutoModelForImageTextToText.from_pretrained`` works."""

from __future__ import annotations

import contextlib

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from keye.configuration import KeyeTextConfig, KeyeVisionConfig, KeyeVLConfig
from keye.modeling import KeyeVLForConditionalGeneration


def register() -> None:
    """Idempotent: safe to call from every entry point (a second registration raises ValueError, ignored)."""
    for config_cls in (KeyeVLConfig, KeyeVisionConfig, KeyeTextConfig):
        with contextlib.suppress(ValueError):
            AutoConfig.register(config_cls.model_type, config_cls)
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        with contextlib.suppress(ValueError):
            auto.register(KeyeVLConfig, KeyeVLForConditionalGeneration)


register()
