"""Whatever model-written code prints, its output comes back as valid UTF-8 and says when it was cut: lone
surrogates, invalid bytes through ``sys.stdout.buffer`` and 1 GiB of output, through ``keye sandbox --json`` and
through the Thyme loop with the real tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from keye.sandbox.result import SandboxResult, valid_utf8
from tests.sandbox_helpers import BWRAP_PROBLEM, needs_bwrap, small_config

SURROGATE = "print('x\\ud800y')\n"
RAW_BYTES = "import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe end\\n')\nsys.stdout.buffer.flush()\n"
ONE_GIB = "import sys\nchunk = 'z' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n"


def _block(code: str) -> str:
    return f"<code>\n```python\n{code}```\n</code>"


def test_result_text_is_always_valid_utf8():
    r = SandboxResult("ok", stdout="a\ud800b", error="\udcff")
    assert r.stdout == "a\ufffdb" and r.error == "\ufffd"
    json.dumps(r.to_json(), ensure_ascii=False).encode("utf-8")  # what keye sandbox --json prints
    assert valid_utf8("plain ✓") == "plain ✓"


def test_bytes_split_across_a_flush_still_decode():
    from keye.sandbox.worker import BoundedWriter

    out = BoundedWriter(100)
    out.buffer.write("€ ".encode()[:2])
    out.buffer.flush()  # code may flush mid-character; only the end of the block settles what is pending
    out.buffer.write("€ ".encode()[2:] + b"\xff")
    assert out.getvalue() == "€ \ufffd" and not out.truncated


def _cli(tmp_path, code: str) -> dict:
    path = tmp_path / "block.txt"
    path.write_text(_block(code))
    cmd = [sys.executable, "-m", "keye.cli.main", "sandbox", "--code", str(path), "--json"]
    proc = subprocess.run([*cmd, "--out-dir", str(tmp_path / "o")], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout.decode("utf-8"))  # strict: the CLI's output is valid UTF-8


@needs_bwrap
def test_cli_survives_lone_surrogates(tmp_path):
    data = _cli(tmp_path, SURROGATE)
    assert data["status"] == "ok" and data["stdout"] == "x\ufffdy\n" and data["truncated"] is False


@needs_bwrap
def test_cli_takes_invalid_bytes_through_stdout_buffer(tmp_path):
    data = _cli(tmp_path, RAW_BYTES)
    assert data["status"] == "ok" and data["stdout"] == "ok \ufffd\ufffd end\n"


@needs_bwrap
def test_cli_says_when_a_gigabyte_of_output_was_cut(tmp_path):
    data = _cli(tmp_path, ONE_GIB)
    assert data["status"] == "ok" and data["truncated"] is True
    assert data["stdout"].startswith("z" * 1000) and "output truncated" in data["stdout"]
    assert len(data["stdout"]) < 200_000


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from keye.cli.init import init_checkpoint
    from keye.inference import ChatEngine

    if BWRAP_PROBLEM is not None:
        pytest.skip(f"no bubblewrap jail here: {BWRAP_PROBLEM}")
    out = tmp_path_factory.mktemp("text_ckpt") / "tiny"
    init_checkpoint(out, config="configs/model/tiny.yaml")
    return ChatEngine.from_pretrained(out, device="cpu")


@pytest.mark.parametrize("code", [SURROGATE, RAW_BYTES, ONE_GIB], ids=["surrogate", "bytes", "one_gib"])
def test_thyme_loop_with_the_real_model_survives_any_output(tiny_engine, code, tmp_path):
    """A scripted code round, then the real tiny model decodes over the spliced output (which it must tokenize)."""
    from keye.thyme import ToolLoop, ToolLoopConfig, thyme_conversation
    from tests.test_tool_loop import ScriptedEngine
    from tests.test_tool_loop_model import HalfScripted

    engine = HalfScripted(tiny_engine, scripted=2)
    script = f"<think>Run it. {_block(code)}Done.</think><answer>ok</answer>"
    engine.script = ScriptedEngine(lambda prompt, settings: script)
    cfg = ToolLoopConfig.evaluation(max_new_tokens=90, max_rounds=1, sandbox=small_config())
    with ToolLoop(engine, cfg) as loop:
        traj = loop.run([thyme_conversation("Run the code.", [])], out_dir=tmp_path)[0]
    (round_,) = traj.rounds
    assert round_.status == "ok" and len(engine.real_ids) == 1
    text = tiny_engine.processor.decode(traj.sample.input_ids.tolist(), skip_special_tokens=False)
    output = text.rpartition("<sandbox_output>")[2].partition("</sandbox_output>")[0]  # the round, not the prompt
    assert "\ufffd" in output or "output truncated" in output
    text.encode("utf-8")
