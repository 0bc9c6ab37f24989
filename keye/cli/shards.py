"""``keye shards``: JSONL conversations + media → webdataset shards, manifest and skip report, then how many of the
written records fit each SFT mode (``keye check-data`` gives the per-record detail)."""

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


def run(args: argparse.Namespace) -> int:
    from data_pipelines.shards import write_shards
    from keye.sft_modes import ModeTally, fit_modes

    tally = ModeTally()
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
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
    )
    print(report.summary())
    if report.num_skipped:
        print(f"skip details: {args.out}/skipped.jsonl")
    # Which SFT mode each written record fits (informational: pretraining data need not fit any).
    print(tally.summary())
    if tally.fit_none:
        print(f"per-record reasons: keye check-data --input {args.input}")
    return 0
