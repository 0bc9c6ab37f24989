"""Command line of the harness, shared by ``keye eval`` and ``python -m eval`` (also under ``torchrun``)."""

from __future__ import annotations

import argparse
import json
import sys

from eval.config import EvalConfig
from keye.typed_config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory (engine 'keye')")
    parser.add_argument(
        "--bench", help="benchmark names, comma-separated (kc_mmbench, CPV, …, time, video_mcq, videomme, mvbench)"
    )
    parser.add_argument("--data", help="benchmark data: a file or directory in the benchmark's published layout")
    parser.add_argument("--out", help="output directory (predictions.jsonl, results.json, report.md)")
    parser.add_argument("--limit", type=int, help="first N samples of each benchmark")
    parser.add_argument(
        "--mode", choices=["think", "no_think", "auto"], help="reasoning mode suffix (default: each benchmark's own)"
    )
    parser.add_argument(
        "--engine", choices=["transformers", "vllm"], help="generation engine for --model (generation.engine)"
    )
    parser.add_argument("--config", help="YAML file for EvalConfig (see configs/eval/)")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. generation.batch_size=16 engine=pkg.mod:make"
    )


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """YAML, then the flags, then ``key=value`` overrides (later wins)."""
    flags: list[str] = []
    if args.model:
        flags.append(f"model={json.dumps(args.model)}")
    if args.bench:
        names = [n.strip() for n in args.bench.split(",") if n.strip()]
        flags.append("benchmarks=" + json.dumps(names))
    if args.data:
        flags.append(f"data={json.dumps(args.data)}")
    if args.out:
        flags.append(f"out={json.dumps(args.out)}")
    if args.limit is not None:
        flags.append(f"limit={args.limit}")
    if args.mode:
        flags.append(f"mode={args.mode}")
    if getattr(args, "engine", None):
        flags.append(f"generation.engine={args.engine}")
    cfg = load_config(EvalConfig, args.config, flags + list(args.overrides or []))
    if cfg.mode not in ("", "think", "no_think", "auto"):
        raise ValueError(f"mode must be think, no_think, auto or '' (each benchmark's own), got {cfg.mode!r}")
    return cfg


def run(args: argparse.Namespace) -> int:
    from keye.quiet import quiet

    quiet()  # third-party logs and progress bars (KEYE_VERBOSE=1 keeps them)
    from eval.runner import run_eval
    from keye.paths import checkpoint_dir

    cfg = config_from_args(args)
    if cfg.engine == "keye" and cfg.model:
        checkpoint_dir(cfg.model)  # before any data is read: "did you mean RUN/hf?" for a run or a checkpoint step
    results = run_eval(cfg)
    if results is not None:
        for name, bench in results["benchmarks"].items():
            o = bench["overall"]
            print(f"{name}: {o['accuracy']:.2f} ({o['correct']}/{o['total']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval", description="Evaluate a model on benchmarks.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except Exception as exc:
        if args.debug:
            raise
        print(f"eval: error: {exc}", file=sys.stderr)
        return 1
