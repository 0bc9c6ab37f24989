"""``keye shards``: JSONL conversations + media → webdataset shards, manifest and skip report, then how many of the
written records fit each SFT mode (``keye check-data`` gives the per-record detail). ``--frames`` writes frame shards
(``data_pipelines.frame_shards``): each video decoded once, with the video options the run will train with."""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="JSONL file, one sample record per line")
    parser.add_argument("--media-root", required=True, help="directory the records' media paths are relative to")
    parser.add_argument(
        "--out", required=True, help="output directory for shard-NNNNNN.tar, manifest.json, skipped.jsonl"
    )
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per .tar (default 1000)")
    parser.add_argument(
        "--media-check",
        choices=("none", "open", "decode", "load"),
        default="load",
        help="how to check media: run the training loaders with each item's options (default), decode every "
        "frame, open the first frame, or not at all",
    )
    parser.add_argument("--default-source", default=None, help="source name for records without a 'source'")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    frames = parser.add_argument_group(
        "frame shards", "decode each video once: store its sampled frames typed, sized and timestamped"
    )
    frames.add_argument(
        "--frames", action="store_true", help="write frame shards (the trainer reads them like video shards)"
    )
    frames.add_argument(
        "--frames-codec",
        choices=("webp-lossless", "jpeg"),
        default="webp-lossless",
        help="frame encoding: lossless WebP (default: patches equal decoding the video) or lossy JPEG (smaller)",
    )
    frames.add_argument("--frames-quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    frames.add_argument(
        "--model",
        default=None,
        help="checkpoint whose video options (keye_processor_config.json) the frames are read with (default: the "
        "defaults); training must read videos with the same options",
    )
    frames.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a video option on top of --model's (fps, max_frames, max_pixels, …), as data.video.KEY in a run config",
    )


def frame_encoding(args: argparse.Namespace):
    """The ``FrameEncoding`` of ``--frames``: codec, quality and the video options the frames are read with."""
    import dataclasses

    import yaml

    from data_pipelines.frame_shards import FrameEncoding
    from data_pipelines.media import VideoOptions

    video = VideoOptions()
    if args.model:
        from keye.processing import load_processor_config

        video = load_processor_config(args.model).video
    names = [f.name for f in dataclasses.fields(VideoOptions)]
    changes = {}
    for pair in args.video:
        key, sep, value = pair.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--video {pair!r}: expected KEY=VALUE with KEY one of {sorted(names)}")
        # typed as a command-line override of data.video is (YAML scalars: 2, 0.95, true, null); VideoOptions checks
        changes[key] = None if value.lower() == "none" else yaml.safe_load(value)
    return FrameEncoding(args.frames_codec, args.frames_quality, video.with_changes(changes, "--video"))


def run(args: argparse.Namespace) -> int:
    from data_pipelines.shards import write_shards
    from keye.sft_modes import ModeTally, fit_modes

    tally = ModeTally()
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    frames = frame_encoding(args) if args.frames else None
    report = write_shards(
        args.input,
        args.media_root,
        args.out,
        samples_per_shard=args.samples_per_shard,
        media_check=args.media_check,
        default_source=args.default_source,
        prefix=args.prefix,
        progress=not args.no_progress,
        on_record=lambda record: tally.add(fit_modes(record)),
        frames=frames,
    )
    print(report.summary())
    if frames is not None:
        quality = "" if frames.lossless else f" quality {frames.quality}"
        print(f"frame shards ({frames.codec}{quality}); video options baked in: see {args.out}/manifest.json 'frames'")
    if report.num_skipped:
        print(f"skip details: {args.out}/skipped.jsonl")
    # Which SFT mode each written record fits (informational: pretraining data need not fit any).
    print(tally.summary())
    if tally.fit_none:
        print(f"per-record reasons: keye check-data --input {args.input}")
    return 0
