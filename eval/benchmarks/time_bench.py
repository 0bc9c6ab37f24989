"""TIMEBench: temporal video MCQs in five dimensions (Dynamic, Reasoning, Duration, Location, Order).

No official release exists, so the format is ours and documented here. One JSON object per line::

    {"id": "loc-0001", "dimension": "Location", "video_path": "videos/tacos_s13.mp4",
     "clip_start": 12.0, "clip_end": 48.5, "question": "When does the person cut the cucumber?",
     "options": ["at the start", "in the middle", "at the end"], "answer": "B", "source_dataset": "TACoS"}

``video_path`` is relative to the JSONL's directory (or absolute); ``clip_start``/``clip_end`` (seconds, optional)
select the clip the question is about and reach the reader as ``video_start``/``video_end``. ``options`` may carry
letter prefixes (``"(A) …"``); ``answer`` is a letter or an option's text (``answer_letter`` is also accepted).
``--data`` is the JSONL file or a directory holding ``timebench.jsonl`` (else every ``*.jsonl`` in it).
"""

from __future__ import annotations

from pathlib import Path

from eval.benchmarks.base import MCQ, Benchmark, LoadResult, Sample, answer_letter, clean_options
from eval.config import EvalConfig
from eval.records import read_table

TIME_PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly and only give the best option"
DIMENSIONS = ("Dynamic", "Reasoning", "Duration", "Location", "Order")


def _optional_seconds(value: object, key: str, where: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key} must be seconds, got {value!r}") from None


def time_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if (root / "timebench.jsonl").is_file():
        return [root / "timebench.jsonl"]
    files = sorted(root.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"TIME: expected a JSONL file or a directory with *.jsonl, found none at {root}")
    return files


class TimeBench(Benchmark):
    name = "time"
    data_keys = ("time", "TIME", "timebench", "TIMEBench")
    prompt_suffix = TIME_PROMPT_SUFFIX

    def load(self, root: Path, cfg: EvalConfig) -> LoadResult:
        samples: list[Sample] = []
        skipped: list[str] = []
        for path in time_files(root):
            rows, errors = read_table(path)
            skipped.extend(errors)
            for n, row in enumerate(rows, start=1):
                where = f"{path.name} record {n} (id {row.get('id')})"
                try:
                    samples.append(self.parse(row, path.parent, where))
                except (ValueError, KeyError, FileNotFoundError) as exc:
                    skipped.append(f"{where}: {exc}")
        return LoadResult(samples, skipped)

    def parse(self, row: dict, base: Path, where: str) -> Sample:
        for key in ("id", "dimension", "video_path", "question", "options"):
            if row.get(key) in (None, ""):
                raise ValueError(f"missing field {key!r}")
        options = clean_options(row["options"], where)
        answer = row.get("answer", row.get("answer_letter"))
        if answer in (None, ""):
            raise ValueError("missing field 'answer'")
        video = Path(str(row["video_path"]))
        video = video if video.is_absolute() else base / video
        if not video.is_file():
            raise FileNotFoundError(f"video not found: {video}")
        return Sample(
            id=str(row["id"]),
            bench=self.name,
            category=str(row["dimension"]),
            kind=MCQ,
            question=str(row["question"]),
            answer=answer_letter(answer, options, where),
            options=options,
            video=str(video),
            video_start=_optional_seconds(row.get("clip_start"), "clip_start", where),
            video_end=_optional_seconds(row.get("clip_end"), "clip_end", where),
            source=str(row.get("source_dataset") or ""),
        )

    def scoring_note(self, judged: bool) -> str:
        return "accuracy × 100 per dimension; option letter matched after stripping reasoning; chance = 100 / #options"
