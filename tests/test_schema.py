import copy

import pytest

from data_pipelines.schema import SchemaError, validate_record

GOOD = {
    "id": "clip-1",
    "source": "video_qa",
    "mode": "think",
    "messages": [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "imgs/a.png", "max_pixels": 3136},
                {"type": "video", "video": "vids/b.mp4", "fps": 1, "max_frames": 8, "min_frame_similarity": 0.95},
                {"type": "video", "video": ["f/0.jpg", "f/1.jpg"]},
                {"type": "text", "text": "what happens?"},
            ],
        },
        {"role": "assistant", "content": "a cat jumps"},
    ],
    "license": "cc-by",
}


def test_valid_record_round_trips_and_lists_media_in_order():
    rec = validate_record(copy.deepcopy(GOOD))
    assert rec.id == "clip-1" and rec.source == "video_qa" and rec.mode == "think"
    assert [(m.type, m.media) for m in rec.media_items()] == [
        ("image", "imgs/a.png"),
        ("video", "vids/b.mp4"),
        ("video", ["f/0.jpg", "f/1.jpg"]),
    ]
    video = rec.media_items()[1]
    assert video.options == {"fps": 1.0, "max_frames": 8, "min_frame_similarity": 0.95}
    assert isinstance(video.options["fps"], float) and isinstance(video.options["max_frames"], int)
    assert rec.to_dict() == GOOD  # unknown top-level keys ride along untouched


def _broken(path, value):
    rec = copy.deepcopy(GOOD)
    target = rec
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return rec


@pytest.mark.parametrize(
    "path, value, field",
    [
        (("id",), 7, "id"),
        (("source",), KeyError, "source"),
        (("mode",), "deep", "mode"),
        (("messages",), [], "messages"),
        (("messages", 1, "role"), "robot", "messages[1].role"),
        (("messages", 2, "role"), "system", "messages[2].role"),
        (("messages", 1, "content", 0, "image"), "/abs/a.png", "messages[1].content[0].image"),
        (("messages", 1, "content", 0, "image"), "../up.png", "messages[1].content[0].image"),
        (("messages", 1, "content", 1, "fps"), "fast", "messages[1].content[1].fps"),
        (("messages", 1, "content", 1, "max_frames"), 2.5, "messages[1].content[1].max_frames"),
        (("messages", 1, "content", 1, "speed"), 2, "messages[1].content[1].speed"),
        (("messages", 1, "content", 2, "video"), [], "messages[1].content[2].video"),
        (("messages", 1, "content", 3, "type"), "audio", "messages[1].content[3].type"),
        (("messages", 1, "content", 3, "text"), None, "messages[1].content[3].text"),
        (("messages", 2, "content"), 5, "messages[2].content"),
    ],
)
def test_schema_errors_name_field_and_record(path, value, field):
    with pytest.raises(SchemaError) as info:
        validate_record(_broken(path, value))
    assert info.value.field == field
    if path != ("id",):
        assert "'clip-1'" in str(info.value)


def test_default_source_and_video_window():
    rec = _broken(("source",), KeyError)
    assert validate_record(rec, default_source="web").source == "web"
    bad = _broken(("messages", 1, "content", 1, "video_start"), 5.0)
    bad["messages"][1]["content"][1]["video_end"] = 2.0
    with pytest.raises(SchemaError, match="video_end"):
        validate_record(bad)
    with pytest.raises(SchemaError, match="JSON object"):
        validate_record(["not", "a", "dict"])
