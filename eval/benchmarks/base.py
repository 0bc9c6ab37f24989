"""What every benchmark does: load its published format, build one prompt, extract, score, aggregate.

A benchmark turns its rows into :class:`Sample` (one shape for all benchmarks); from there prompt building,
extraction and scoring are shared and dispatch on ``Sample.kind``, so a new benchmark is mostly a loader.
A row that cannot be read is recorded in ``LoadResult.skipped`` with the reason and never stops the run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.config import EvalConfig, MediaConfig
from keye.answers import (
    AMBIGUOUS,
    CHOICE,
    TEXT,
    UNANSWERED,
    Check,
    Extracted,
    check_answer,
    choice_letter,
    letter_of,
    split_option_prefix,
)
from keye.judge import Judge
from keye.reasoning import apply_mode

MCQ, VQA = CHOICE, TEXT  # the harness's names for keye.answers' choice and free-text kinds


@dataclass
class Sample:
    """One benchmark item. ``answer`` is a letter (mcq), 是/否 (yes_no), ``是_否_…`` (yes_no_list) or free text.

    ``video`` is a file path or a list of frame-image paths; ``options`` are option texts without letters.
    """

    id: str
    bench: str
    category: str
    kind: str
    question: str
    answer: str
    options: list[str] = field(default_factory=list)
    video: str | list[str] | None = None
    video_start: float | None = None
    video_end: float | None = None
    images: list[str] = field(default_factory=list)
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadResult:
    samples: list[Sample]
    skipped: list[str] = field(default_factory=list)  # "where: why", one per unreadable row


def options_block(options: list[str]) -> str:
    return "\n".join(f"({letter_of(i)}) {o}" for i, o in enumerate(options))


def video_item(sample: Sample, media: MediaConfig) -> dict[str, Any]:
    """The chat ``video`` item with every media setting that decides the score spelled out."""
    item: dict[str, Any] = {
        "type": "video",
        "video": sample.video,
        "fps": media.frame_list_fps if isinstance(sample.video, list) else media.fps,
        "max_frames": media.max_frames,
        "min_pixels": media.min_pixels,
        "max_pixels": media.max_pixels,
        "video_total_pixels": media.video_total_pixels,
        "slow_fast": media.slow_fast,
        "min_frame_similarity": media.min_frame_similarity,
    }
    if sample.video_start is not None:
        item["video_start"] = sample.video_start
    if sample.video_end is not None:
        item["video_end"] = sample.video_end
    return item


def image_item(path: str, media: MediaConfig) -> dict[str, Any]:
    return {"type": "image", "image": path, "min_pixels": media.image_min_pixels, "max_pixels": media.image_max_pixels}


def user_conversation(content: list[dict[str, Any]], text: str, mode: str) -> list[dict[str, Any]]:
    """Media first, then the text with the reasoning-mode suffix (``/think``, ``/no_think`` or none)."""
    return [{"role": "user", "content": [*content, {"type": "text", "text": apply_mode(text, mode)}]}]


class Benchmark(ABC):
    """Base class; subclasses set ``name``/``data_keys`` and implement :meth:`load` (and may refine the rest)."""

    name: str = ""
    data_keys: tuple[str, ...] = ()
    chance_by_category: dict[str, float] = {}
    prompt_suffix: str = ""
    default_mode: str = "auto"  # the reasoning mode when the run does not set one (EvalConfig.mode "")

    # (1) load ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def load(self, root: Path, cfg: EvalConfig) -> LoadResult:
        """Read the benchmark from its published layout under ``root`` (a file or a directory)."""

    # (2) prompt -------------------------------------------------------------------------------------------------
    def prompt(self, sample: Sample) -> str:
        parts = [sample.question.strip()]
        if sample.kind == MCQ and sample.options:
            parts.append(options_block(sample.options))
        if self.prompt_suffix:
            parts.append(self.prompt_suffix)
        return "\n".join(parts)

    def media_items(self, sample: Sample, media: MediaConfig) -> list[dict[str, Any]]:
        items = [image_item(p, media) for p in sample.images]
        if sample.video is not None:
            items.append(video_item(sample, media))
        return items

    def mode(self, cfg: EvalConfig) -> str:
        """The reasoning mode this benchmark is run in: the run's, else the benchmark's own."""
        return cfg.mode or self.default_mode

    def conversation(self, sample: Sample, cfg: EvalConfig) -> list[dict[str, Any]]:
        return user_conversation(self.media_items(sample, cfg.media), self.prompt(sample), self.mode(cfg))

    # (3) extract and (4) score: keye.answers, the checker the RL accuracy reward uses too ----------------------
    def score(self, sample: Sample, output: str, judge: Judge | None = None) -> Check:
        """Extraction, verdict, ``how`` (``rule``/``judge``) and whether the judge failed, for one output."""
        return check_answer(
            output, sample.answer, sample.kind, options=sample.options, question=self.prompt(sample), judge=judge
        )

    def extract(self, sample: Sample, output: str) -> Extracted:
        return self.score(sample, output).extracted

    # (5) aggregate ----------------------------------------------------------------------------------------------
    def chance(self, category: str) -> float | None:
        return self.chance_by_category.get(category)

    def scoring_note(self, judged: bool) -> str:
        return "accuracy × 100; answers matched by rule after stripping reasoning"


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (×100) with counts; unanswered and ambiguous outputs count as wrong and are reported apart."""
    total = len(records)
    correct = sum(1 for r in records if r["correct"])
    return {
        "accuracy": round(100.0 * correct / total, 2) if total else 0.0,
        "correct": correct,
        "total": total,
        "unanswered": sum(1 for r in records if r["status"] == UNANSWERED),
        "ambiguous": sum(1 for r in records if r["status"] == AMBIGUOUS),
    }


def clean_options(options: Any, where: str) -> list[str]:
    """Option texts without their letter prefixes; a mapping ``{"A": text}`` is read in letter order."""
    if isinstance(options, dict):
        options = [options[k] for k in sorted(options)]
    if isinstance(options, str):
        options = [line for line in options.splitlines() if line.strip()]
    if not isinstance(options, (list, tuple)) or len(options) < 2:
        raise ValueError(f"{where}: expected a list of at least 2 options, got {options!r:.80}")
    return [split_option_prefix(str(o))[1] for o in options]


def answer_letter(answer: Any, options: list[str], where: str) -> str:
    """The correct letter from ``A``/``(A)``/``A. text``/an option's text; anything else is an error for that row."""
    text = str(answer).strip()
    letter = choice_letter(text, options)
    if letter is not None:
        return letter
    valid = [letter_of(i) for i in range(len(options))]
    raise ValueError(
        f"{where}: answer {text!r:.60} is neither a letter in {valid[0]}-{valid[-1]} nor one option's text"
    )
