import json
import tarfile
from pathlib import Path

import pytest

from data_pipelines import synthetic
from data_pipelines.shards import write_shards
from keye.cli.main import main as keye_main


def _rec(rid, content, source="imgs", answer="ok"):
    return {
        "id": rid,
        "source": source,
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Media root with good and broken files, and a JSONL mixing good and bad lines."""
    root = tmp_path_factory.mktemp("media")
    for i in range(3):
        synthetic.write_image(root / f"img{i}.png", height=40, width=56, seed=i)
    synthetic.tiny(root / "clip.mp4", seconds=1.0, fps=8.0)
    synthetic.write_frame_images(root / "frames", num_frames=3, height=32, width=32)
    data = (root / "clip.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notanimage.png").write_bytes(b"this is text, not a PNG")
    (root / "notes.txt").write_text("hello")
    text = {"type": "text", "text": "describe"}
    lines = [
        _rec("a.1", [{"type": "image", "image": "img0.png"}, text]),
        _rec("v/2", [{"type": "video", "video": "clip.mp4", "fps": 2}, text], source="video"),
        _rec("f3", [{"type": "video", "video": [f"frames/frame_{i:05d}.jpg" for i in range(3)]}, text], "video"),
        _rec("m4", [{"type": "image", "image": "img1.png"}, {"type": "image", "image": "img2.png"}, text]),
        _rec("bad-trunc", [{"type": "video", "video": "truncated.mp4"}, text], source="video"),
        _rec("bad-empty", [{"type": "image", "image": "empty.png"}, text]),
        _rec("bad-ext", [{"type": "image", "image": "notes.txt"}, text]),
        _rec("bad-content", [{"type": "image", "image": "notanimage.png"}, text]),
        _rec("bad-missing", [{"type": "image", "image": "nowhere.png"}, text]),
        _rec("bad-frame", [{"type": "video", "video": ["frames/frame_00000.jpg", "frames/gone.jpg"]}, text]),
        {"id": "bad-schema", "source": "imgs", "messages": [{"role": "robot", "content": "hi"}]},
        _rec("a.1", [{"type": "image", "image": "img0.png"}, text]),
    ]
    jsonl = root / "data.jsonl"
    body = [json.dumps(x) for x in lines]
    body.insert(3, '{"id": "broken", "messages": [')  # bad JSON line
    body.insert(4, "")  # blank lines are ignored, not skipped
    jsonl.write_text("\n".join(body) + "\n")
    return root, jsonl


EXPECTED_SKIPS = {
    "bad_json": 1,
    "corrupt_media": 2,
    "duplicate_id": 1,
    "empty_media": 1,
    "missing_media": 2,
    "schema": 1,
    "wrong_extension": 1,
}


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


@pytest.mark.parametrize("media_check", ["load", "decode"])
def test_write_shards_counts_skips_and_rewrites_media(dataset, tmp_path, media_check):
    root, jsonl = dataset
    out = tmp_path / "shards"
    report = write_shards(jsonl, root, out, samples_per_shard=3, media_check=media_check, progress=False)
    assert report.num_samples == 4
    assert dict(report.skipped_by_reason) == EXPECTED_SKIPS
    assert report.num_skipped == sum(EXPECTED_SKIPS.values())

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 4 and manifest["num_shards"] == 2
    assert manifest["per_source"] == {"imgs": 2, "video": 2}
    assert [s["samples"] for s in manifest["shards"]] == [3, 1]
    assert manifest["bytes"] == sum((out / s["path"]).stat().st_size for s in manifest["shards"])
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]

    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    by_id = {s["id"]: s["reason"] for s in skipped}
    assert by_id["bad-trunc"] == "corrupt_media" and by_id["bad-content"] == "corrupt_media"
    assert by_id["bad-frame"] == "missing_media" and by_id["bad-ext"] == "wrong_extension"
    assert any(s["reason"] == "bad_json" and s["line"] == 4 and s["id"] is None for s in skipped)

    first = _members(out / "shard-000000.tar")
    assert sorted(first) == [
        "000000000.json",
        "000000000.media_0.png",
        "000000001.json",
        "000000001.media_0.mp4",
        "000000002.json",
        "000000002.media_0.f0000.jpg",
        "000000002.media_0.f0001.jpg",
        "000000002.media_0.f0002.jpg",
    ]
    assert first["000000001.media_0.mp4"] == (root / "clip.mp4").read_bytes()
    video_rec = json.loads(first["000000001.json"])
    assert video_rec["id"] == "v/2"
    assert video_rec["messages"][0]["content"][0] == {"type": "video", "video": "media_0.mp4", "fps": 2.0}
    frames_rec = json.loads(first["000000002.json"])
    assert frames_rec["messages"][0]["content"][0]["video"] == [f"media_0.f{i:04d}.jpg" for i in range(3)]
    second = _members(out / "shard-000001.tar")
    two_images = json.loads(second["000000003.json"])["messages"][0]["content"]
    assert [c.get("image") for c in two_images] == ["media_0.png", "media_1.png", None]


def test_without_media_check_only_content_problems_pass(dataset, tmp_path):
    root, jsonl = dataset
    report = write_shards(jsonl, root, tmp_path / "unchecked", media_check="none", progress=False)
    assert report.num_samples == 6  # the truncated mp4 and the text-as-PNG are only caught by decoding
    assert "corrupt_media" not in report.skipped_by_reason and report.skipped_by_reason["empty_media"] == 1
    with pytest.raises(ValueError, match="media_check"):
        write_shards(jsonl, root, tmp_path / "x", media_check="maybe", progress=False)


def test_rerun_is_byte_identical_and_replaces_old_shards(dataset, tmp_path):
    root, jsonl = dataset
    out = tmp_path / "shards"
    write_shards(jsonl, root, out, samples_per_shard=1, progress=False)
    assert len(list(out.glob("*.tar"))) == 4
    write_shards(jsonl, root, out, samples_per_shard=3, progress=False)
    once = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    write_shards(jsonl, root, out, samples_per_shard=3, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == once and len(once) == 2


def test_cli_shards(dataset, tmp_path, capsys):
    root, jsonl = dataset
    out = tmp_path / "cli"
    rc = keye_main(["shards", "--input", str(jsonl), "--media-root", str(root), "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote 4 samples in 1 shards" in printed and "corrupt_media=2" in printed
    assert json.loads((out / "manifest.json").read_text())["num_skipped"] == 9
    rc = keye_main(["shards", "--input", str(tmp_path / "nope.jsonl"), "--media-root", str(root), "--out", str(out)])
    assert rc == 1
    assert "nope.jsonl" in capsys.readouterr().err


def test_load_check_applies_the_image_processor_resize_too(tmp_path):
    """A 5800x29 strip passes keye-vl-utils' resize (ratio 200) but becomes 5796x28 (207), which the released image
    processor refuses: sharding with the "load" check skips it, as training would."""
    import io

    from PIL import Image

    from data_pipelines.shards import MediaProblem, check_media_bytes

    buf = io.BytesIO()
    Image.new("RGB", (5800, 29), (200, 30, 30)).save(buf, format="PNG")
    with pytest.raises(MediaProblem) as err:
        check_media_bytes("image", buf.getvalue(), "strip.png", "load")
    assert err.value.reason == "media_unsupported" and "aspect ratio" in str(err.value)
    check_media_bytes("image", buf.getvalue(), "strip.png", "decode")  # the cheaper checks do not resize


@pytest.mark.parametrize("media_check", ["load", "decode", "open"])
def test_a_jpeg_named_mp4_is_skipped_as_not_a_video(tmp_path, capsys, media_check):
    """A picture in a video field is skipped with "is an image (JPEG), not a video", not as a too-short video
    (``media_too_short``, "0.040 s of video"), and the cheap checks no longer let it through."""
    root = tmp_path / "media"
    synthetic.write_image(root / "photo.jpg")
    (root / "photo.mp4").write_bytes((root / "photo.jpg").read_bytes())
    synthetic.tiny(root / "clip.mp4", seconds=1.0, fps=8.0)
    text = {"type": "text", "text": "describe"}
    jsonl = tmp_path / "data.jsonl"
    lines = [
        _rec("real", [{"type": "video", "video": "clip.mp4"}, text], source="video"),
        _rec("photo", [{"type": "video", "video": "photo.mp4"}, text], source="video"),
    ]
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "shards"
    argv = ["shards", "--input", str(jsonl), "--media-root", str(root), "--out", str(out), "--no-progress"]
    assert keye_main([*argv, "--media-check", media_check]) == 0
    assert "corrupt_media=1" in capsys.readouterr().out
    (skipped,) = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped["id"] == "photo" and skipped["reason"] == "corrupt_media"
    assert skipped["detail"].startswith("photo.mp4: ") and skipped["detail"].endswith("is an image (JPEG), not a video")
