"""``keye sandbox --code FILE [--image P…] [--json]``: run one Thyme code block exactly as rollouts run it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keye.sandbox import Sandbox, SandboxConfig, extract_code
from keye.typed_config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--code", required=True, help="file with Python code, or model text holding <code>…</code>")
    parser.add_argument(
        "--image", action="append", default=[], help="input image (repeatable); the first is image_path"
    )
    parser.add_argument(
        "--out-dir",
        default=None,
        help="where output images are copied (default: a new temporary directory; the images' paths are printed)",
    )
    parser.add_argument("--config", default=None, help="YAML file for SandboxConfig")
    parser.add_argument("overrides", nargs="*", help="SandboxConfig overrides, e.g. timeout_s=5 memory_mb=1024")
    parser.add_argument("--json", action="store_true", help="print {status, stdout, error, images, truncated} as JSON")


def run(args: argparse.Namespace) -> int:
    path = Path(args.code)
    if not path.is_file():
        raise FileNotFoundError(f"--code: no such file: {path}")
    text = path.read_text()
    code = extract_code(text) if "<code>" in text.lower() else text
    if code is None:
        raise ValueError(f"--code: {path} has a <code> tag but no code between <code> and </code>")
    for image in args.image:
        if not Path(image).is_file():
            raise FileNotFoundError(f"--image: no such file: {image}")
    config = load_config(SandboxConfig, args.config, [*args.overrides, "pool_size=0"])
    with Sandbox(config) as sandbox:
        result = sandbox.run(code, args.image, args.out_dir)
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print(f"status: {result.status}")
        if result.stdout:
            print(result.stdout, end="" if result.stdout.endswith("\n") else "\n")
        if result.error:
            print(f"error: {result.error}", file=sys.stderr)
        for image in result.images:
            print(f"image: {image}")
    return 0 if result.ok else 1
