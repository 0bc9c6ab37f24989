"""``keye video-info``: JSON contract, human summary, per-file errors."""

from __future__ import annotations

import json

import pytest

from data_pipelines import synthetic
from keye.cli.main import main


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    return synthetic.scene_cuts(tmp_path_factory.mktemp("cli") / "v.mp4", every=20, num_frames=60, fps=10)


def test_json_lines_and_errors(video, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_text("nope")
    code = main(["video-info", video, str(bad), video, "--json", "--max-frames", "5"])
    out, err = capsys.readouterr()
    assert code == 1
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert len(lines) == 2
    rec = lines[0]
    assert list(rec) == [
        "path",
        "frames",
        "timestamps",
        "frame_types",
        "slow_hw",
        "fast_hw",
        "visual_tokens",
        "seconds",
        "settings",
    ]
    assert rec["path"] == video and len(rec["frames"]) == 5 and len(rec["timestamps"]) == 5
    assert rec["frames"] == sorted(rec["frames"]) and all(isinstance(i, int) for i in rec["frames"])
    assert rec["timestamps"][0] == 0.0 and rec["frame_types"][0] == 0
    slow, fast = rec["slow_hw"], rec["fast_hw"]
    n_fast = sum(rec["frame_types"])
    expect = (5 - n_fast) * (slow[0] // 28) * (slow[1] // 28) + n_fast * (fast[0] // 28) * (fast[1] // 28)
    assert rec["visual_tokens"] == expect and rec["seconds"] > 0
    assert err.count("\n") == 1 and "bad.mp4" in err and "corrupt" in err


def test_human_summary(video, capsys):
    assert main(["video-info", video, "--fps", "1"]) == 0
    out = capsys.readouterr().out
    assert "duration 6.00 s at 10.000 fps" in out and "sampled 6 frames" in out and "visual tokens" in out


def test_human_sizes_are_width_first_and_labelled(tmp_path, capsys):
    """slow_hw/fast_hw stay [height, width] in JSON; the human summary prints "WxH (w×h)" (item 7)."""
    wide = synthetic.scene_cuts(tmp_path / "wide.mp4", every=10, num_frames=30, fps=10, height=112, width=224)
    assert main(["video-info", wide, "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    (sh, sw), (fh, fw) = rec["slow_hw"], rec["fast_hw"]
    assert sw > sh  # a landscape video: the JSON order is height, width
    assert main(["video-info", wide]) == 0
    out = capsys.readouterr().out
    assert f"slow {sw}x{sh} (w×h)" in out and f"fast {fw}x{fh} (w×h)" in out
    assert f"{sh}x{sw}" not in out


def _checkpoint_with_video_limits(directory, **video) -> str:
    """A checkpoint directory as far as video settings go: config.json plus the processor files of a fine-tune
    whose keye_processor_config.json caps frames and pixels."""
    from data_pipelines.media import VideoOptions
    from keye.processing import KeyeVLProcessor, ProcessorConfig

    KeyeVLProcessor(config=ProcessorConfig(video=VideoOptions(**video))).save_pretrained(directory)
    (directory / "config.json").write_text("{}")
    return str(directory)


def test_model_uses_the_checkpoints_video_settings(video, tmp_path, capsys):
    """--model CKPT reads the checkpoint's video options: the token count is what encode_conversation feeds that
    checkpoint, and the output says which settings were used (item 3)."""
    from keye.processing import KeyeVLProcessor

    ckpt = _checkpoint_with_video_limits(tmp_path / "ckpt", fps=1.0, max_frames=4, video_total_pixels=256 * 784)
    assert main(["video-info", video, "--json"]) == 0
    defaults = json.loads(capsys.readouterr().out)
    assert main(["video-info", video, "--model", ckpt, "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)

    conversation = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "?"}]}]
    fed = KeyeVLProcessor.from_pretrained(ckpt).encode_conversation(conversation).num_visual_tokens
    assert rec["visual_tokens"] == fed != defaults["visual_tokens"]
    assert len(rec["frames"]) == 4 and len(defaults["frames"]) == 12

    assert defaults["settings"]["source"] == "defaults" and defaults["settings"]["model"] is None
    settings = rec["settings"]
    assert settings["source"] == "checkpoint" and settings["model"] == ckpt
    assert settings["config_file"] == str(tmp_path / "ckpt" / "keye_processor_config.json")
    assert settings["command_line"] == []
    assert (settings["fps"], settings["max_frames"], settings["video_total_pixels"]) == (1.0, 4, 256 * 784)
    assert settings["min_pixels"] == 48 * 784 and settings["max_pixels"] == 768 * 784 and settings["frame_cap"] == 4

    # a flag replaces one setting, the rest stay the checkpoint's; the human summary names the source and values
    assert main(["video-info", video, "--model", ckpt, "--max-frames", "9"]) == 0
    out = capsys.readouterr().out
    assert f"settings: checkpoint {ckpt} (keye_processor_config.json); from the command line: max_frames" in out
    assert (
        "fps 1, max_frames 9 (cap 5 = video_total_pixels / min_pixels), video_total_pixels 200,704 (256 tokens)" in out
    )
    assert "sampled 5 frames" in out
    assert main(["video-info", video]) == 0
    assert "settings: library defaults\n    fps 2, max_frames none (cap 1365" in capsys.readouterr().out


def test_model_run_directory_says_did_you_mean(video, tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    _checkpoint_with_video_limits(run / "hf", max_frames=3)
    assert main(["video-info", video, "--model", str(run)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == (
        f"keye video-info: error: {run} is not a Keye checkpoint (no config.json); "
        f"did you mean {run / 'hf'} (the run's final export)?"
    )


def test_renamed_jpeg_is_not_a_video(video, tmp_path, capsys):
    """A JPEG saved as .mp4 is reported as an image, not as a too-short video (item 5)."""
    jpeg = tmp_path / "photo.mp4"
    synthetic.write_image(tmp_path / "photo.jpg")
    jpeg.write_bytes((tmp_path / "photo.jpg").read_bytes())
    assert main(["video-info", str(jpeg), video, "--json"]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 1  # the real video still printed
    assert captured.err == f"keye video-info: {jpeg}: no_video: is an image (JPEG), not a video\n"
