"""``keye train CONFIG [key=value …]``: one training run (pretraining, SFT or GSPO RL); the command lives in
``train/cli.py`` (``torchrun … -m train`` runs the same code on many processes)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from train.cli import add_arguments as add

    add(parser)


def run(args: argparse.Namespace) -> int:
    from train.cli import run as run_train_cli

    return run_train_cli(args)
