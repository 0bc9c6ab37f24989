"""``keye video-info PATH…``: what the model sees of each video (sampled frames, slow/fast types, sizes, tokens).

``--json`` prints one object per video and line with keys ``path``, ``frames`` (sampled frame indices),
``timestamps`` (the float32 values the released pipeline computes, e.g. 4.050000190734863; the prompt and the human
summary print them with ``media.timestamp_text``: "4.1"), ``frame_types`` (0 slow, 1 fast), ``slow_hw``,
``fast_hw``, ``visual_tokens`` and ``seconds`` (decode through the final per-frame pixel tensors, in this process).
A file that cannot be read prints one error line and the others still run; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from data_pipelines.media import DEFAULT_FPS, FAST, MediaError, VideoClip, VideoOptions, timestamp_text
from data_pipelines.resize import tokens_for
from data_pipelines.video_reader import clip_pixels, load_video


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="video files")
    parser.add_argument("--fps", type=float, default=None, help=f"sampling rate (default {DEFAULT_FPS})")
    parser.add_argument("--max-frames", type=int, default=None, help="cap on sampled frames")
    parser.add_argument(
        "--min-frame-similarity",
        type=float,
        default=VideoOptions.min_frame_similarity,
        help="below this similarity to the last slow frame a frame is slow (default %(default)s)",
    )
    parser.add_argument("--no-slow-fast", action="store_true", help="all frames slow, budget split evenly")
    parser.add_argument("--backend", choices=["auto", "pyav", "decord"], default="auto")
    parser.add_argument("--json", action="store_true", help="one JSON object per line per video")


def _summary(clip: VideoClip, seconds: float) -> dict:
    return {
        "path": clip.path,
        "frames": list(clip.frame_indices),
        "timestamps": list(clip.timestamps),
        "frame_types": list(clip.frame_types),
        "slow_hw": list(clip.slow_hw),
        "fast_hw": list(clip.fast_hw),
        "visual_tokens": clip.visual_tokens(),
        "seconds": round(seconds, 4),
    }


def _human(clip: VideoClip, info: dict) -> str:
    fast = sum(1 for t in clip.frame_types if t == FAST)
    slow_tok, fast_tok = tokens_for(*clip.slow_hw), tokens_for(*clip.fast_hw)
    times = clip.timestamps or [None] * clip.num_frames
    marks = " ".join(
        f"{'' if t is None else timestamp_text(t)}{'f' if k == FAST else 'S'}" for t, k in zip(times, clip.frame_types)
    )
    if clip.native_fps:
        duration = f"  duration {clip.duration:.2f} s at {clip.native_fps:.3f} fps"
    elif clip.duration is not None:
        duration = f"  duration {clip.duration:.2f} s (frame list)"
    else:
        duration = "  frame list without fps: no timestamps"
    return "\n".join(
        [
            f"{clip.path}",
            duration,
            f"  sampled {clip.num_frames} frames: {clip.num_frames - fast} slow, {fast} fast",
            f"  slow {clip.slow_hw[0]}x{clip.slow_hw[1]} ({slow_tok} tokens), fast {clip.fast_hw[0]}x{clip.fast_hw[1]} "
            f"({fast_tok} tokens); visual tokens {info['visual_tokens']}",
            f"  frames (seconds, S slow / f fast): {marks}",
            f"  read in {info['seconds']:.3f} s",
        ]
    )


def run(args: argparse.Namespace) -> int:
    options = VideoOptions(
        fps=args.fps,
        max_frames=args.max_frames,
        min_frame_similarity=args.min_frame_similarity,
        slow_fast=not args.no_slow_fast,
        backend=args.backend,
    )
    failed = 0
    for path in args.paths:
        t0 = time.perf_counter()
        try:
            clip = load_video(path, options)
            clip_pixels(clip)
        except MediaError as exc:
            failed += 1
            print(f"keye video-info: {path}: {exc.reason}: {exc}", file=sys.stderr)
            continue
        info = _summary(clip, time.perf_counter() - t0)
        print(json.dumps(info) if args.json else _human(clip, info), flush=True)
    return 1 if failed else 0
