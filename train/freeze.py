"""Which parts of the model train in a stage: ViT (``visual``), projector (``mlp_AR``), LLM (``model`` + ``lm_head``).

Frozen parameters get ``requires_grad=False`` and are left out of the optimizer, so DeepSpeed never touches them
and they stay bit-identical through the run.
"""

from __future__ import annotations

from torch import nn

MODULE_PREFIXES = {"vit": ("visual.",), "projector": ("mlp_AR.",), "llm": ("model.", "lm_head.")}


def module_of(param_name: str) -> str:
    """``vit``, ``projector`` or ``llm`` for a parameter name of ``KeyeVLForConditionalGeneration``."""
    for module, prefixes in MODULE_PREFIXES.items():
        if param_name.startswith(prefixes):
            return module
    raise ValueError(f"parameter {param_name!r} belongs to none of {sorted(MODULE_PREFIXES)}")


def apply_freeze(model: nn.Module, frozen: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Freeze the named modules, unfreeze the rest; returns trainable parameter counts per module."""
    unknown = sorted(set(frozen) - set(MODULE_PREFIXES))
    if unknown:
        raise ValueError(f"freeze: unknown module {unknown[0]!r}, expected some of {sorted(MODULE_PREFIXES)}")
    counts = dict.fromkeys(MODULE_PREFIXES, 0)
    for name, param in model.named_parameters():
        module = module_of(name)
        param.requires_grad_(module not in frozen)
        if param.requires_grad:
            counts[module] += int(getattr(param, "ds_numel", param.numel()))
    return counts
