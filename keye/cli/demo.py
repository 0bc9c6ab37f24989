"""``keye demo``: the whole pipeline on the tiny config and generated media, printing what each step produced.

Each step is the same command a user would type (training stages in their own process, the rest in-process), so
the demo doubles as a smoke test of the command-line contract: data → video-info → shards → init → pretraining
stages 0–3 → SFT → GSPO → sandbox → eval → chat. It ends with a short summary: the final checkpoint, the eval report
and the commands to try next. Other libraries' logs, progress bars and banners stay off unless ``--verbose``
(``keye.quiet``; the training steps inherit the choice through ``KEYE_VERBOSE``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo_out", help="where data, shards, checkpoints and reports go")
    parser.add_argument("--eval-limit", type=int, default=4, help="samples per benchmark in the demo evaluation")
    parser.add_argument(
        "--verbose", action="store_true", help="keep DeepSpeed/torch/transformers logs and progress bars"
    )


def _step(title: str, fn: Callable[[], object], outcome: Callable[[], str] | None = None) -> object:
    """Run one step between a header and a ``done`` line (which ``outcome()`` may extend, e.g. with the loss)."""
    print(f"=== {title} ===", flush=True)
    start = time.perf_counter()
    result = fn()
    detail = f"; {outcome()}" if outcome is not None else ""
    print(f"--- done in {time.perf_counter() - start:.1f}s{detail}", flush=True)
    return result


def _cli(*argv: str) -> None:
    from keye.cli.main import main

    code = main([str(a) for a in argv])
    if code:
        raise RuntimeError(f"step 'keye {' '.join(map(str, argv))}' failed with exit code {code}")


def _train(config: str, root: Path, *overrides: str) -> None:
    """A training run in its own process (as a user would launch it), so each stage starts clean."""
    from keye.paths import config_path

    cmd = [
        sys.executable,
        "-m",
        "keye.cli.main",
        "train",
        str(config_path(config)),
        f"paths.root={root}",
        "wandb.mode=none",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(cmd, env=env)
    if result.returncode:
        raise RuntimeError(f"step '{' '.join(cmd[2:])}' failed with exit code {result.returncode}")


def _last_metrics(run_dir: Path) -> str:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    for line in reversed(lines):
        rec = json.loads(line)
        if "loss" in rec:
            extra = "".join(
                f", {k} {rec[k]:.3f}" for k in ("reward/mean", "pass_rate") if isinstance(rec.get(k), (int, float))
            )
            return f"step {rec.get('step')}: loss {rec['loss']:.3f}{extra}"
    return "no metrics"


def run(args: argparse.Namespace) -> int:
    from keye.quiet import quiet

    quiet(True if args.verbose else None)  # here and, through the environment, in every training step
    from data_pipelines.sample_data import make_sample_data
    from keye.paths import config_path

    work = Path(args.workdir).resolve()
    sample, shards = work / "sample", work / "shards"
    started = time.perf_counter()

    report = _step(
        "1. generate sample data (videos, images, conversations, eval fixtures)", lambda: make_sample_data(sample)
    )
    print(f"{report.root}: {report.summary()}")
    video = sample / "media" / "videos" / "cuts_2.mp4"
    _step("2. what the model sees of a video (keye video-info)", lambda: _cli("video-info", video))
    _step(
        "3. webdataset shards (keye shards): pretraining data and one shard set per SFT source",
        lambda: [
            _cli(
                "shards", "--input", jsonl, "--media-root", sample / "media", "--out", out, "--samples-per-shard", "16"
            )
            for jsonl, out in [(sample / "pretrain.jsonl", shards / "pretrain")]
            + [(p, shards / "sft" / p.stem) for p in sorted((sample / "sft").glob("*.jsonl"))]
        ],
    )
    _step(
        "4. a random tiny checkpoint (keye init)",
        lambda: _cli("init", "--config", config_path("model/tiny.yaml"), "--out", work / "init"),
    )

    previous = work / "init"
    for n, what in enumerate(
        ("ViT continued training, SigLIP loss", "projector alignment", "full pretraining", "annealing, RoPE base 8M")
    ):
        out = work / f"stage{n}"
        _step(
            f"5.{n} pretraining stage {n}: {what} (keye train)",
            lambda n=n, out=out, prev=previous: _train(
                f"pretrain/tiny_stage{n}.yaml", work, f"model.path={prev}", f"output_dir={out}"
            ),
            lambda out=out: _last_metrics(out),
        )
        previous = out / "hf"
    _step(
        "6. cold-start SFT, five modes (keye train)",
        lambda: _train("sft/tiny_run.yaml", work, f"model.path={previous}", f"output_dir={work / 'sft'}"),
        lambda: _last_metrics(work / "sft"),
    )
    previous = work / "sft" / "hf"
    _step(
        "7. GSPO with progressive hints (keye train)",
        lambda: _train(
            "rl/tiny.yaml",
            work,
            f"model.path={previous}",
            f"output_dir={work / 'rl'}",
            f"rl.prompts=[{sample / 'rl.jsonl'}]",
            f"rl.rollout.media_root={sample / 'media'}",
            "max_steps=3",  # a few steps show the loop; tests/test_rl_learning.py shows GSPO learning
            "rl.hints.k=2",
        ),
        lambda: _last_metrics(work / "rl"),
    )
    final = work / "rl" / "hf"

    code = work / "crop.py"
    code.write_text(
        "img = Image.open(image_path)\ncrop = img.crop((20, 20, 90, 90))\n"
        "processed_path = os.path.join(temp_output_dir, 'crop.png')\ncrop.save(processed_path)\n"
        "print('cropped to', crop.size)\n"
    )
    _step(
        "8. a Thyme code block in the sandbox (keye sandbox)",
        lambda: _cli(
            "sandbox",
            "--code",
            code,
            "--image",
            sample / "media" / "images" / "shape_000.png",
            "--out-dir",
            work / "sandbox_out",
            "--json",
        ),
    )
    eval_dir = work / "eval"
    _step(
        "9. evaluation of the final checkpoint on generated fixtures (keye eval)",
        lambda: _cli(
            "eval",
            "--model",
            final,
            "--bench",
            "time,kc_mmbench,video_mcq",
            "--data",
            sample / "eval",
            "--out",
            eval_dir,
            "--limit",
            str(args.eval_limit),
            "generation.max_new_tokens=16",
        ),
    )
    _step(
        "10. chat about an image with the final checkpoint (keye chat)",
        lambda: _cli(
            "chat",
            "--model",
            final,
            "--image",
            sample / "media" / "images" / "shape_001.png",
            "--no-think",
            "--max-new-tokens",
            "8",
            "What colour is the shape? Answer with one word.",
        ),
    )
    print(f"\nkeye demo finished in {time.perf_counter() - started:.0f}s; everything is under {work}")
    print("\n".join(summary_lines(work, final, eval_dir, video)))
    return 0


def summary_lines(work: Path, final: Path, eval_dir: Path, video: Path) -> list[str]:
    """The demo's last lines: which checkpoint is final, where the eval report is, and commands to try next (each
    a valid ``keye`` command line, quoted for a POSIX shell)."""
    from keye.paths import config_path

    def cmd(*argv: object) -> str:
        return "    " + " ".join(shlex.quote(str(a)) for a in argv)

    eval_args = ("--data", work / "sample" / "eval", "--out", work / "eval_again", "--limit", 4)

    return [
        f"  final checkpoint: {final} (after GSPO; the SFT model: {work / 'sft' / 'hf'})",
        f"  eval report:      {eval_dir / 'report.md'} (scores: results.json, answers: predictions.jsonl)",
        f"  training logs:    {work}/<stage0..stage3, sft, rl>/metrics.jsonl",
        "  next:",
        cmd("keye", "chat", "--model", final, "--video", video, "--no-think", "What happens in the video?"),
        cmd("keye", "eval", "--model", final, "--bench", "time,kc_mmbench,video_mcq", *eval_args),
        cmd(
            "keye", "train", config_path("sft/tiny_run.yaml"), f"paths.root={work}", "output_dir=sft_again", "--verbose"
        ),
        cmd("keye", "web", "--model", final),
    ]
