"""``keye train CONFIG [key=value …]``: one training run (pretraining stage, SFT) described by a run config.

Single process here; ``torchrun --nnodes N --nproc_per_node G -m train CONFIG …`` runs the same code on many.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (e.g. configs/pretrain/tiny_stage1.yaml)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. max_steps=10 optim.lr=1e-4")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from train.config import load_train_config

    cfg = load_train_config(args.config, list(args.overrides))  # config errors surface before any process group
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from train.loop import run_training

    summary = run_training(cfg)
    if summary["rank"] == 0:
        print(
            f"{cfg.stage}: stopped at step {summary['step']} ({summary['stopped_by']}); "
            f"checkpoints in {summary['output_dir']}/checkpoints, HF export in {summary['export']}"
        )
    return 0


def main(argv: list[str]) -> int:
    """Entry for ``python -m train``: same parsing and one-line errors as ``keye train``."""
    from keye.cli.main import main as keye_main

    debug = ["--debug"] if "--debug" in argv else []
    return keye_main([*debug, "train", *(a for a in argv if a != "--debug")])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
