"""Reading benchmark tables (JSON, JSONL, TSV, parquet) into plain dicts, and writing JSONL safely.

A broken JSONL line is returned as an error string rather than raised, so one bad row is skipped and counted.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TABLE_SUFFIXES = (".jsonl", ".json", ".tsv", ".parquet")


def read_table(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, errors) of one table file; the format follows the suffix."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows, errors = [], []
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    errors.append(f"{path.name}:{n}: invalid JSON ({exc.msg})")
                    continue
                if isinstance(row, dict):
                    rows.append(row)
                else:
                    errors.append(f"{path.name}:{n}: expected a JSON object, got {type(row).__name__}")
        return rows, errors
    if suffix == ".json":
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
        if isinstance(data, dict):  # {"id": {...}} or {"data": [...]}
            data = data.get("data", data.get("annotations")) or [{"id": k, **v} for k, v in data.items()]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of objects, got {type(data).__name__}")
        return [r for r in data if isinstance(r, dict)], [
            f"{path.name}: non-object entry" for r in data if not isinstance(r, dict)
        ]
    if suffix == ".tsv":
        csv.field_size_limit(sys.maxsize)
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh, delimiter="\t")), []
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from exc
        return pq.read_table(path).to_pylist(), []
    raise ValueError(f"{path}: unsupported table format {suffix!r}; expected one of {TABLE_SUFFIXES}")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write atomically (temp file + rename), so a crash never leaves a half-written file behind."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
