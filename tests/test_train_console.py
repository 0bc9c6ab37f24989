"""What ``keye train`` prints: its own lines (the learning rate of each part, one progress bar, checkpoints, the
result), third-party warnings and errors, and none of the libraries' chatter (keye/quiet.py); ``--verbose`` /
``KEYE_VERBOSE=1`` restores it. Plus the other console fixes: decord's native log, the demo's summary, packaging."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.train_helpers import REPO, env, make_records, run_config, write_config, write_nano_model, write_shard_set

NOISE = {
    "DeepSpeed accelerator probe": "Setting accelerator to CPU",
    "torch cpp_extension CUDA_HOME": "CUDA_HOME",
    "DeepSpeed op-build print": "built successfully",
    "wandb banner": "wandb:",
    "ZeRO-3 deprecation": "FutureWarning",
    "transformers progress bars": "Writing model shards",
    "transformers load bar": "Loading weights",
}


def _quiet_env() -> dict[str, str]:
    e = env()
    e.pop("WANDB_MODE", None)  # the run's own default: offline
    e.pop("KEYE_VERBOSE", None)
    return e


@pytest.mark.slow
def test_keye_train_prints_its_own_lines_only(tmp_path):
    """A tiny ZeRO-3 run whose file sets optim.lr over a base file's per-module rates, from a clean working
    directory, with wandb at its default (offline): the run's lines, the effective rate per part, and nothing else."""
    media = tmp_path / "media"
    media.mkdir()
    shards = write_shard_set(tmp_path, "d", make_records(media, 2, 0, 2), media)
    out = tmp_path / "out"
    base = run_config(
        out,
        write_nano_model(tmp_path / "nano.yaml"),
        [str(shards)],
        **{
            "max_steps": 2,
            "optim": {"lr": 1e-3, "vit_lr": 1e-4, "projector_lr": 5e-4, "llm_lr": 5e-4},
            "logging.progress": True,
            "checkpoint.every_steps": 2,
            "checkpoint.export_hf": True,
            "distributed.zero_stage": 3,
        },
    )
    base.pop("wandb")
    write_config(tmp_path / "base.yaml", base)
    run_yaml = write_config(tmp_path / "run.yaml", {"_base_": "base.yaml", "optim": {"lr": 2e-3}})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "keye.cli.main", "train", str(run_yaml)],
        cwd=cwd,
        env=_quiet_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("test: learning rates: vit, projector, llm 2.00e-03 (optim.lr, "), lines[0]
    assert "replaces optim.vit_lr=0.0001 (" in lines[0]
    assert lines[-1].startswith("test: stopped at step 2 (max_steps)")
    for what, text in NOISE.items():
        assert text not in output, f"{what} on the console:\n{output[-3000:]}"
    assert "[test] checkpoint: step=2" in proc.stdout and "finished" not in output
    assert not (cwd / "wandb").exists(), "wandb wrote into the working directory"
    assert (out / "wandb").is_dir(), "wandb (offline) keeps its files under output_dir"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {k: v for row in rows if row.get("step") == 1 for k, v in row.items() if k.startswith("lr/")}
    assert len(lrs) == 6 and set(lrs.values()) == {2e-3}, lrs  # asked 2e-3, trained 2e-3 (constant schedule)


def test_verbose_restores_the_libraries_lines():
    """The switch itself: importing DeepSpeed after ``keye.quiet.quiet()`` (what ``keye train`` does first) hides
    its accelerator notice; with ``KEYE_VERBOSE=1`` it is back, and the ZeRO-3 deprecation filter is message-bound."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("DeepSpeed prints its CPU-accelerator notice only without a GPU")
    code = (
        "import warnings\n"
        "from keye.quiet import quiet\n"
        "quiet()\n"
        "import deepspeed\n"
        "warnings.warn('`torch.distributed.reduce_scatter_tensor` is deprecated. Use x.', FutureWarning)\n"
        "warnings.warn('something else is deprecated', FutureWarning)\n"
    )

    def run(**extra: str) -> str:
        e = {**_quiet_env(), **extra}
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    quiet, verbose = run(), run(KEYE_VERBOSE="1")
    assert "Setting accelerator to CPU" not in quiet and "reduce_scatter_tensor" not in quiet
    assert "something else is deprecated" in quiet  # other warnings stay
    assert "Setting accelerator to CPU" in verbose and "reduce_scatter_tensor" in verbose


def test_decord_native_log_is_captured(capfd, tmp_path):
    """decord's C++ log (with its build machine's source path) and FFmpeg's line go to fd 2 directly: captured."""
    from data_pipelines.native_log import captured_native_stderr

    with captured_native_stderr() as log:
        os.write(2, b"native line\n")
    assert log.text == "native line\n" and capfd.readouterr().err == ""
    decord = pytest.importorskip("decord")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 500)
    with pytest.raises(Exception), captured_native_stderr() as log:  # noqa: B017 (decord's own error types)
        decord.VideoReader(str(bad))
    assert "ERROR opening" in log.text
    assert capfd.readouterr().err == ""


def test_demo_summary_names_the_final_checkpoint_the_report_and_valid_next_commands(tmp_path):
    from keye.cli.demo import summary_lines
    from keye.cli.main import build_parser

    work = tmp_path / "demo out"  # a space: the commands must be quoted for a shell
    lines = summary_lines(work, work / "rl" / "hf", work / "eval", work / "sample" / "media" / "videos" / "a.mp4")
    assert 5 <= len(lines) <= 10
    text = "\n".join(lines)
    assert (
        f"final checkpoint: {work / 'rl' / 'hf'}" in text and f"eval report:      {work / 'eval' / 'report.md'}" in text
    )
    commands = [shlex.split(line) for line in lines if line.strip().startswith("keye ")]
    assert {c[1] for c in commands} >= {"chat", "eval", "train"}
    for argv in commands:
        build_parser(only=argv[1]).parse_args(argv[1:])  # each is a valid keye command line


def test_package_builds_without_setuptools_warnings(tmp_path):
    """setup.py lists keye.web.static (the web page, a data-only folder) as a package: no 'absent from the
    packages configuration' warning, and the page is in the wheel."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("keye", "data_pipelines", "train", "eval"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("setup.py", "README.md", "pyproject.toml"):
        shutil.copy(REPO / name, src / name)
    dist = tmp_path / "dist"
    dist.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "always",
            "-c",
            f"from setuptools import build_meta; build_meta.build_wheel({str(dist)!r})",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "absent from the `packages` configuration" not in output
    assert "SetuptoolsDeprecationWarning" not in output
    import zipfile

    (wheel,) = dist.glob("*.whl")
    assert "keye/web/static/index.html" in zipfile.ZipFile(wheel).namelist()
