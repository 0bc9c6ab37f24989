"""``keye demo``: the whole pipeline on the tiny config and generated media, printing what each step produced.

Each step is the same command a user would type (run in-process), so the demo doubles as a smoke test of the
command-line contract: data → video-info → shards → init → sandbox → eval → chat.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo_out", help="where data, shards, checkpoints and reports go")
    parser.add_argument("--eval-limit", type=int, default=4, help="samples per benchmark in the demo evaluation")


def _step(title: str, fn: Callable[[], object]) -> object:
    print(f"\n=== {title} ===", flush=True)
    start = time.perf_counter()
    result = fn()
    print(f"--- {title}: done in {time.perf_counter() - start:.1f}s", flush=True)
    return result


def _cli(*argv: str) -> None:
    from keye.cli.main import main

    code = main([str(a) for a in argv])
    if code:
        raise RuntimeError(f"step 'keye {' '.join(map(str, argv))}' failed with exit code {code}")


def run(args: argparse.Namespace) -> int:
    from data_pipelines.sample_data import make_sample_data
    from keye.paths import config_path

    work = Path(args.workdir).resolve()
    data, shards, ckpt = work / "data", work / "shards", work / "checkpoints"
    started = time.perf_counter()

    report = _step(
        "1. generate sample data (videos, images, conversations, eval fixtures)", lambda: make_sample_data(data)
    )
    print(f"{report.root}: {report.summary()}")
    video = data / "media" / "videos" / "cuts_2.mp4"
    _step("2. what the model sees of a video (keye video-info)", lambda: _cli("video-info", video))
    for name in ("pretrain", "sft"):
        _step(
            f"3. webdataset shards for {name} (keye shards)",
            lambda name=name: _cli(
                "shards",
                "--input",
                data / f"{name}.jsonl",
                "--media-root",
                data / "media",
                "--out",
                shards / name,
                "--samples-per-shard",
                "16",
            ),
        )
    model_dir = ckpt / "init"
    _step(
        "4. a random tiny checkpoint (keye init)",
        lambda: _cli("init", "--config", config_path("model/tiny.yaml"), "--out", model_dir),
    )

    code = work / "crop.py"
    code.write_text(
        "img = Image.open(image_path)\ncrop = img.crop((20, 20, 90, 90))\n"
        "processed_path = os.path.join(temp_output_dir, 'crop.png')\ncrop.save(processed_path)\n"
        "print('cropped to', crop.size)\n"
    )
    _step(
        "5. a Thyme code block in the sandbox (keye sandbox)",
        lambda: _cli(
            "sandbox",
            "--code",
            code,
            "--image",
            data / "media" / "images" / "shape_000.png",
            "--out-dir",
            work / "sandbox_out",
            "--json",
        ),
    )

    eval_dir = work / "eval"
    _step(
        "6. evaluation on generated fixtures (keye eval)",
        lambda: _cli(
            "eval",
            "--model",
            model_dir,
            "--bench",
            "time,kc_mmbench,video_mcq",
            "--data",
            data / "eval",
            "--out",
            eval_dir,
            "--limit",
            str(args.eval_limit),
            "generation.max_new_tokens=16",
        ),
    )
    print((eval_dir / "report.md").read_text())
    _step(
        "7. chat about a video (keye chat)",
        lambda: _cli(
            "chat",
            "--model",
            model_dir,
            "--video",
            video,
            "--max-new-tokens",
            "24",
            "How many scene cuts are in this video?",
        ),
    )
    print(f"\nkeye demo finished in {time.perf_counter() - started:.0f}s; everything is under {work}")
    return 0
