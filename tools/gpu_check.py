#!/usr/bin/env python
"""The GPU session's one prepared run: GPU tests, the training benchmark, the anchors, eval and GSPO throughput.

    bash tools/gpu_check.sh             # on the lent GPU machine (installs the carried .whl/ first)
    bash tools/gpu_check.sh --dry-run   # here and in CI: the same steps on the CPU with tiny sizes

GPU time is the scarcest thing this project has (15 minutes a session, start-up included), so every step runs as
its own subprocess under its own timeout, in order of value (tests, training benchmark, anchors, eval, RL), inside
one overall budget: a step that fails or hangs costs only itself, and steps the budget cannot reach are marked
skipped. ``OUT/gpu_check.json`` is rewritten after every step (what has finished comes back even if the call is cut
off); ``OUT/gpu_check.log`` holds every step's output; ``OUT/tests.xml`` the test report. The script exits 0 even
when a step fails: failures are in the JSON.

JSON keys: ``tests`` (counts + one entry per test), ``bench`` (rows with ``seq_len``, ``tokens_per_s``,
``mfu_llm``, ``mfu_with_vit``, ``peak_mem_gb``, ``attn``, ``ckpt``), ``anchors`` (the plain-transformers anchor
scripts, same machine, same call), ``eval`` (samples/s), ``rl`` (one GSPO rollout + update step), ``device``,
``versions``, ``steps`` (status and seconds of each step), ``dry_run``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import py_compile
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB_TO_GB = 2**30 / 1e9


class StepFailed(RuntimeError):
    """A step's command failed; the message is its last output lines."""


class Check:
    """Runs the steps, keeps the JSON and the log, and hands each step the time it may still use."""

    def __init__(self, out: Path, work: Path, dry_run: bool, budget_s: float, anchors: Path) -> None:
        self.out, self.work, self.dry_run, self.anchors = out, work, dry_run, anchors
        self.deadline = time.monotonic() + budget_s
        self.step_deadline = self.deadline
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "gpu_check.log"
        self.log_path.write_text("")
        self.result: dict[str, Any] = {"dry_run": dry_run, "steps": {}}
        self.env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            WANDB_MODE="disabled",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        )
        if dry_run:
            self.env.update(KEYE_GPU_DRY_RUN="1", CUDA_VISIBLE_DEVICES="")

    def log(self, text: str) -> None:
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=1))

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def failures(self) -> list[str]:
        """Steps that did not finish ok and tests that failed (``--strict`` turns them into a non-zero exit)."""
        bad = [
            f"step {n}: {s['status']} {s.get('error', '')}"
            for n, s in self.result["steps"].items()
            if s["status"] != "ok"
        ]
        tests = self.result.get("tests") or {}
        bad += [
            f"test {c['name']}: {c['outcome']}" for c in tests.get("cases", []) if c["outcome"] in ("failed", "errors")
        ]
        return bad

    def sh(self, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
        """Run ``argv`` from the repo root; its output goes to the log and is returned. Raises on failure."""
        timeout = min(timeout, self.step_left())
        if timeout < 5:
            raise TimeoutError("no time left in the budget")
        self.log(f"$ {' '.join(argv)}  (timeout {timeout:.0f}s)")
        try:
            proc = subprocess.run(
                argv,
                cwd=ROOT,
                env={**self.env, **(env or {})},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                errors="replace",
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
            self.log(out)
            raise TimeoutError(f"timed out after {timeout:.0f}s: {' '.join(argv[-3:])}") from None
        self.log(proc.stdout)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.strip().splitlines()[-6:])
            raise StepFailed(f"exit {proc.returncode}: {tail}")
        return proc.stdout

    def step(self, name: str, cap_s: float, fn: Callable[[], Any]) -> None:
        """Run one step under ``cap_s`` (and the overall budget); record its result or failure."""
        record: dict[str, Any] = {"cap_s": cap_s}
        if self.remaining() < 10:
            record.update(status="skipped", error="out of time budget")
        else:
            self.log(f"\n===== {name} =====")
            t0 = time.monotonic()
            self.step_deadline = min(self.deadline, t0 + cap_s)
            try:
                self.result[name] = fn()
                record["status"] = "ok"
            except TimeoutError as exc:
                record.update(status="timeout", error=str(exc))
            except Exception as exc:  # noqa: BLE001 - one failing step must never cost the others
                record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[-1500:])
            record["seconds"] = round(time.monotonic() - t0, 1)
        self.result["steps"][name] = record
        self.log(f"----- {name}: {record}")
        self.save()

    def step_left(self) -> float:
        """Seconds left to the current step (its cap, or the overall budget if sooner)."""
        return self.step_deadline - time.monotonic()


