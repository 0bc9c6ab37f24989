"""Argument handling shared by ``keye train`` and ``python -m train`` (torchrun): CONFIG [key=value …] → a run."""

from __future__ import annotations

import argparse
import json
import logging
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run YAML, e.g. configs/train/pretrain_stage1.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 data.seq_len=16384")
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON (rank 0)")


def run(args: argparse.Namespace) -> int:
    """Load and validate the config, train, print a summary on rank 0."""
    from train.config import load_run_config

    cfg = load_run_config(args.config, list(args.overrides))  # config errors surface before any heavy import
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from train.distributed import shutdown
    from train.loop import train

    try:
        result = train(cfg)
    finally:
        shutdown()
    if int(os.environ.get("RANK", 0)) == 0:
        if args.json:
            print(json.dumps(result.__dict__, indent=2))
        else:
            loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
            print(
                f"{cfg.stage}: steps {result.start_step}→{result.steps}, final loss {loss}, "
                f"{result.tokens_per_s:.0f} tokens/s, {result.seconds:.1f}s; "
                f"checkpoint {result.checkpoint_dir}; model {result.export_dir}"
            )
    return 0
