"""Aggregation (overall and per category, with counts and chance) and the Markdown report."""

from __future__ import annotations

from typing import Any

from eval.benchmarks.base import MCQ, Benchmark, Sample, summarize


def chance_of(samples: list[Sample]) -> float | None:
    """Random-guess accuracy × 100 for multiple-choice samples (33.3 with 3 options, 25 with 4)."""
    mcq = [s for s in samples if s.kind == MCQ and s.options]
    if not mcq or len(mcq) != len(samples):
        return None
    return round(sum(100.0 / len(s.options) for s in mcq) / len(mcq), 1)


def aggregate(
    bench: Benchmark, samples: list[Sample], records: dict[str, dict[str, Any]], judged: bool
) -> dict[str, Any]:
    """Scores of one benchmark over the samples that have a record (samples that errored are counted apart)."""
    scored = [(s, records[s.id]) for s in samples if s.id in records]
    categories: dict[str, dict[str, Any]] = {}
    for cat in dict.fromkeys(s.category for s in samples):
        cat_samples = [s for s in samples if s.category == cat]
        entry = summarize([r for s, r in scored if s.category == cat])
        chance = bench.chance(cat) if bench.chance(cat) is not None else chance_of(cat_samples)
        if chance is not None:
            entry["chance"] = chance
        categories[cat] = entry
    overall = summarize([r for _, r in scored])
    chance = chance_of(samples)
    if chance is not None:
        overall["chance"] = chance
    if len(categories) > 1:
        accs = [c["accuracy"] for c in categories.values() if c["total"]]
        overall["category_mean"] = round(sum(accs) / len(accs), 2) if accs else 0.0
    return {
        "overall": overall,
        "categories": categories,
        "scoring": bench.scoring_note(judged),
        "judge": judged,
        "judged_samples": sum(1 for _, r in scored if r.get("scored_by") == "judge"),
        # answers the rules could not decide and the judge never graded: scored wrong, counted here
        "judge_failures": sum(1 for _, r in scored if r.get("judge_failed")),
    }


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def markdown_report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        "# Evaluation report",
        "",
        f"- model: `{cfg.get('model') or cfg.get('engine')}` · engine: `{cfg.get('engine')}` · mode: `{cfg.get('mode')}`",
        f"- media: fps {cfg['media']['fps']} (frame lists: {cfg['media'].get('frame_list_fps')}), max_frames {cfg['media']['max_frames']}, "
        f"slow_fast {cfg['media']['slow_fast']} · decoding: temperature {cfg['generation']['temperature']}, "
        f"max_new_tokens {cfg['generation']['max_new_tokens']}",
        f"- judge: {cfg['judge']['kind']}"
        + ("" if cfg["judge"]["kind"] != "none" else " (free-form answers scored by normalised exact match)"),
        "",
        "| benchmark | category | accuracy | correct / total | unanswered | ambiguous | chance |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, bench in results["benchmarks"].items():
        rows = [("**all**", bench["overall"])] if len(bench["categories"]) > 1 else []
        rows += list(bench["categories"].items())
        for cat, s in rows:
            lines.append(
                f"| {name} | {cat} | {s['accuracy']:.2f} | {s['correct']} / {s['total']} | {s['unanswered']} "
                f"| {s['ambiguous']} | {_fmt(s.get('chance'))} |"
            )
    lines.append("")
    for name, bench in results["benchmarks"].items():
        extra = []
        if bench.get("skipped_rows"):
            extra.append(f"{bench['skipped_rows']} unreadable rows skipped")
        if bench.get("errors"):
            extra.append(f"{bench['errors']} samples failed in the engine and are not scored")
        if bench.get("judge_failures"):
            extra.append(f"{bench['judge_failures']} answers the judge failed to grade, scored wrong")
        lines.append(f"- **{name}**: {bench['scoring']}" + (f" ({'; '.join(extra)})" if extra else ""))
    t = results.get("timing", {})
    if t:
        lines += [
            "",
            f"Generated {t['new_samples']} samples in {t['seconds']:.1f} s ({t['samples_per_s']:.2f} samples/s) "
            f"on {t['world_size']} process(es).",
        ]
    return "\n".join(lines) + "\n"
