"""``keye`` dispatcher: each subcommand lives in its own module exposing ``add_arguments`` and ``run``.

Modules are imported only when their command runs, so ``keye sandbox`` does not pay for importing torch
models and ``keye --help`` is instant. Errors are one line on stderr and a non-zero exit; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). Keep names stable: users and tools script against them (DESIGN §2).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("keye.cli.demo", "run the whole pipeline on the tiny config and generated media"),
    "init": ("keye.cli.init", "write a new HF-format checkpoint (random, or from local Qwen3 + SigLIP)"),
    "chat": ("keye.cli.chat", "stream an answer from a checkpoint about an image or a video"),
    "video-info": ("keye.cli.video_info", "what the model sees of a video: sampled frames, slow/fast, sizes, tokens"),
    "shards": ("keye.cli.shards", "write webdataset shards + manifest + skip report from JSONL and media"),
    "check-data": ("keye.cli.check_data", "which SFT mode each JSONL record fits, and why a record fits none"),
    "sandbox": ("keye.cli.sandbox", "run one Thyme code block in the sandbox (status, stdout, error, images)"),
    "eval": ("keye.cli.eval", "benchmark scores: predictions.jsonl, results.json, report.md"),
    "eval-filter": ("keye.cli.eval_filter", "drop video-MCQ items answerable from one frame, rebalance letters"),
    "train": (
        "keye.cli.train",
        "one training run (pretraining stage, SFT or GSPO RL) from a run config; torchrun -m train for many",
    ),
    "web": ("keye.cli.web", "the browser demo: upload a video or image, ask, watch the answer stream"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keye", description="Keye: train and evaluate video-language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        build_parser(only="").print_help()
        return 0 if command is None else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser(only=command).parse_args(argv)
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("keye: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line unless --debug
        if args.debug:
            raise
        print(f"keye {command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
