"""``keye video-info PATH…``: what the model sees of each video (sampled frames, slow/fast types, sizes, tokens).

The video settings are the library defaults, or with ``--model CKPT`` the checkpoint's (``config.video`` of its
``keye_processor_config.json``, what ``keye chat``/``keye web`` and training read the video with); ``--fps``,
``--max-frames``, ``--min-frame-similarity``, ``--no-slow-fast`` and ``--backend`` replace single settings, as a
message item's keys do. The output says which settings were used.

``--json`` prints one object per video and line with keys ``path``, ``frames`` (sampled frame indices),
``timestamps`` (the float32 values the released pipeline computes, e.g. 4.050000190734863; the prompt and the human
summary print them with ``media.timestamp_text``: "4.1"), ``frame_types`` (0 slow, 1 fast), ``slow_hw``,
``fast_hw`` (``[height, width]``), ``visual_tokens``, ``seconds`` (decode through the final per-frame pixel
tensors, in this process) and ``settings`` (``source``: "defaults" or "checkpoint", ``model``, ``config_file``,
``command_line``: the settings set by flags, then the values used: ``fps``, ``max_frames``, ``frame_cap``,
``min_pixels``, ``max_pixels``, ``video_total_pixels``, ``fast_token_ratio``, ``min_frame_similarity``,
``slow_fast``, ``backend``). The human summary prints sizes width first, labelled: "1008x560 (w×h)".
A file that cannot be read prints one error line and the others still run; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from data_pipelines.media import DEFAULT_FPS, FAST, MediaError, VideoClip, VideoOptions, size_text, timestamp_text
from data_pipelines.resize import tokens_for
from data_pipelines.video_reader import clip_pixels, load_video

SETTING_KEYS = (
    "fps",
    "max_frames",
    "frame_cap",
    "min_pixels",
    "max_pixels",
    "video_total_pixels",
    "fast_token_ratio",
    "min_frame_similarity",
    "slow_fast",
    "backend",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="video files")
    parser.add_argument(
        "--model",
        metavar="CKPT",
        help="use this checkpoint's video settings (its keye_processor_config.json), as keye chat and training do "
        "(default: the library defaults)",
    )
    parser.add_argument(
        "--fps", type=float, default=None, help=f"sampling rate (default: the checkpoint's, else {DEFAULT_FPS})"
    )
    parser.add_argument("--max-frames", type=int, default=None, help="cap on sampled frames")
    parser.add_argument(
        "--min-frame-similarity",
        type=float,
        default=None,
        help="below this similarity to the last slow frame a frame is slow "
        f"(default: the checkpoint's, else {VideoOptions.min_frame_similarity})",
    )
    parser.add_argument("--no-slow-fast", action="store_true", help="all frames slow, budget split evenly")
    parser.add_argument("--backend", choices=["auto", "pyav", "decord"], default=None, help="video reader")
    parser.add_argument("--json", action="store_true", help="one JSON object per line per video")


def video_settings(args: argparse.Namespace) -> tuple[VideoOptions, dict]:
    """The options videos are read with and the ``settings`` record saying where they came from.

    With ``--model`` they are the checkpoint's ``config.video`` (read without loading the tokenizer), with the
    flags applied the way ``KeyeVLProcessor.video_options`` applies a message item's keys."""
    base, source, model, config_file = VideoOptions(), "defaults", None, None
    if args.model:
        from keye.paths import checkpoint_dir
        from keye.processing import PROCESSOR_CONFIG, load_processor_config

        directory = checkpoint_dir(args.model)  # "did you mean RUN/hf?" for a run or a checkpoint step
        base, source, model = load_processor_config(directory).video, "checkpoint", str(directory)
        if (directory / PROCESSOR_CONFIG).is_file():
            config_file = str(directory / PROCESSOR_CONFIG)
    flags = {
        "fps": args.fps,
        "max_frames": args.max_frames,
        "min_frame_similarity": args.min_frame_similarity,
        "slow_fast": False if args.no_slow_fast else None,
        "backend": args.backend,
    }
    item = {k: v for k, v in flags.items() if v is not None}
    options = base.for_item(item)
    values = {k: getattr(options, k) for k in SETTING_KEYS if k not in ("fps", "frame_cap")}
    settings = {
        "source": source,
        "model": model,
        "config_file": config_file,
        "command_line": sorted(item),
        "fps": options.sample_fps,
        "frame_cap": options.frame_cap,
        **values,
    }
    return options, {k: settings[k] for k in ("source", "model", "config_file", "command_line", *SETTING_KEYS)}