# --- steps ------------------------------------------------------------------------------------------------------
def describe_machine(check: Check) -> None:
    import torch

    device: dict[str, Any] = {"name": "cpu", "cuda": torch.cuda.is_available(), "host": platform.node()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device.update(
            name=torch.cuda.get_device_name(0),
            count=torch.cuda.device_count(),
            memory_gb=round(props.total_memory / 1e9, 1),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            device["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            device["nvidia_smi"] = f"unavailable: {exc}"
    versions = {"python": platform.python_version(), "torch_cuda": torch.version.cuda}
    for dist in ("torch", "transformers", "deepspeed", "tokenizers", "numpy", "av", "flash-attn", "triton"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    check.result.update(device=device, versions=versions)
    check.save()


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and one entry per test case from pytest's JUnit XML."""
    cases, counts = [], {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "")[:600]
        counts[outcome] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        cases.append({"name": name, "outcome": outcome, "seconds": float(case.get("time", 0)), "message": message})
    return {**counts, "cases": cases}


def gpu_test_files() -> list[str]:
    """The test files that hold ``gpu``-marked tests (the others need not even import on the GPU machine)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def run_tests(check: Check) -> dict[str, Any]:
    """``pytest -m gpu`` over the files with GPU tests; a file that fails to import is reported, not fatal."""
    report = check.out / "tests.xml"
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "timeout=300"]
    argv += ["--continue-on-collection-errors", f"--junitxml={report}", *gpu_test_files()]
    with contextlib.suppress(StepFailed):  # test failures are in the report
        check.sh(argv, check.step_left())
    if not report.exists():
        raise StepFailed("pytest wrote no report (see the log)")
    return junit_summary(report)


def bench_rows(stdout: str) -> list[dict[str, Any]]:
    """``tools/bench_train.py``'s JSON lines, with the check's key names added."""
    rows = []
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        row["mfu_with_vit"] = row.get("mfu_llm_vit")
        gib = row.get("peak_mem_gib")
        row["peak_mem_gb"] = round(gib * GIB_TO_GB, 2) if gib is not None else None
        rows.append(row)
    return rows


def run_bench(check: Check) -> list[dict[str, Any]]:
    base = [sys.executable, "tools/bench_train.py"]
    if check.dry_run:
        runs = [["--tiny", "--seq", "256", "512"], ["--tiny", "--seq", "256", "--no-ckpt"]]
    else:
        cfg = ["--config", "configs/model/keye_1_7b.yaml", "--steps", "5", "--warmup", "2"]
        runs = [[*cfg, "--seq", "8192", "32768"], [*cfg, "--seq", "8192", "--no-ckpt"]]
    rows: list[dict[str, Any]] = []
    for extra in runs:
        try:
            rows += bench_rows(check.sh(base + extra, check.step_left()))
        except StepFailed as exc:
            rows.append({"args": " ".join(extra), "error": str(exc)})
        check.result["bench"] = rows
        check.save()
    return rows


_NUMBER = re.compile(r"^-?[\d,]*\.?\d+")


def parse_anchor_line(line: str) -> dict[str, Any]:
    """``key=value`` fields of an anchor's result line (``tok/s=12,345`` → 12345.0, ``MFU=31.7%`` → 31.7)."""
    fields: dict[str, Any] = {}
    for token in line.split():
        if "=" not in token:
            continue
        key, value = token.split("=", 1)
        if value in ("True", "False"):
            fields[key] = value == "True"
            continue
        m = _NUMBER.match(value)
        fields[key] = (
            float(m.group(0).replace(",", "")) if m and value[m.end() :] in ("", "%", "ms", "GiB", "B") else value
        )
    return fields


def run_anchors(check: Check) -> list[dict[str, Any]]:
    """Each anchor script with and without activation checkpointing at 8K (dry run: compiled only)."""
    scripts = sorted(check.anchors.glob("*.py"))
    if not scripts:
        missing = f"no anchor scripts in {check.anchors} (make gpu-wheels copies them from ../shared/anchors)"
        if check.dry_run:  # a clone without ../shared beside it (CI) still checks every other step
            return [{"status": missing}]
        raise StepFailed(missing)
    rows: list[dict[str, Any]] = []
    for script in scripts:
        for ckpt in ("0", "1"):
            row: dict[str, Any] = {"script": script.name, "ckpt": ckpt == "1", "seq": 8192}
            if check.dry_run:
                py_compile.compile(str(script), cfile=str(check.work / f"{script.stem}.pyc"), doraise=True)
                row["status"] = "compiled (needs CUDA)"
            else:
                try:
                    out = check.sh(
                        [sys.executable, str(script)], min(90, check.step_left()), {"SEQ": "8192", "CKPT": ckpt}
                    )
                    lines = [ln for ln in out.splitlines() if "tok/s=" in ln]
                    row.update(parse_anchor_line(lines[-1]) if lines else {"error": "no result line"})
                except (StepFailed, TimeoutError) as exc:
                    row["error"] = "out of memory" if "OutOfMemory" in str(exc) else str(exc)
            rows.append(row)
            check.result["anchors"] = rows
            check.save()
    return rows


def _checkpoint(check: Check) -> Path:
    """A random ~2B checkpoint (tiny in the dry run), made once for the eval and RL steps."""
    ckpt = check.work / "ckpt"
    if not (ckpt / "config.json").exists():
        config = "configs/model/tiny.yaml" if check.dry_run else "configs/model/keye_1_7b.yaml"
        check.sh([sys.executable, "-m", "keye.cli.main", "init", "--config", config, "--out", str(ckpt)], 240)
    return ckpt


def _sample_data(check: Check) -> Path:
    sample = check.work / "sample"
    if not (sample / "rl.jsonl").exists():
        code = f"from data_pipelines.sample_data import make_sample_data; make_sample_data({str(sample)!r})"
        check.sh([sys.executable, "-c", code], 120)
    return sample


def run_eval(check: Check) -> dict[str, Any]:
    ckpt, sample = _checkpoint(check), _sample_data(check)
    out = check.work / "eval"
    limit, new_tokens = ("2", "8") if check.dry_run else ("16", "64")
    argv = [sys.executable, "-m", "eval", "--model", str(ckpt), "--bench", "time,kc_mmbench,video_mcq"]
    argv += ["--data", str(sample / "eval"), "--out", str(out), "--limit", limit]
    argv += [f"generation.max_new_tokens={new_tokens}", "generation.batch_size=8"]
    check.sh(argv, check.step_left())
    timing = json.loads((out / "results.json").read_text())["timing"]
    return {**timing, "max_new_tokens": int(new_tokens), "model": "tiny" if check.dry_run else "keye_1_7b"}


def run_rl(check: Check) -> dict[str, Any]:
    ckpt, sample = _checkpoint(check), _sample_data(check)
    out = check.work / "rl"
    argv = [sys.executable, "-m", "train", "configs/rl/tiny.yaml", f"model.path={ckpt}", f"output_dir={out}"]
    argv += [f"rl.prompts=[{sample / 'rl.jsonl'}]", f"rl.rollout.media_root={sample / 'media'}", "max_steps=1"]
    argv += ["distributed.precision=auto", "checkpoint.every_steps=1000", "wandb.mode=none", "logging.progress=false"]
    check.sh(argv, check.step_left())
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r for r in rows if "event" not in r and "step_time_s" in r]
    if not steps:
        raise StepFailed(f"no step metrics in {out / 'metrics.jsonl'}")
    keys = ("step_time_s", "time/rollout_s", "time/update_s", "rollouts", "tokens/generated")
    keys += ("tokens/rollout_per_s", "tokens/update_per_s", "memory_gb")
    return {**{k: steps[-1].get(k) for k in keys}, "model": "tiny" if check.dry_run else "keye_1_7b"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny sizes")
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/keye_gpu_check/out", help="default $OUT")
    p.add_argument("--work", default="/tmp/keye_gpu_check/work", help="checkpoints and sample data")
    p.add_argument("--budget", type=float, default=510, help="seconds for all steps together")
    p.add_argument("--anchors", default=str(ROOT / ".whl" / "anchors"), help="the anchor scripts (carried)")
    p.add_argument("--strict", action="store_true", help="exit 1 if a step or a test failed (CI's dry run)")
    args = p.parse_args(argv)
    check = Check(Path(args.out), Path(args.work), args.dry_run, args.budget, Path(args.anchors))
    t0 = time.monotonic()
    describe_machine(check)
    # (name, cap in seconds on the GPU, function), in order of value
    for name, cap, fn in (
        ("tests", 200, run_tests),
        ("bench", 110, run_bench),
        ("anchors", 180, run_anchors),
        ("eval", 110, run_eval),
        ("rl", 90, run_rl),
    ):
        check.step(name, cap * (3 if args.dry_run else 1), lambda fn=fn: fn(check))
    check.result["seconds"] = round(time.monotonic() - t0, 1)
    check.save()
    summary = {name: s["status"] for name, s in check.result["steps"].items()}
    print(f"gpu_check: {json.dumps(summary)} in {check.result['seconds']}s; {check.out / 'gpu_check.json'}")
    failures = check.failures()
    for line in failures:
        print(f"gpu_check: {line}"[:400])
    return 1 if failures and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
