"""``keye web``: the browser demo. Upload a video or image (or pick a sample), ask, and watch the answer stream."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (keye init or a training export)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default %(default)s; 0 picks a free one)")
    parser.add_argument("--samples", type=Path, help="folder whose videos/images the page offers as samples")
    parser.add_argument(
        "--write-samples", action="store_true", help="first write generated sample media into --samples"
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--max-upload-mb", type=float, default=50.0, help="upload size limit (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="cap on answer length (default %(default)s)")
    parser.add_argument("--fps", type=float, help="video sampling rate (default: the checkpoint's, 2.0)")
    parser.add_argument("--max-frames", type=int, help="cap on sampled frames per video")


def run(args: argparse.Namespace) -> int:
    from keye.quiet import quiet

    quiet()  # third-party logs and progress bars (KEYE_VERBOSE=1 keeps them)
    from keye.inference import ChatEngine
    from keye.web import WebDemo, serve, write_samples

    if args.write_samples:
        if args.samples is None:
            raise ValueError("--write-samples needs --samples DIR (where to write them)")
        for path in write_samples(args.samples):
            print(f"wrote sample {path}", file=sys.stderr)
    if args.max_upload_mb <= 0 or args.max_new_tokens <= 0:
        raise ValueError("--max-upload-mb and --max-new-tokens must be positive")
    video = {}
    if args.fps is not None:
        video["fps"] = args.fps
    if args.max_frames is not None:
        video["max_frames"] = args.max_frames
    engine = ChatEngine.from_pretrained(args.model, device=args.device)
    demo = WebDemo(
        engine,
        model_name=Path(args.model).resolve().name,
        samples_dir=args.samples,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_new_tokens=args.max_new_tokens,
        video_options=video,
    )
    # SIGTERM (service managers, `kill`) ends like Ctrl-C, so the uploads' temp dir is removed either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(demo, args.host, args.port, on_ready=lambda url: print(f"keye web: serving on {url}", flush=True))
    except KeyboardInterrupt:
        print("keye web: stopped", file=sys.stderr)
    return 0
