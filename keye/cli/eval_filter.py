"""``keye eval-filter``: drop video-MCQ items that judges answer from one random frame, then rebalance letters."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bench", required=True, help="one multiple-choice benchmark (time, video_mcq, videomme, …)")
    parser.add_argument("--data", required=True, help="the benchmark's data (file or directory)")
    parser.add_argument("--out", required=True, help="output directory (filtered.jsonl, filter_report.{json,md})")
    parser.add_argument(
        "--judge",
        action="append",
        required=True,
        help="judge checkpoint directory or module:factory; repeat up to 3 times",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-item random frame and the rebalancing")
    parser.add_argument(
        "--min-correct",
        type=int,
        default=None,
        help="drop items this many judges get right (default 2, or 1 with one judge)",
    )
    parser.add_argument("--limit", type=int, help="first N items only")
    parser.add_argument("--config", help="YAML file for EvalConfig (media, generation, mode)")
    parser.add_argument("overrides", nargs="*", help="key=value EvalConfig overrides")


def run(args: argparse.Namespace) -> int:
    from eval.config import EvalConfig
    from eval.filter import run_filter
    from keye.typed_config import load_config

    flags = [f"benchmarks={json.dumps([args.bench])}", f"data={json.dumps(args.data)}", f"out={json.dumps(args.out)}"]
    if args.limit is not None:
        flags.append(f"limit={args.limit}")
    cfg = load_config(EvalConfig, args.config, flags + list(args.overrides or []))
    min_correct = args.min_correct if args.min_correct is not None else min(2, len(args.judge))
    report = run_filter(cfg, args.judge, seed=args.seed, min_correct=min_correct)
    print(
        f"{report['benchmark']}: kept {report['kept']} of {report['total']} ({report['dropped']} dropped, "
        f"{report['unreadable']} unreadable); letters after rebalancing {report['letters_after']}"
    )
    return 0
