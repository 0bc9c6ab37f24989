"""The evaluation loop: load → shard → batch-generate → extract/score → append predictions → gather → report.

- Sharding: the samples of all benchmarks, in load order, are dealt round-robin (rank r takes every G-th), and
  rank 0 restores the load order after the gather, so a G-process run writes what a 1-process run writes.
- Resume: every prediction is appended and flushed as soon as it exists (``predictions.jsonl``, or one
  ``predictions.rank<r>.jsonl`` per rank under torchrun); a rerun skips ids already present in any of them.
  ``eval_config.json`` pins the score-deciding settings, so a rerun with other settings cannot mix results.
- A sample whose generation raises (e.g. an unreadable video) is counted in ``errors`` and not scored; the
  rerun tries it again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from eval.benchmarks import Benchmark, Sample, data_root, get_benchmarks
from eval.config import EvalConfig
from eval.distributed import Dist
from eval.engine import load_engine, settings_for
from eval.judge import make_judge
from eval.records import write_json, write_jsonl
from eval.report import aggregate, markdown_report
from keye.jsonl import open_append
from keye.typed_config import ConfigError, to_dict

PREDICTIONS = "predictions.jsonl"
# Settings that do not change a prediction: where it goes, how many, which benchmarks, progress bars.
_NOT_SCORE_DECIDING = {"out", "limit", "benchmarks", "data", "data_paths", "progress", "device"}


def score_deciding(cfg: EvalConfig) -> dict[str, Any]:
    d = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_SCORE_DECIDING}
    d["generation"] = {k: v for k, v in d["generation"].items() if k != "batch_size"}
    return d


def check_out_dir(out: Path, cfg: EvalConfig) -> None:
    """Refuse to resume into a directory whose predictions were made with other score-deciding settings."""
    path = out / "eval_config.json"
    current = score_deciding(cfg)
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if diff:
            raise ConfigError(
                f"{out} holds predictions made with different settings ({', '.join(diff)}); "
                "use a new --out directory or delete the old predictions"
            )
        return
    write_json(path, current)


def read_done(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Records already produced, from the merged file and any per-rank part files (torn last lines ignored)."""
    done: dict[tuple[str, str], dict[str, Any]] = {}
    for path in [out / PREDICTIONS, *sorted(out.glob("predictions.rank*.jsonl"))]:
        if not path.is_file():
            continue
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    done[(str(rec["bench"]), str(rec["id"]))] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line torn by a crash: that sample is simply generated again
    return done


def load_all(benches: list[Benchmark], cfg: EvalConfig) -> tuple[list[Sample], dict[str, list[str]]]:
    """All samples in a fixed order (benchmark order, then file order); duplicate ids are skipped and reported."""
    samples: list[Sample] = []
    skipped: dict[str, list[str]] = {}
    for bench in benches:
        result = bench.load(data_root(bench, cfg), cfg)
        seen: set[str] = set()
        kept: list[Sample] = []
        skipped[bench.name] = list(result.skipped)
        for s in result.samples:
            if s.id in seen:
                skipped[bench.name].append(f"id {s.id}: duplicate id, later row skipped")
                continue
            seen.add(s.id)
            kept.append(s)
        samples.extend(kept[: cfg.limit] if cfg.limit > 0 else kept)
    return samples, skipped


def make_record(sample: Sample, output: str, bench: Benchmark, judge: Any) -> dict[str, Any]:
    check = bench.score(sample, output, judge)
    ext = check.extracted
    return {
        "id": sample.id,
        "bench": sample.bench,
        "category": sample.category,
        "prediction": output,
        "extracted": ext.value,
        "status": ext.status,
        "answer": sample.answer,
        "correct": check.correct,
        "scored_by": check.how,
        "judge_failed": check.judge_failed,
    }


class _Generator:
    """Batches through the engine; a failing batch is retried one sample at a time to isolate the bad sample."""

    def __init__(self, engine: Any, settings: Any) -> None:
        self.engine, self.settings = engine, settings

    def __call__(self, convs: list[list[dict]]) -> list[str | Exception]:
        try:
            return self._checked(convs)
        except Exception:
            if len(convs) == 1:
                raise
        results: list[str | Exception] = []
        for conv in convs:
            try:
                results.extend(self._checked([conv]))
            except Exception as exc:
                results.append(exc)
        return results

    def _checked(self, convs: list[list[dict]]) -> list[str]:
        outputs = list(self.engine.generate(convs, self.settings))
        if len(outputs) != len(convs):
            raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(convs)} conversations")
        return [str(o) for o in outputs]


