"""``preprocessor_config.json``: the released file's keys, strict reading, round trips, old directories."""

from __future__ import annotations

import json

import pytest

from keye.preprocessor_config import PREPROCESSOR_CONFIG, ImageProcessorConfig
from keye.typed_config import ConfigError

RELEASED_KEYS = [
    "image_processor_type",
    "processor_class",
    "auto_map",
    "do_resize",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
    "min_pixels",
    "max_pixels",
    "patch_size",
    "temporal_patch_size",
    "merge_size",
]


def test_defaults_are_the_published_keye_vl_1_5_values(tmp_path):
    path = ImageProcessorConfig().save(tmp_path)
    data = json.loads(path.read_text())
    assert list(data) == RELEASED_KEYS
    assert data["image_processor_type"] == "KeyeVL1_5ImageProcessor"
    assert data["processor_class"] == "KeyeVL1_5Processor"
    assert data["auto_map"] == {
        "AutoImageProcessor": "image_processing_keye_vl_1_5.KeyeVL1_5ImageProcessor",
        "AutoProcessor": "processing_keye_vl_1_5.KeyeVL1_5Processor",
    }
    assert data["min_pixels"] == 3136 and data["max_pixels"] == 1003520
    assert data["image_mean"] == data["image_std"] == [0.5, 0.5, 0.5]
    assert data["rescale_factor"] == 0.00392156862745098 and data["resample"] == 2
    assert data["do_resize"] is data["do_rescale"] is data["do_normalize"] is data["do_convert_rgb"] is True
    assert (data["patch_size"], data["temporal_patch_size"], data["merge_size"]) == (14, 1, 2)


def test_round_trip_and_missing_file(tmp_path):
    custom = ImageProcessorConfig(
        max_pixels=200704,
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
    )
    custom.save(tmp_path)
    assert ImageProcessorConfig.load(tmp_path) == custom
    assert ImageProcessorConfig.from_json(custom.to_json()) == custom
    assert ImageProcessorConfig.load(tmp_path / "elsewhere") == ImageProcessorConfig()  # no file: published defaults


def test_transformers_bookkeeping_keys_are_accepted(tmp_path):
    """What transformers' ``save_pretrained`` of an image processor adds (``size``, ``_processor_class``) loads;
    a single number for mean/std means all three channels, as transformers accepts it."""
    data = ImageProcessorConfig().to_dict()
    data.update(
        size={"min_pixels": 3136, "max_pixels": 401408},
        _processor_class="KeyeVL1_5Processor",
        image_mean=0.5,
        max_pixels=401408,
    )
    (tmp_path / PREPROCESSOR_CONFIG).write_text(json.dumps(data))
    loaded = ImageProcessorConfig.load(tmp_path)
    assert loaded.max_pixels == 401408 and loaded.image_mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"max_pixel": 1003520}, "unknown key 'max_pixel'"),
        ({"max_pixels": "1003520"}, "key 'max_pixels' must be an integer, got str"),
        ({"min_pixels": 3136.0}, "key 'min_pixels' must be an integer, got float"),
        ({"do_resize": 1}, "key 'do_resize' must be true or false, got int"),
        ({"rescale_factor": "1/255"}, "key 'rescale_factor' must be a number"),
        ({"image_mean": [0.5, 0.5]}, "key 'image_mean' must be 3 finite numbers"),
        ({"image_std": [0.5, 0.0, 0.5]}, "key 'image_std' must not contain 0"),
        ({"image_std": "0.5"}, "key 'image_std' must be a list of 3 numbers"),
        ({"resample": 9}, "key 'resample' must be a PIL filter number"),
        ({"patch_size": 16}, "key 'patch_size' must be 14"),
        ({"min_pixels": 2_000_000}, "key 'max_pixels' must be >= min_pixels"),
        ({"size": {"height": 448, "width": 448}}, "key 'size' names a fixed height/width"),
    ],
)
def test_bad_keys_name_the_key_and_the_file(tmp_path, change, message):
    data = {**ImageProcessorConfig().to_dict(), **change}
    path = tmp_path / PREPROCESSOR_CONFIG
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message) as err:
        ImageProcessorConfig.load(tmp_path)
    assert str(path) in str(err.value)


def test_not_an_object_or_not_json(tmp_path):
    path = tmp_path / PREPROCESSOR_CONFIG
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ImageProcessorConfig.load(tmp_path)
    path.write_text("{'max_pixels': 1}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ImageProcessorConfig.load(tmp_path)


def test_programmatic_values_are_checked_too():
    with pytest.raises(ConfigError, match="key 'merge_size' must be 2"):
        ImageProcessorConfig(merge_size=4)


def test_another_tools_key_is_ignored_with_a_warning(tmp_path):
    """A downloaded checkpoint may carry keys other processors use; they must not stop it from loading."""
    data = {**ImageProcessorConfig().to_dict(), "video_processor_type": "Something", "max_pixels": 401408}
    (tmp_path / PREPROCESSOR_CONFIG).write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="key 'video_processor_type' is not an image-processor setting"):
        loaded = ImageProcessorConfig.load(tmp_path)
    assert loaded.max_pixels == 401408
