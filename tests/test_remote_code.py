"""The remote code a checkpoint carries: every bundled module's project imports point at sibling files."""

from __future__ import annotations

import re

import pytest

from keye import remote_code


def test_every_bundled_module_bundles():
    for module, name in remote_code.BUNDLE.items():
        source = remote_code.bundled_source(module)
        assert not re.search(r"^\s*(from|import) (keye|data_pipelines)\b", source, re.M), name


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("from .resize import PIXELS_PER_TOKEN", "use an absolute import"),
        ("import keye.loss", "cannot be bundled"),
        ("from keye.inference import ChatEngine", "checkpoints do not carry"),
    ],
)
def test_an_import_the_checkpoint_cannot_follow_is_an_error(tmp_path, monkeypatch, line, message):
    """Caught when the checkpoint is written, not when vLLM or transformers fail to load it."""
    (tmp_path / "keye").mkdir()
    (tmp_path / "keye" / "bad.py").write_text(f"{line}\n")
    monkeypatch.setattr(remote_code, "ROOT", tmp_path)
    with pytest.raises(ValueError, match=message):
        remote_code.bundled_source("keye.bad")
