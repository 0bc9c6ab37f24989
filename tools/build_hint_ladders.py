"""Build five-level hint ladders offline: JSONL prompts with reference solutions in, the same JSONL with ``hints``.

    python tools/build_hint_ladders.py --input prompts.jsonl --output prompts_hinted.jsonl --model CKPT_DIR

The strong model runs through ``keye.inference.ChatEngine``; all logic is in :mod:`train.rl.hints`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"error: {path}:{lineno}: expected a JSON object per line ({exc.msg})") from None
    return records


def _settings(max_new_tokens: int, temperature: float) -> Any:
    """``GenerationSettings`` with the fields it has of the ones we want (its schema belongs to keye.inference)."""
    from keye.inference import GenerationSettings

    wanted = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    if dataclasses.is_dataclass(GenerationSettings):
        names = {f.name for f in dataclasses.fields(GenerationSettings)}
        wanted = {k: v for k, v in wanted.items() if k in names}
    return GenerationSettings(**wanted)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True, type=Path, help="JSONL: id, messages or question, solution")
    ap.add_argument("--output", required=True, type=Path, help="JSONL with 'hints' (5 strings) added")
    ap.add_argument("--model", required=True, help="local checkpoint directory of the hint-writing model")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--retries", type=int, default=1, help="re-asks for replies that do not parse")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=0.3)
    args = ap.parse_args(argv)

    from keye.inference import ChatEngine
    from train.rl.hints import build_ladders

    records = _read_jsonl(args.input)
    engine = ChatEngine.from_pretrained(args.model)
    failures: list[tuple[str, str]] = []
    args.output.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with args.output.open("w") as out:
        ladders = build_ladders(
            records, engine, _settings(args.max_new_tokens, args.temperature), args.batch_size, args.retries, failures
        )
        for record in ladders:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    print(f"wrote {n} records to {args.output}; {n - len(failures)} with ladders, {len(failures)} without")
    for pid, reason in failures[:10]:
        print(f"  no ladder for {pid}: {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
