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
from eval.extract import (
    AMBIGUOUS,
    OK,
    UNANSWERED,
    Extracted,
    extract_choice,
    extract_yes_no,
    extract_yes_no_list,
    letter_of,
    match_choice,
    match_yes_no,
    normalize_text,
    normalize_yes_no_list,
    split_option_prefix,
)
from keye.reasoning import apply_mode, extract_final_answer

MCQ, YES_NO, YES_NO_LIST, VQA = "mcq", "yes_no", "yes_no_list", "vqa"


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

    def conversation(self, sample: Sample, cfg: EvalConfig) -> list[dict[str, Any]]:
        return user_conversation(self.media_items(sample, cfg.media), self.prompt(sample), cfg.mode)

    # (3) extract ------------------------------------------------------------------------------------------------
    def extract(self, sample: Sample, output: str) -> Extracted:
        if sample.kind == MCQ:
            return extract_choice(output, sample.options)
        if sample.kind == YES_NO:
            return extract_yes_no(output)
        if sample.kind == YES_NO_LIST:
            return extract_yes_no_list(output)
        final = extract_final_answer(output)
        return Extracted(OK, final) if final else Extracted(UNANSWERED)

    # (4) score --------------------------------------------------------------------------------------------------
    def score(self, sample: Sample, output: str, judge: Any | None = None) -> tuple[Extracted, bool, str]:
        """(extracted, correct, how) where ``how`` is ``rule`` or ``judge``."""
        ext = self.extract(sample, output)
        if sample.kind == VQA:
            if judge is not None:
                verdict = judge.grade(sample.question, sample.answer, extract_final_answer(output))
                return ext, bool(verdict), "judge"
            ok = ext.status == OK and normalize_text(ext.value or "") == normalize_text(sample.answer)
            return ext, ok, "rule"
        how = "rule"
        if ext.status != OK and judge is not None and sample.kind in (MCQ, YES_NO):
            choices = [letter_of(i) for i in range(len(sample.options))] if sample.kind == MCQ else ["是", "否"]
            picked = judge.choose(self.prompt(sample), extract_final_answer(output), choices)
            if picked:
                again = match_choice(picked, sample.options) if sample.kind == MCQ else match_yes_no(picked)
                if again.status == OK:
                    ext, how = again, "judge"
        if sample.kind == YES_NO_LIST:
            return ext, ext.status == OK and ext.value == normalize_yes_no_list(sample.answer), how
        return ext, ext.status == OK and ext.value == sample.answer, how

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
    valid = [letter_of(i) for i in range(len(options))]
    letter, rest = split_option_prefix(text)
    if letter in valid:
        return letter
    if len(text) == 1 and text.upper() in valid:
        return text.upper()
    matches = [letter_of(i) for i, o in enumerate(options) if normalize_text(o) == normalize_text(rest or text)]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(
        f"{where}: answer {text!r:.60} is neither a letter in {valid[0]}-{valid[-1]} nor one option's text"
    )
