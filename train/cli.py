"""Command line of a training run, shared by ``keye train`` and ``python -m train`` (also under ``torchrun``).

``CONFIG [key=value …]`` describes one run (pretraining stage, SFT, or GSPO RL). A config with a top-level ``rl:``
section or ``stage: rl`` is an RL run (``train.rl.run``); every other config goes to the pretraining/SFT trainer
(``train.loop``). ``torchrun --nnodes N --nproc_per_node G -m train CONFIG …`` runs the same code on many processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

OWN_LOGGERS = ("keye", "train", "data_pipelines", "eval", "__main__")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (e.g. configs/pretrain/tiny_stage1.yaml, configs/rl/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. max_steps=10 optim.lr=1e-4")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="keep the INFO logs, progress bars and banners of DeepSpeed, torch, transformers and wandb "
        "(default: their warnings and errors only); KEYE_VERBOSE=1 does the same, e.g. for torchrun",
    )


def is_rl_config(path: str) -> bool:
    """An RL run config: a top-level ``rl:`` section, or ``stage: rl``."""
    from keye.typed_config import read_yaml

    data = read_yaml(path)
    return "rl" in data or data.get("stage") == "rl"


def run(args: argparse.Namespace) -> int:
    from keye.quiet import quiet

    verbose = quiet(True if args.verbose else None)  # before torch/transformers/DeepSpeed are imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rl = is_rl_config(args.config)
    if rl:
        from train.rl.run import load_rl_run

        cfg, plan = load_rl_run(args.config, list(args.overrides))
    else:
        from train.config import load_train_run

        cfg, plan = load_train_run(args.config, list(args.overrides))  # config errors surface before any process group
    rank0 = int(os.environ.get("RANK", "0")) == 0
    # INFO from our own packages on rank 0; other libraries' INFO only with --verbose (keye.quiet)
    level = logging.INFO if rank0 else logging.WARNING
    logging.basicConfig(
        level=level if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for ours in OWN_LOGGERS:
        logging.getLogger(ours).setLevel(level)
    if rank0:
        print(plan.line(), flush=True)
        for warning in plan.warnings:
            print(f"keye train: warning: {warning}", file=sys.stderr, flush=True)

    if rl:
        from train.rl.run import run_rl

        summary = run_rl(cfg)
    else:
        from train.loop import run_training

        summary = run_training(cfg)
    signum = summary.get("signal")
    if signum:  # saved, but not finished: a script must be able to tell (128 + signal, as a killed process)
        if summary["rank"] == 0:
            print(
                f"{cfg.stage}: stopped by {signal.Signals(signum).name} at step {summary['step']} after saving its "
                f"checkpoint in {summary['output_dir']}/checkpoints; no final HF export was written ("
                f"{summary['export']}, if present, is from an earlier run); rerun the same command to resume"
            )
        return 128 + signum
    if summary["rank"] == 0:
        nonfinite = summary.get("nonfinite_steps") or 0
        print(
            f"{cfg.stage}: stopped at step {summary['step']} ({summary['stopped_by']}"
            f"{f', {nonfinite} non-finite steps skipped' if nonfinite else ''}); "
            f"checkpoints in {summary['output_dir']}/checkpoints, HF export in {summary['export']}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry for ``python -m train``: the same arguments and one-line errors as ``keye train``."""
    parser = argparse.ArgumentParser(prog="python -m train", description="One training run from a run config.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return run(args)
    except KeyboardInterrupt:
        print("keye train: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the message ``keye train`` prints, so logs read the same under torchrun
        if args.debug:
            raise
        print(f"keye train: error: {exc}", file=sys.stderr)
        return 1
