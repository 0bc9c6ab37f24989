"""``keye init``: write a new HF-format checkpoint (model + processor), random or from local components."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="model YAML (e.g. configs/model/tiny.yaml) for a randomly initialised model")
    parser.add_argument("--llm", help="local Qwen3 checkpoint directory (with --vit)")
    parser.add_argument("--vit", help="local SigLIP checkpoint directory (with --llm)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="model config overrides, e.g. text_config.num_hidden_layers=8")


def init_checkpoint(
    out: str | Path,
    config: str | None = None,
    llm: str | None = None,
    vit: str | None = None,
    seed: int = 0,
    overrides: list[str] | None = None,
) -> dict:
    """Create the checkpoint and return a summary (parameter counts, path)."""
    import torch

    from keye.auto import register
    from keye.model_config import load_model_config
    from keye.modeling import KeyeVLForConditionalGeneration
    from keye.processing import KeyeVLProcessor
    from keye.tokenizer import load_tokenizer

    register()
    if bool(llm) != bool(vit):
        raise ValueError("--llm and --vit go together")
    if bool(config) == bool(llm):
        raise ValueError("give either --config YAML or --llm DIR --vit DIR")
    torch.manual_seed(seed)
    if config:
        model = KeyeVLForConditionalGeneration(load_model_config(config, overrides))
        tokenizer = load_tokenizer()
    else:
        model = KeyeVLForConditionalGeneration.from_components(llm, vit)
        has_tokenizer = (Path(llm) / "tokenizer.json").is_file() or (Path(llm) / "vocab.json").is_file()
        tokenizer = load_tokenizer(llm if has_tokenizer else None)
    out = Path(out)
    model.save_pretrained(str(out))
    KeyeVLProcessor(tokenizer, model_config=model.config).save_pretrained(out)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    return {
        "out": str(out),
        "parameters": count(model),
        "vision": count(model.visual),
        "projector": count(model.mlp_AR),
        "llm": count(model.model) + count(model.lm_head),
    }


def run(args: argparse.Namespace) -> int:
    summary = init_checkpoint(args.out, args.config, args.llm, args.vit, args.seed, args.overrides)
    print(
        f"wrote {summary['out']}: {summary['parameters'] / 1e6:.1f}M parameters "
        f"(ViT {summary['vision'] / 1e6:.1f}M, projector {summary['projector'] / 1e6:.1f}M, LLM {summary['llm'] / 1e6:.1f}M)"
    )
    return 0