def generate_shard(
    todo: list[Sample],
    benches: dict[str, Benchmark],
    cfg: EvalConfig,
    engine: Any,
    judge: Any,
    pred_path: Path,
    dist: Dist,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Generate and score ``todo``; every record is on disk (flushed) before the next batch starts."""
    records: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    if not todo:
        return records, errors
    generate = _Generator(engine, settings_for(cfg))
    bar = None
    if dist.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="eval", unit="sample", file=sys.stderr, dynamic_ncols=True)
    bs = max(1, cfg.generation.batch_size)
    with open_append(pred_path) as fh:
        for start in range(0, len(todo), bs):
            batch = todo[start : start + bs]
            convs = [benches[s.bench].conversation(s, cfg) for s in batch]
            try:
                outputs = generate(convs)
            except Exception as exc:  # a batch of one that failed: that sample is the data error
                outputs = [exc]
            for sample, out in zip(batch, outputs):
                if isinstance(out, Exception):
                    errors.append({"bench": sample.bench, "id": sample.id, "error": f"{type(out).__name__}: {out}"})
                    continue
                rec = make_record(sample, out, benches[sample.bench], judge)
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                records.append(rec)
            fh.flush()
            os.fsync(fh.fileno())
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    if errors and not records:
        raise RuntimeError(f"every sample failed in the engine; first error: {errors[0]['id']}: {errors[0]['error']}")
    return records, errors


def run_eval(cfg: EvalConfig, engine: Any = None) -> dict[str, Any] | None:
    """Run ``cfg`` (on every rank under torchrun); returns the results on rank 0 and ``None`` elsewhere."""
    if not cfg.benchmarks:
        raise ConfigError("no benchmarks given (--bench NAME[,NAME…])")
    dist = Dist.from_env()
    try:
        return _run(cfg, engine, dist)
    finally:
        dist.close()


def _run(cfg: EvalConfig, engine: Any, dist: Dist) -> dict[str, Any] | None:
    out = Path(cfg.out)
    problem = None
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        try:
            check_out_dir(out, cfg)
        except ConfigError as exc:
            problem = str(exc)
    problem = dist.broadcast(problem)
    if problem:
        raise ConfigError(problem)

    bench_list = get_benchmarks(cfg.benchmarks)
    benches = {b.name: b for b in bench_list}
    samples, skipped = load_all(bench_list, cfg)
    done = read_done(out)
    mine = samples[dist.rank :: dist.world]
    todo = [s for s in mine if (s.bench, s.id) not in done]
    pred_path = out / (PREDICTIONS if dist.world == 1 else f"predictions.rank{dist.rank}.jsonl")

    judge = None
    owned = engine is None and bool(todo)  # an engine loaded here is closed here (the tool engine's sandbox)
    if todo:  # models load before the clock starts: throughput is generation (and judging) only
        engine = engine if engine is not None else load_engine(cfg)
        judge = make_judge(cfg)
    t0 = time.perf_counter()
    try:
        new_records, errors = generate_shard(todo, benches, cfg, engine, judge, pred_path, dist)
    finally:
        if owned and callable(getattr(engine, "close", None)):
            engine.close()
    elapsed = time.perf_counter() - t0
    mine_done = [done[(s.bench, s.id)] for s in mine if (s.bench, s.id) in done]

    gathered = dist.gather((mine_done + new_records, errors, len(new_records), elapsed))
    dist.barrier()
    if gathered is None:
        return None

    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    all_errors: list[dict[str, str]] = []
    new_total, seconds = 0, 0.0
    for recs, errs, n_new, secs in gathered:
        by_key.update({(r["bench"], r["id"]): r for r in recs})
        all_errors.extend(errs)
        new_total += n_new
        seconds = max(seconds, secs)
    results = finish(out, cfg, bench_list, samples, skipped, by_key, all_errors, done, new_total, seconds, dist.world)
    print(
        f"eval: {len(by_key)} samples scored ({new_total} generated in {seconds:.1f} s, "
        f"{results['timing']['samples_per_s']:.2f} samples/s); results in {out / 'results.json'}",
        file=sys.stderr,
    )
    if results["judge_failures"]:
        why = f"; last error: {judge.last_error}" if judge is not None and judge.last_error else ""
        print(
            f"eval: the judge failed to grade {results['judge_failures']} answers (scored wrong, counted as "
            f"judge_failures in results.json){why}",
            file=sys.stderr,
        )
    return results


def finish(
    out: Path,
    cfg: EvalConfig,
    bench_list: list[Benchmark],
    samples: list[Sample],
    skipped: dict[str, list[str]],
    by_key: dict[tuple[str, str], dict[str, Any]],
    errors: list[dict[str, str]],
    done: dict[tuple[str, str], dict[str, Any]],
    new_total: int,
    seconds: float,
    world: int,
) -> dict[str, Any]:
    """Rank 0: merged predictions in load order (plus older records kept after them), results.json, report.md."""
    ordered = [by_key[(s.bench, s.id)] for s in samples if (s.bench, s.id) in by_key]
    current = {(s.bench, s.id) for s in samples}
    older = [r for k, r in done.items() if k not in current]
    write_jsonl(out / PREDICTIONS, ordered + older)
    for part in out.glob("predictions.rank*.jsonl"):
        part.unlink()

    judged = cfg.judge.kind != "none"
    results: dict[str, Any] = {"benchmarks": {}}
    for bench in bench_list:
        bench_samples = [s for s in samples if s.bench == bench.name]
        recs = {s.id: by_key[(s.bench, s.id)] for s in bench_samples if (s.bench, s.id) in by_key}
        entry = aggregate(bench, bench_samples, recs, judged)
        entry["mode"] = bench.mode(cfg)
        entry["skipped_rows"] = len(skipped[bench.name])
        entry["skipped"] = skipped[bench.name][:50]
        bench_errors = [e for e in errors if e["bench"] == bench.name]
        entry["errors"] = len(bench_errors)
        entry["error_samples"] = bench_errors[:50]
        results["benchmarks"][bench.name] = entry
    results["judge_failures"] = sum(b["judge_failures"] for b in results["benchmarks"].values())
    accs = [b["overall"]["accuracy"] for b in results["benchmarks"].values() if b["overall"]["total"]]
    results["average"] = round(sum(accs) / len(accs), 2) if accs else 0.0
    results["config"] = to_dict(cfg)
    results["timing"] = {
        "samples": len(ordered),
        "new_samples": new_total,
        "seconds": round(seconds, 3),
        "samples_per_s": round(new_total / seconds, 3) if seconds > 0 else 0.0,
        "world_size": world,
    }
    write_json(out / "results.json", results)
    (out / "report.md").write_text(markdown_report(results), encoding="utf-8")
    return results
