"""Benchmark registry: a name on the command line -> benchmark objects (``kc_mmbench`` expands to its six tasks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from eval.benchmarks.base import Benchmark, LoadResult, Sample
from eval.benchmarks.kc_mmbench import TASKS, KCMMBenchTask
from eval.benchmarks.time_bench import TimeBench
from eval.benchmarks.video_mcq import VideoMCQ
from eval.config import EvalConfig

REGISTRY: dict[str, Callable[[], list[Benchmark]]] = {
    "kc_mmbench": lambda: [KCMMBenchTask(t) for t in TASKS],
    **{t.name.lower(): (lambda t=t: [KCMMBenchTask(t)]) for t in TASKS},
    "time": lambda: [TimeBench()],
    "video_mcq": lambda: [VideoMCQ()],
    "videomme": lambda: [VideoMCQ("videomme", preset="videomme")],
    "mvbench": lambda: [VideoMCQ("mvbench", preset="mvbench")],
}
ALIASES = {"timebench": "time", "kc-mmbench": "kc_mmbench", "video-mme": "videomme"}


def get_benchmarks(names: list[str]) -> list[Benchmark]:
    """Benchmarks for ``names`` (case-insensitive, duplicates removed, order kept)."""
    out: list[Benchmark] = []
    seen: set[str] = set()
    for raw in names:
        key = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if key not in REGISTRY:
            raise ValueError(f"unknown benchmark {raw!r}; known: {', '.join(sorted(REGISTRY))}")
        for bench in REGISTRY[key]():
            if bench.name not in seen:
                seen.add(bench.name)
                out.append(bench)
    return out


def data_root(bench: Benchmark, cfg: EvalConfig) -> Path:
    """``data_paths[<name or data key>]`` if given, else ``data`` (or its sub-directory named like the benchmark)."""
    keys = (bench.name, *bench.data_keys)
    for key in keys:
        if key in cfg.data_paths:
            return Path(cfg.data_paths[key])
    if not cfg.data:
        raise ValueError(f"benchmark {bench.name}: no data path (give --data or data_paths.{bench.name}=PATH)")
    root = Path(cfg.data)
    if root.is_dir():
        for key in keys:
            if (root / key).exists():
                return root / key
    if not root.exists():
        raise FileNotFoundError(f"benchmark {bench.name}: data path {root} does not exist")
    return root


__all__ = ["REGISTRY", "Benchmark", "LoadResult", "Sample", "data_root", "get_benchmarks"]
