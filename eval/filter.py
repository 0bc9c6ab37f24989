"""TIMEBench's robustness filter for any video MCQ benchmark: drop items answerable from one frame, rebalance.

Up to three judge models each answer every item from a single random frame (seeded per item, inside the clip).
An item that at least ``min_correct`` judges get right does not need the video, so it is dropped. The kept items
then have their options permuted (the correct option swapped to a target letter) so that every letter is the
correct one equally often (±1) within each option count. Output: ``filtered.jsonl`` in the TIME schema
(evaluate it with ``--bench time``), ``filter_report.json`` and ``filter_report.md``.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from pathlib import Path
from typing import Any

from eval.benchmarks import Benchmark, Sample, get_benchmarks
from eval.benchmarks.base import MCQ, image_item, user_conversation
from eval.config import EvalConfig
from eval.engine import load_engine, settings_for
from eval.extract import LETTERS, OK
from eval.records import write_json, write_jsonl
from eval.runner import load_all

MAX_JUDGES = 3


def item_rng(seed: int, sample: Sample) -> random.Random:
    return random.Random(f"{seed}:{sample.bench}:{sample.id}")


def video_duration(path: str) -> float:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if container.duration is not None:
            return container.duration / 1_000_000
    raise ValueError(f"{path}: cannot tell the video's duration")


def frame_at(path: str, t: float) -> Any:
    """The first decoded frame at or after ``t`` seconds (the last frame if ``t`` is past the end), as PIL."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        if t > 0 and stream.time_base is not None:
            container.seek(int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
        last = None
        for frame in container.decode(stream):
            last = frame
            if frame.time is not None and frame.time >= t - 1e-6:
                break
    if last is None:
        raise ValueError(f"{path}: no frame could be decoded at {t:.3f}s")
    return last.to_image()


def random_frame(sample: Sample, seed: int, frames_dir: Path) -> str:
    """Path of one seeded random frame of the sample's clip (a frame list is sampled directly)."""
    rng = item_rng(seed, sample)
    if isinstance(sample.video, list):
        return rng.choice(sample.video)
    if not isinstance(sample.video, str):
        raise ValueError(f"{sample.bench}/{sample.id}: no video to take a frame from")
    start = sample.video_start or 0.0
    end = sample.video_end if sample.video_end is not None else video_duration(sample.video)
    t = rng.uniform(start, max(start, end))
    frames_dir.mkdir(parents=True, exist_ok=True)
    out = frames_dir / f"{sample.bench}_{sample.id}.jpg".replace("/", "_")
    frame_at(sample.video, t).convert("RGB").save(out, quality=90)
    return str(out)


def judge_config(cfg: EvalConfig, spec: str) -> EvalConfig:
    """``module:factory`` -> that engine; anything else is a checkpoint directory for the ``keye`` engine."""
    if ":" in spec and not Path(spec).exists():
        return dataclasses.replace(cfg, engine=spec)
    return dataclasses.replace(cfg, engine="keye", model=spec)


def ask_judge(
    bench: Benchmark, samples: list[Sample], frames: dict[str, str], cfg: EvalConfig, engine: Any
) -> dict[str, tuple[str | None, bool]]:
    """id -> (extracted letter, correct) for one judge answering from single frames."""
    settings = settings_for(cfg)
    answers: dict[str, tuple[str | None, bool]] = {}
    bs = max(1, cfg.generation.batch_size)
    for start in range(0, len(samples), bs):
        batch = samples[start : start + bs]
        convs = [
            user_conversation([image_item(frames[s.id], cfg.media)], bench.prompt(s), bench.mode(cfg)) for s in batch
        ]
        outputs = engine.generate(convs, settings)
        for s, out in zip(batch, outputs):
            ext = bench.extract(s, out)
            answers[s.id] = (ext.value, ext.status == OK and ext.value == s.answer)
    return answers


def rebalance(samples: list[Sample], seed: int) -> list[Sample]:
    """Permute options so each letter is correct equally often (±1) among items with the same option count."""
    rng = random.Random(f"rebalance:{seed}")
    out: dict[str, Sample] = {}
    by_k: dict[int, list[Sample]] = {}
    for s in samples:
        by_k.setdefault(len(s.options), []).append(s)
    for k, group in sorted(by_k.items()):
        targets = [i % k for i in range(len(group))]
        rng.shuffle(targets)
        for s, target in zip(group, targets):
            options = list(s.options)
            cur = LETTERS.index(s.answer)
            options[cur], options[target] = options[target], options[cur]
            out[s.id] = dataclasses.replace(s, options=options, answer=LETTERS[target])
    return [out[s.id] for s in samples]


def time_record(s: Sample, original_answer: str) -> dict[str, Any]:
    return {
        "id": s.id,
        "dimension": s.category,
        "video_path": s.video if isinstance(s.video, str) else None,
        "frames": s.video if isinstance(s.video, list) else None,
        "clip_start": s.video_start,
        "clip_end": s.video_end,
        "question": s.question,
        "options": s.options,
        "answer": s.answer,
        "original_answer": original_answer,
        "source_dataset": s.source,
    }


def run_filter(
    cfg: EvalConfig, judges: list[str], seed: int = 0, min_correct: int = 2, engines: list[Any] | None = None
) -> dict[str, Any]:
    """Filter ``cfg.benchmarks[0]``; ``engines`` (one per judge) replaces loading them, for embedding callers."""
    if not 1 <= len(judges) <= MAX_JUDGES:
        raise ValueError(f"eval-filter needs 1 to {MAX_JUDGES} judges, got {len(judges)}")
    if not 1 <= min_correct <= len(judges):
        raise ValueError(f"min_correct must be between 1 and the number of judges ({len(judges)}), got {min_correct}")
    benches = get_benchmarks(cfg.benchmarks)
    if len(benches) != 1:
        raise ValueError(f"eval-filter works on one benchmark at a time, got {[b.name for b in benches]}")
    bench = benches[0]
    samples, skipped = load_all(benches, cfg)
    not_mcq = [s.id for s in samples if s.kind != MCQ]
    if not_mcq:
        raise ValueError(f"{bench.name} is not a multiple-choice benchmark (item {not_mcq[0]} is {samples[0].kind})")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    frames: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    for s in samples:
        try:
            frames[s.id] = random_frame(s, seed, out / "frames")
        except Exception as exc:  # an unreadable video is one bad item, not a failed run
            unreadable[s.id] = f"{type(exc).__name__}: {exc}"
    usable = [s for s in samples if s.id in frames]

    per_judge: dict[str, dict[str, tuple[str | None, bool]]] = {}
    for i, spec in enumerate(judges):
        jcfg = judge_config(cfg, spec)
        engine = engines[i] if engines is not None else load_engine(jcfg)
        per_judge[spec] = ask_judge(bench, usable, frames, jcfg, engine)
        del engine

    kept: list[Sample] = []
    dropped: list[dict[str, Any]] = []
    for s in usable:
        right = [spec for spec in judges if per_judge[spec][s.id][1]]
        if len(right) >= min_correct:
            answers = {spec: per_judge[spec][s.id][0] for spec in judges}
            dropped.append(
                {"id": s.id, "category": s.category, "answer": s.answer, "judges_correct": right, "answers": answers}
            )
        else:
            kept.append(s)
    balanced = rebalance(kept, seed)
    write_jsonl(out / "filtered.jsonl", [time_record(b, k.answer) for b, k in zip(balanced, kept)])

    cats = list(dict.fromkeys(s.category for s in samples))
    report = {
        "benchmark": bench.name,
        "judges": judges,
        "seed": seed,
        "min_correct": min_correct,
        "total": len(samples),
        "kept": len(kept),
        "dropped": len(dropped),
        "unreadable": len(unreadable),
        "judge_accuracy": {
            spec: round(100.0 * sum(ok for _, ok in a.values()) / len(a), 2) if a else 0.0
            for spec, a in per_judge.items()
        },
        "per_category": {
            c: {
                "total": sum(s.category == c for s in samples),
                "kept": sum(s.category == c for s in kept),
                "dropped": sum(d["category"] == c for d in dropped),
            }
            for c in cats
        },
        "letters_before": dict(sorted(Counter(s.answer for s in kept).items())),
        "letters_after": dict(sorted(Counter(s.answer for s in balanced).items())),
        "dropped_items": dropped,
        "unreadable_items": unreadable,
        "skipped_rows": skipped[bench.name],
    }
    write_json(out / "filter_report.json", report)
    (out / "filter_report.md").write_text(filter_markdown(report), encoding="utf-8")
    return report


def filter_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Single-frame filter: {r['benchmark']}",
        "",
        f"Judges: {', '.join(f'`{j}`' for j in r['judges'])} · seed {r['seed']} · drop when ≥ {r['min_correct']} "
        f"judges are right from one random frame.",
        "",
        f"Kept {r['kept']} of {r['total']} ({r['dropped']} dropped, {r['unreadable']} unreadable).",
        "",
        "| category | total | kept | dropped |",
        "|---|---:|---:|---:|",
        *(f"| {c} | {v['total']} | {v['kept']} | {v['dropped']} |" for c, v in r["per_category"].items()),
        "",
        "| judge | single-frame accuracy |",
        "|---|---:|",
        *(f"| `{j}` | {a:.2f} |" for j, a in r["judge_accuracy"].items()),
        "",
        f"Correct letters before rebalancing: {r['letters_before']}; after: {r['letters_after']}.",
        "",
        "## Dropped",
        "",
        "| id | category | answer | judges right |",
        "|---|---|---|---|",
        *(
            f"| {d['id']} | {d['category']} | {d['answer']} | {', '.join(d['judges_correct'])} |"
            for d in r["dropped_items"]
        ),
    ]
    return "\n".join(lines) + "\n"
