"""Generic video multiple choice: any JSON/JSONL/TSV/parquet table with configurable column names.

Presets fill the column names and prompt for published layouts:

- ``videomme``: ``videomme/test-*.parquet`` (or a JSON/JSONL with the same columns) with ``question_id``,
  ``videoID`` (file ``data/<videoID>.mp4``), ``duration`` (short/medium/long: the category), ``question``,
  ``options`` (``["A. …", …]``) and ``answer`` (a letter).
- ``mvbench``: ``json/<task>.json`` lists of ``{video, question, candidates, answer (text), start?, end?}``; the
  task (file stem) is the category and videos live under ``video/`` (``video/<task>/`` is also tried).

Explicit ``video_mcq.*`` settings override the preset; unset id columns become ``<file stem>-<row>``.
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Any

from eval.benchmarks.base import MCQ, Benchmark, LoadResult, Sample, answer_letter, clean_options
from eval.config import EvalConfig, VideoMCQConfig
from eval.records import TABLE_SUFFIXES, read_table

DEFAULTS = VideoMCQConfig(
    file="*.jsonl",
    id_key="id",
    video_key="video",
    question_key="question",
    options_key="options",
    answer_key="answer",
    category_key="category",
    start_key="start",
    end_key="end",
    prompt_suffix="Answer with the option's letter from the given choices directly.",
)

PRESETS: dict[str, VideoMCQConfig] = {
    "videomme": dataclasses.replace(
        DEFAULTS,
        preset="videomme",
        file="videomme/test-*.parquet|*.parquet|*.jsonl|*.json",
        video_root="data",
        id_key="question_id",
        video_key="videoID",
        category_key="duration",
        video_ext=".mp4",
        prompt_prefix="Select the best answer to the following multiple-choice question based on the video. "
        "Respond with only the letter of the correct option.",
        prompt_suffix="The best answer is:",
    ),
    "mvbench": dataclasses.replace(
        DEFAULTS,
        preset="mvbench",
        file="json/*.json",
        video_root="video",
        id_key="",
        options_key="candidates",
        category_key="",
        prompt_suffix="Answer with the option's letter from the given choices directly. Best option: (",
    ),
}


def resolve_layout(cfg: VideoMCQConfig) -> VideoMCQConfig:
    """Preset (or the generic defaults) overlaid with every non-empty explicit setting."""
    if cfg.preset and cfg.preset not in PRESETS:
        raise ValueError(f"video_mcq.preset must be one of {sorted(PRESETS)} or empty, got {cfg.preset!r}")
    base = PRESETS.get(cfg.preset, DEFAULTS)
    explicit = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name)}
    return dataclasses.replace(base, **explicit)


def table_files(root: Path, pattern: str) -> list[Path]:
    if root.is_file():
        return [root]
    for alt in pattern.split("|"):
        alt_path = alt if Path(alt).is_absolute() else str(root / alt)
        found = sorted(Path(p) for p in glob.glob(alt_path) if Path(p).suffix.lower() in TABLE_SUFFIXES)
        if found:
            return found
    raise FileNotFoundError(f"video_mcq: no table matching {pattern!r} under {root}")


class VideoMCQ(Benchmark):
    data_keys = ("video_mcq",)
    prompt_prefix = ""  # set from the layout by load()

    def __init__(self, name: str = "video_mcq", preset: str = "") -> None:
        self.name = name
        self.preset = preset
        self.data_keys = (name, "video_mcq")

    def layout(self, cfg: EvalConfig) -> VideoMCQConfig:
        mc = cfg.video_mcq
        if self.preset and not mc.preset:
            mc = dataclasses.replace(mc, preset=self.preset)
        return resolve_layout(mc)

    def load(self, root: Path, cfg: EvalConfig) -> LoadResult:
        lay = self.layout(cfg)
        self.prompt_prefix, self.prompt_suffix = lay.prompt_prefix, lay.prompt_suffix
        files = table_files(root, lay.file)
        data_root = root if root.is_dir() else root.parent
        samples: list[Sample] = []
        skipped: list[str] = []
        for path in files:
            rows, errors = read_table(path)
            skipped.extend(errors)
            for n, row in enumerate(rows, start=1):
                where = f"{path.name} row {n}"
                try:
                    samples.append(self.parse(row, n, path, data_root, lay, where, multi=len(files) > 1))
                except (ValueError, KeyError, FileNotFoundError) as exc:
                    skipped.append(f"{where}: {exc}")
        return LoadResult(samples, skipped)

    def parse(
        self, row: dict[str, Any], n: int, path: Path, data_root: Path, lay: VideoMCQConfig, where: str, multi: bool
    ) -> Sample:
        for key in (lay.video_key, lay.question_key, lay.options_key, lay.answer_key):
            if row.get(key) in (None, ""):
                raise ValueError(f"missing column {key!r} (columns: {sorted(row)[:12]})")
        options = clean_options(row[lay.options_key], where)
        if lay.category_key and row.get(lay.category_key) not in (None, ""):
            category = str(row[lay.category_key])
        else:
            category = path.stem if multi or lay.preset == "mvbench" else "all"
        video = self.find_video(str(row[lay.video_key]) + lay.video_ext, data_root, lay.video_root, category)
        sid = str(row[lay.id_key]) if lay.id_key and row.get(lay.id_key) not in (None, "") else f"{path.stem}-{n}"
        return Sample(
            id=sid,
            bench=self.name,
            category=category,
            kind=MCQ,
            question=str(row[lay.question_key]),
            answer=answer_letter(row[lay.answer_key], options, where),
            options=options,
            video=str(video),
            video_start=_seconds(row.get(lay.start_key)) if lay.start_key else None,
            video_end=_seconds(row.get(lay.end_key)) if lay.end_key else None,
            source=self.preset or self.name,
        )

    @staticmethod
    def find_video(name: str, data_root: Path, video_root: str, category: str) -> Path:
        candidates = [Path(name)] if Path(name).is_absolute() else []
        base = data_root / video_root if video_root else data_root
        candidates += [base / name, base / category / name, data_root / name]
        for c in candidates:
            if c.is_file():
                return c
        raise FileNotFoundError(f"video {name!r} not found (tried {', '.join(str(c) for c in candidates)})")

    def prompt(self, sample: Sample) -> str:
        text = super().prompt(sample)
        return f"{self.prompt_prefix}\n{text}" if self.prompt_prefix else text


def _seconds(value: Any) -> float | None:
    if value in (None, ""):
        return None
    return float(value)
