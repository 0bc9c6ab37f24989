"""``keye eval``: benchmark scores (predictions.jsonl, results.json, report.md); the harness lives in ``eval/``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from eval.cli import add_arguments as add

    add(parser)


def run(args: argparse.Namespace) -> int:
    from eval.cli import run as run_eval_cli

    return run_eval_cli(args)
