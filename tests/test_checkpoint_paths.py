"""``--model`` a step short of a checkpoint: every command that takes it says which directory was meant."""

from __future__ import annotations

from pathlib import Path

import pytest

from keye.cli.main import main
from keye.paths import NotACheckpointError, checkpoint_dir


def _export(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    return directory


@pytest.fixture
def run(tmp_path) -> Path:
    """A training run's layout: RUN/hf (final export) and RUN/checkpoints/step_N/hf (exports with checkpoints)."""
    run = tmp_path / "runs" / "x"
    _export(run / "hf")
    for step in (2, 10):
        _export(run / "checkpoints" / f"step_{step:08d}" / "hf")
    (run / "checkpoints" / "step_00000020").mkdir()  # a later step saved without an export
    return run


def _message(path) -> str:
    with pytest.raises(NotACheckpointError) as err:
        checkpoint_dir(path)
    assert isinstance(err.value, FileNotFoundError)
    return str(err.value)


def test_checkpoint_dir_suggests_the_export_meant(run, tmp_path):
    assert checkpoint_dir(run / "hf") == run / "hf"
    assert checkpoint_dir(str(run / "hf")) == run / "hf"
    assert (
        _message(run)
        == f"{run} is not a Keye checkpoint (no config.json); did you mean {run}/hf (the run's final export)?"
    )
    step = run / "checkpoints" / "step_00000002"
    assert _message(step) == (
        f"{step} is not a Keye checkpoint (no config.json); did you mean {step}/hf (the export of this checkpoint step)?"
    )
    latest = run / "checkpoints" / "step_00000010" / "hf"
    assert _message(run / "checkpoints").endswith(f"did you mean {latest} (the run's latest exported checkpoint step)?")
    assert _message(run / "hf" / "config.json").endswith(f"did you mean {run / 'hf'} (the directory holding it)?")
    assert "(a file; a checkpoint is a directory)" in _message(run / "hf" / "config.json")
    # a run stopped before its final export: RUN and RUN/hf both point at the latest exported step
    (run / "hf" / "config.json").unlink()
    (run / "hf").rmdir()
    assert _message(run).endswith(f"did you mean {latest} (the run's latest exported checkpoint step)?")
    assert _message(run / "hf") == (
        f"{run / 'hf'} is not a Keye checkpoint (no such directory); "
        f"did you mean {latest} (the run's latest exported checkpoint step)?"
    )
    # nothing to suggest
    assert _message(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'} is not a Keye checkpoint (no such directory)"
    (tmp_path / "empty").mkdir()
    assert _message(tmp_path / "empty") == f"{tmp_path / 'empty'} is not a Keye checkpoint (no config.json)"


@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "--model", "{model}", "hi"],
        ["web", "--model", "{model}", "--port", "0"],
        ["eval", "--model", "{model}", "--bench", "time", "--data", "{data}", "--out", "{out}"],
    ],
    ids=["chat", "web", "eval"],
)
def test_commands_say_did_you_mean(run, tmp_path, capsys, argv):
    """chat, web and eval (video-info: tests/test_video_info_cli.py) stop with one line naming the export."""
    for given, meant, what in [
        (run, run / "hf", "the run's final export"),
        (run / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002" / "hf", "the export of this"),
    ]:
        filled = [a.format(model=given, data=tmp_path / "data", out=tmp_path / "out") for a in argv]
        assert main(filled) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"{given} is not a Keye checkpoint (no config.json); did you mean {meant} ({what}" in err
    assert not (tmp_path / "out").exists()  # eval stops before writing anything
