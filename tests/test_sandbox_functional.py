"""What Thyme's code blocks are for: crops that produce images, computations that print, notebook state."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from keye.sandbox import Sandbox, SandboxConfig, SandboxUnavailable
from keye.sandbox import jail as jail_mod
from keye.typed_config import ConfigError, load_config
from tests.sandbox_helpers import assert_clean, host_temp_dirs, needs_bwrap, pids_in_namespace, small_config


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (320, 240), (10, 200, 30)).save(path)
    return str(path)


@needs_bwrap
def test_crop_state_harvest_and_repairs(tmp_path, image):
    out = tmp_path / "out"
    before = host_temp_dirs()
    with Sandbox(small_config()) as sandbox, sandbox.session() as s:
        r = s.run("w, h = Image.open(image_path).size\nprint(w * h, 6 * 7)", [image], str(out))
        assert (r.status, r.stdout, r.images) == ("ok", "76800 42\n", [])
        code = (
            'image_path = "/user/images/photo.png"\n'
            "img = cv.imread(image_path)\n"
            "crop = Image.open(image_path).crop((300, 5, 400, 20))\n"
            'processed_path = "/mnt/data/temp_processed_images/crop_ab12.png"\n'
            "crop.save(processed_path)\n"
            "print(processed_path, crop.size, img.shape, w)"
        )
        r = s.run(code, [image], str(out))
        assert r.status == "ok", r
        assert set(r.repairs) == {"image_path", "crop_clamp", "cv2_alias", "output_dir"}
        assert "(64, 64) (240, 320, 3) 320" in r.stdout  # clamped crop, cv2 alias, w from the first block
        assert len(r.images) == 1 and Image.open(r.images[0]).size == (64, 64)
        r = s.run("for i in range(2):\n    Image.new('L', (80, 90)).save(f'gray_{i}.png')", [image], str(out))
        assert r.status == "ok" and [Image.open(p).size for p in r.images] == [(80, 90), (80, 90)]
        r = s.run("Image.new('L', (1000, 2)).save('thin.png')\nprint('saved')", [image], str(out))
        assert r.images == [] and "aspect ratio" in r.stdout
        r = s.run("x = 1\ny = x +\n", [image], str(out))
        assert r.status == "error" and r.error.startswith("SyntaxError") and "(line 2)" in r.error
        r = s.run("print(undefined_name)", [image], str(out))
        assert r.status == "error" and r.error == "NameError: name 'undefined_name' is not defined (line 1)"
        ns, bwrap_pid = s.worker.info["pidns"], s.worker.proc.pid
    assert_clean(ns, bwrap_pid, before)


@needs_bwrap
def test_missing_input_image_is_an_error_not_a_crash(tmp_path):
    with Sandbox(small_config()) as sandbox:
        r = sandbox.run("print(1)", [str(tmp_path / "nope.png")])
    assert r.status == "error" and "cannot be read" in r.error


@needs_bwrap
def test_warm_pool_serves_sessions_and_cleans_up():
    with Sandbox(small_config(pool_size=1)) as sandbox:
        assert sandbox.wait_warm(60)
        with sandbox.session() as s:
            r = s.run("print('warm')")
            assert r.status == "ok" and r.stdout == "warm\n"
            assert r.duration_s < 1.0  # no interpreter start on the critical path
        assert sandbox.wait_warm(60)  # refilled after the session took its worker
        idle_ns = [w.info["pidns"] for w in sandbox._pool._idle]
    for ns in idle_ns:
        assert pids_in_namespace(ns) == []


@needs_bwrap
def test_cli_json_contract(tmp_path, image):
    code = tmp_path / "block.txt"
    code.write_text("<code>\n```python\nprint(Image.open(image_path).size)\n```\n</code>")
    cmd = [sys.executable, "-m", "keye.cli.main", "sandbox", "--code", str(code), "--image", image, "--json"]
    proc = subprocess.run([*cmd, "--out-dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert list(data) == ["status", "stdout", "error", "images", "truncated"]
    assert data["status"] == "ok" and data["stdout"] == "(320, 240)\n"


def test_config_is_typed(tmp_path):
    yaml = tmp_path / "sb.yaml"
    yaml.write_text("timeout_s: 3\nmemory_mb: 512\n")
    cfg = load_config(SandboxConfig, yaml, ["pool_size=0"])
    assert (cfg.timeout_s, cfg.memory_mb, cfg.pool_size) == (3.0, 512, 0)
    with pytest.raises(ConfigError, match="timeout"):
        load_config(SandboxConfig, None, ["timeoutt=3"])
    with pytest.raises(ConfigError, match="memory_mb"):
        load_config(SandboxConfig, None, ["memory_mb=lots"])


def test_refuses_without_isolation_unless_allowed(monkeypatch):
    monkeypatch.setattr(jail_mod, "bwrap_problem", lambda as_root: "bwrap missing (simulated)")
    with pytest.raises(SandboxUnavailable, match="refusing to run model code without isolation"):
        Sandbox(SandboxConfig(pool_size=0))
    before = host_temp_dirs()
    with Sandbox(SandboxConfig(pool_size=0, allow_unisolated=True, timeout_s=3)) as sandbox:
        assert sandbox.isolation == "none"
        r = sandbox.run("print(sum(range(10)))")
    assert r.status == "ok" and r.stdout == "45\n"
    assert host_temp_dirs() <= before


@needs_bwrap
def test_session_started_in_a_short_lived_thread_survives_it(tmp_path, image):
    """bwrap's --die-with-parent follows the forking thread; jails are spawned from one long-lived thread instead."""
    import threading
    import time

    with Sandbox(small_config(pool_size=0)) as sandbox, sandbox.session() as session:
        results = []
        t = threading.Thread(target=lambda: results.append(session.run("x = 41", [image], str(tmp_path / "o"))))
        t.start()
        t.join()
        time.sleep(0.3)  # give a parent-death signal time to land if the jail were tied to that thread
        results.append(session.run("print(x + 1)", [image], str(tmp_path / "o")))
    assert [r.status for r in results] == ["ok", "ok"] and results[1].stdout.strip() == "42"
