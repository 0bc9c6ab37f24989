"""KC-MMBench: six Kuaishou short-video tasks, read from the published ``subsets/*.tsv`` + ``images/`` layout.

Columns: ``index``, ``question``, ``answer``, optional ``category``, and ``image_path``, a Python-list literal of
frame paths relative to ``images/`` (the video is given as that frame list). Yes/no tasks get the published
Chinese instruction, the others the reference's "Answer the question using a single word or phrase."; all are
scored by :mod:`keye.answers` (the RL accuracy reward's checker): 是/否 from the answer's conclusion,
Hot_Videos_Aggregation's whole 是/否 list against the underscore-separated truth, the VQA tasks by normalised
match; what the rules cannot decide goes to the LLM judge when one is configured (the report says which).
"""

from __future__ import annotations

import ast
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from eval.benchmarks.base import VQA, Benchmark, LoadResult, Sample
from eval.config import EvalConfig
from keye.answers import YES_NO, YES_NO_LIST, normalize_yes_no, normalize_yes_no_list

YORN_INSTRUCTION = "请直接给出结论，回答是或者否，不需要做额外分析，并且不许回答不确定"
# The reference's suffix for the tasks that are not yes/no (Kwai's VLMEvalKit fork, KwaiVQADataset).
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class KCTask:
    name: str
    tsv: str
    kind: str


TASKS: tuple[KCTask, ...] = (
    KCTask("CPV", "CPV.tsv", VQA),
    KCTask("Hot_Videos_Aggregation", "Video_Topic.tsv", YES_NO_LIST),
    KCTask("Collection_Order", "Video_Order.tsv", VQA),
    KCTask("Pornographic_Comment", "PornComment.tsv", YES_NO),
    KCTask("High_like", "High_like.tsv", YES_NO),
    KCTask("SPU", "SPU.tsv", YES_NO),
)


def parse_path_list(cell: str) -> list[str]:
    """``"['a/1.jpg', 'a/2.jpg']"`` -> list; a plain path string is a one-element list."""
    cell = (cell or "").strip()
    if not cell:
        return []
    if cell.startswith("["):
        value = ast.literal_eval(cell)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"image_path must be a list of strings, got {cell[:80]!r}")
        return list(value)
    return [cell]


def read_tsv(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


class KCMMBenchTask(Benchmark):
    data_keys = ("kc_mmbench", "KC-MMBench", "KC-MMbench")
    default_mode = "think"  # the published runs (Kwai's VLMEvalKit fork, cfg.json: think: true)

    def __init__(self, task: KCTask) -> None:
        self.task = task
        self.name = task.name
        self.prompt_suffix = YORN_INSTRUCTION if task.kind == YES_NO else SHORT_ANSWER_INSTRUCTION

    def load(self, root: Path, cfg: EvalConfig) -> LoadResult:
        tsv = root / "subsets" / self.task.tsv
        if not tsv.is_file():
            raise FileNotFoundError(f"KC-MMBench task {self.name}: expected {tsv} (layout: subsets/*.tsv + images/)")
        rows = read_tsv(tsv)
        missing = {"index", "question", "answer", "image_path"} - set(rows[0] if rows else {})
        if rows and missing:
            raise ValueError(f"{tsv}: missing columns {sorted(missing)}; found {sorted(rows[0])}")
        samples: list[Sample] = []
        skipped: list[str] = []
        for line, row in enumerate(rows, start=2):
            where = f"{tsv.name}:{line} (index {row.get('index')})"
            try:
                frames = [str(root / "images" / p) for p in parse_path_list(row["image_path"])]
                if not frames:
                    raise ValueError("empty image_path")
                absent = [f for f in frames if not Path(f).is_file()]
                if absent:
                    raise FileNotFoundError(f"{len(absent)} frame(s) missing, first {absent[0]}")
                answer = (row["answer"] or "").strip()
                if self.task.kind == YES_NO:
                    label = normalize_yes_no(answer)
                    if label is None:
                        raise ValueError(f"answer {answer!r} is not 是/否/yes/no")
                    answer = label
                elif self.task.kind == YES_NO_LIST:
                    label = normalize_yes_no_list(answer)
                    if not label:
                        raise ValueError(f"answer {answer!r} is not an underscore-separated 是/否 list")
                    answer = label
                samples.append(
                    Sample(
                        id=str(row["index"]).strip(),
                        bench=self.name,
                        category=(row.get("category") or "").strip() or self.name,
                        kind=self.task.kind,
                        question=row["question"] or "",
                        answer=answer,
                        video=frames,
                        source="KC-MMBench",
                    )
                )
            except (ValueError, SyntaxError, FileNotFoundError, KeyError) as exc:
                skipped.append(f"{where}: {exc}")
        return LoadResult(samples, skipped)

    def scoring_note(self, judged: bool) -> str:
        rescue = "; what the rules cannot read is graded by the LLM judge" if judged else ""
        if self.task.kind == VQA:
            if judged:
                return "accuracy × 100; free-form answers graded by the LLM judge (回答正确/回答错误) unless they match exactly"
            return (
                "accuracy × 100; NO LLM judge: free-form answers scored by normalised exact match, "
                "stricter than the published judge-graded numbers"
            )
        if self.task.kind == YES_NO_LIST:
            return f"accuracy × 100; the 是/否 list must equal the underscore-separated truth exactly{rescue}"
        return f"accuracy × 100; 是/否 (yes/no) read from the answer's conclusion after stripping reasoning{rescue}"
