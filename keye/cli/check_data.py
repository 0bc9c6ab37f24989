"""``keye check-data``: which SFT mode each record of a JSONL file fits, and why a record fits none.

Runs the trainer's own checks before anyone trains: the sample schema (``data_pipelines.schema``), duplicate ids,
optionally that media files exist, and the SFT mode rules (``keye.sft_modes.fit_modes``, the ones
``data.check_modes`` drops records by).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EPILOG = (
    "A record is held to the SFT mode its 'source' names (thinking, non_thinking, auto_think, think_with_image, "
    "video); with another source it is reported with the modes it fits, since SFT training only keeps records whose "
    "source is a mode name. Exit status: 0 when every record fits a mode; 1 when any record fits no mode or is "
    "invalid (bad JSON, schema, duplicate id, missing media), after printing one line per record and a summary."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--input", required=True, help="JSONL file, one sample record per line")
    parser.add_argument(
        "--media-root",
        default=None,
        help="also check that every media file exists under this directory (not empty, right extension; "
        "keye shards decodes them)",
    )
    parser.add_argument("--default-source", default=None, help="source name for records without a 'source'")
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object: ok, summary {records, fit, fit_none, invalid, no_sft_source, modes, reasons}, records "
        "[{line, id, source, source_mode, mode, fits, reasons, problem}]",
    )


def _entry(line: int, rid: Any, source: Any, problem: str | None = None) -> dict[str, Any]:
    return {
        "line": line,
        "id": rid,
        "source": source,
        "source_mode": None,
        "mode": None,
        "fits": [],
        "reasons": {},
        "problem": problem,
    }


def _add(results: list[tuple[dict[str, Any], str]], entry: dict[str, Any]) -> None:
    results.append((entry, entry["problem"]))


def check_file(
    path: str | Path, media_root: str | Path | None = None, default_source: str | None = None
) -> tuple[list[tuple[dict[str, Any], str]], Any]:
    """Per record, its ``--json`` ``records`` entry and its one-line report; and the
    :class:`~keye.sft_modes.ModeTally` of the file."""
    from data_pipelines.schema import SchemaError, validate_record
    from data_pipelines.shards import MediaProblem, check_media_files
    from keye.sft_modes import ModeTally, fit_modes

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input JSONL {path} does not exist")
    if media_root is not None and not Path(media_root).is_dir():
        raise FileNotFoundError(f"media root {media_root} is not a directory")
    tally = ModeTally()
    results: list[tuple[dict[str, Any], str]] = []
    seen: set[str] = set()
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                tally.add_invalid("bad_json")
                _add(results, _entry(lineno, None, None, f"bad_json: line is not valid JSON: {exc}"))
                continue
            rid = obj.get("id") if isinstance(obj, dict) else None
            source = obj.get("source", default_source) if isinstance(obj, dict) else None
            try:
                record = validate_record(obj, default_source=default_source)
                if record.id in seen:
                    raise MediaProblem("duplicate_id", f"id {record.id!r} also on an earlier line")
                seen.add(record.id)
                if media_root is not None:
                    check_media_files(record, media_root)
            except SchemaError as exc:
                tally.add_invalid("schema")
                _add(results, _entry(lineno, rid, source, f"schema: {exc}"))
                continue
            except MediaProblem as exc:
                tally.add_invalid(exc.reason)
                _add(results, _entry(lineno, rid, source, f"{exc.reason}: {exc}"))
                continue
            fit = fit_modes(record.to_dict())
            tally.add(fit)
            entry = _entry(lineno, record.id, record.source)
            entry.update(
                source_mode=fit.source_mode,
                mode=fit.mode,
                fits=list(fit.fits),
                reasons=dict(fit.reasons),
                problem=None if fit.mode is not None else fit.explain(),
            )
            results.append((entry, fit.explain()))
    return results, tally


def run(args: argparse.Namespace) -> int:
    results, tally = check_file(args.input, args.media_root, args.default_source)
    if args.json:
        records = [entry for entry, _ in results]
        print(json.dumps({"ok": tally.ok, "summary": tally.as_dict(), "records": records}, ensure_ascii=False))
    else:
        for entry, text in results:
            where = f"line {entry['line']}" + (f" ({entry['id']})" if entry["id"] is not None else "")
            print(f"{where}: {text}")
        print(tally.summary())
    if tally.ok:
        return 0
    problems = []
    if tally.fit_none:
        problems.append(f"{tally.fit_none} fit no SFT mode")
    if tally.invalid:
        problems.append(f"{tally.invalid} invalid")
    print(f"keye check-data: {' and '.join(problems)} of {tally.records} records in {args.input}", file=sys.stderr)
    return 1