def settings_text(settings: dict) -> list[str]:
    """Two lines: where the settings came from (and which flags replaced some), then the values that decide frames
    and sizes."""
    if settings["source"] == "defaults":
        where = "library defaults"
    elif settings["config_file"]:
        where = f"checkpoint {settings['model']} ({Path(settings['config_file']).name})"
    else:
        where = f"checkpoint {settings['model']} (no keye_processor_config.json: library defaults)"
    cap = settings["frame_cap"]
    frames = f"max_frames {settings['max_frames']}" if settings["max_frames"] is not None else "max_frames none"
    if settings["max_frames"] is None or settings["max_frames"] > cap:
        frames += f" (cap {cap} = video_total_pixels / min_pixels)"
    parts = [
        f"fps {settings['fps']:g}",
        frames,
        f"video_total_pixels {settings['video_total_pixels']:,} ({settings['video_total_pixels'] // 784:,} tokens)",
        f"min_pixels {settings['min_pixels']:,}",
        f"max_pixels {settings['max_pixels']:,}",
        f"fast_token_ratio {settings['fast_token_ratio']:g}",
        f"min_frame_similarity {settings['min_frame_similarity']:g}",
    ]
    if not settings["slow_fast"]:
        parts.append("slow-fast off")
    flags = f"; from the command line: {', '.join(settings['command_line'])}" if settings["command_line"] else ""
    return [f"settings: {where}{flags}", "  " + ", ".join(parts)]


def _summary(clip: VideoClip, seconds: float, settings: dict) -> dict:
    return {
        "path": clip.path,
        "frames": list(clip.frame_indices),
        "timestamps": list(clip.timestamps),
        "frame_types": list(clip.frame_types),
        "slow_hw": list(clip.slow_hw),
        "fast_hw": list(clip.fast_hw),
        "visual_tokens": clip.visual_tokens(),
        "seconds": round(seconds, 4),
        "settings": settings,
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
            *(f"  {line}" for line in settings_text(info["settings"])),
            duration,
            f"  sampled {clip.num_frames} frames: {clip.num_frames - fast} slow, {fast} fast",
            f"  slow {size_text(clip.slow_hw)} = {slow_tok} tokens, fast {size_text(clip.fast_hw)} = {fast_tok} "
            f"tokens; visual tokens {info['visual_tokens']}",
            f"  frames (seconds, S slow / f fast): {marks}",
            f"  read in {info['seconds']:.3f} s",
        ]
    )


def _error_text(exc: MediaError) -> str:
    """The error's message without the path it starts with (the error line names the path once)."""
    text = str(exc)
    prefix = f"{exc.path}: " if exc.path else ""
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def run(args: argparse.Namespace) -> int:
    options, settings = video_settings(args)
    failed = 0
    for path in args.paths:
        t0 = time.perf_counter()
        try:
            clip = load_video(path, options)
            clip_pixels(clip)
        except MediaError as exc:
            failed += 1
            print(f"keye video-info: {path}: {exc.reason}: {_error_text(exc)}", file=sys.stderr)
            continue
        info = _summary(clip, time.perf_counter() - t0, settings)
        print(json.dumps(info) if args.json else _human(clip, info), flush=True)
    return 1 if failed else 0
