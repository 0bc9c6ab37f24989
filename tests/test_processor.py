"""The processor: chat template, placeholder expansion, labels, modes, bad inputs, the two-stage image resize."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import synthetic
from data_pipelines.encoded import IGNORE_INDEX
from data_pipelines.image_reader import load_image
from data_pipelines.media import MediaError
from data_pipelines.video_reader import clip_pixels
from keye.configuration import (
    FAST_END_TOKEN_ID,
    FAST_START_TOKEN_ID,
    FRAME_TOKEN_ID,
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
)
from keye.image_processing import image_to_patches, patchify
from keye.preprocessor_config import PREPROCESSOR_CONFIG, ImageProcessorConfig
from keye.processing import PROCESSOR_CONFIG, KeyeVLProcessor
from keye.released_processor import merge_grids
from tests.spine_fixtures import random_clip, random_image


@pytest.fixture(scope="module")
def processor():
    return KeyeVLProcessor()


def labelled_text(processor, sample) -> str:
    return processor.tokenizer.decode(sample.input_ids[sample.labels != IGNORE_INDEX], skip_special_tokens=False)


def test_tokenizer_has_keye_tokens(processor):
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(["<|frame|>", "<|fast_start|>", "<|fast_end|>"]) == [151675, 151676, 151677]
    assert tok.convert_tokens_to_ids(["<think>", "</think>", "<|image_pad|>"]) == [151667, 151668, 151655]


def test_text_conversation_matches_jinja_template(processor):
    msgs = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    sample = processor.encode_conversation(msgs, add_generation_prompt=True)
    rendered = processor.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert processor.tokenizer.decode(sample.input_ids, skip_special_tokens=False) == rendered
    assert sample.input_ids.tolist() == processor.tokenizer.encode(rendered, add_special_tokens=False)


def test_labels_cover_only_assistant_answers(processor):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Blue."},
    ]
    sample = processor.encode_conversation(msgs)
    assert labelled_text(processor, sample) == "Red.<|im_end|>Blue.<|im_end|>"
    assert sample.labels.shape == sample.input_ids.shape
    assert sample.position_ids.shape == (3, len(sample))


def test_image_expansion_and_grid(processor):
    image = random_image(60, 100)  # smart_resize -> 56 x 112 -> grid 4 x 8 patches -> 8 merged tokens
    sample = processor.encode_conversation([{"role": "user", "content": [{"type": "image", "image": image}]}])
    assert sample.visual.image_grid_thw.tolist() == [[1, 4, 8]]
    assert int((sample.input_ids == IMAGE_TOKEN_ID).sum()) == 8
    assert sample.visual.pixel_values.shape == (32, 3 * 14 * 14)


def test_video_expansion_frames_timestamps_and_fast_wrapping(processor):
    clip = random_clip(n=4, types=(0, 1, 1, 0), slow_hw=(56, 84), fast_hw=(28, 56))
    sample = processor.encode_conversation([{"role": "user", "content": [{"type": "video", "video": clip}]}])
    ids = sample.input_ids.tolist()
    assert ids.count(FRAME_TOKEN_ID) == 4
    assert ids.count(FAST_START_TOKEN_ID) == ids.count(FAST_END_TOKEN_ID) == 2
    slow, fast = (56 // 28) * (84 // 28), (28 // 28) * (56 // 28)
    assert ids.count(VIDEO_TOKEN_ID) == 2 * slow + 2 * fast == clip.visual_tokens()
    text = processor.tokenizer.decode(sample.input_ids, skip_special_tokens=False)
    expected_frame_1 = "<|frame|>0.5<|fast_start|>" + "<|video_pad|>" * fast + "<|fast_end|>"
    assert expected_frame_1 in text
    assert "<|frame|>1.5" + "<|video_pad|>" * slow in text
    # Per-frame grids, run-length merged: slow, fast, fast, slow -> [1,4,6], [2,2,4], [1,4,6]
    assert sample.visual.video_grid_thw.tolist() == [[1, 4, 6], [2, 2, 4], [1, 4, 6]]
    assert sample.visual.pixel_values_videos.shape[0] == 2 * 24 + 2 * 8


def test_patch_order_is_row_major_per_frame():
    pixels = torch.arange(2 * 3 * 28 * 42, dtype=torch.float).view(2, 3, 28, 42)
    patches = patchify(pixels)
    assert patches.shape == (2 * 2 * 3, 3 * 14 * 14)
    # patch (frame 1, row 1, col 2) is the 1*6 + 1*3 + 2 = 11th row; its first value is pixel (c0, y14, x28)
    assert patches[11, 0] == pixels[1, 0, 14, 28]
    assert merge_grids([[1, 2, 2], [1, 2, 2], [1, 4, 4], [1, 2, 2]]) == [[2, 2, 2], [1, 4, 4], [1, 2, 2]]


def test_modes_append_suffix_to_user_turns(processor):
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    think = processor.tokenizer.decode(processor.encode_conversation(msgs, mode="think").input_ids)
    no_think = processor.tokenizer.decode(processor.encode_conversation(msgs, mode="no_think").input_ids)
    auto = processor.tokenizer.decode(processor.encode_conversation(msgs, mode="auto").input_ids)
    assert "Why is the sky blue? /think" in think
    assert "/no_think" in no_think
    assert "/think" not in auto and "/no_think" not in auto


def test_sandbox_outputs_and_images_never_get_loss(processor):
    crop = random_image(56, 56, seed=3)
    msgs = [
        {"role": "user", "content": "Read the sign."},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "<think>Crop it.<code>print(1)</code><sandbox_output>"},
                {"type": "image", "image": crop},
                {"type": "text", "text": "</sandbox_output>It says STOP.</think><answer>STOP</answer>"},
            ],
        },
    ]
    sample = processor.encode_conversation(msgs)
    text = labelled_text(processor, sample)
    assert text == "<think>Crop it.<code>print(1)</code>It says STOP.</think><answer>STOP</answer><|im_end|>"
    assert not (sample.labels == IMAGE_TOKEN_ID).any()


def test_thyme_multi_round_supervises_only_the_final_round(processor):
    body = (
        "<think>a<code>x</code><sandbox_output>err</sandbox_output>b<code>y</code>"
        "<sandbox_output>ok</sandbox_output>final</think><answer>42</answer>"
    )
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": body}]
    # Everything through the second-to-last </sandbox_output> is masked: the final code round and answer remain.
    expected = "b<code>y</code>final</think><answer>42</answer><|im_end|>"
    assert labelled_text(processor, processor.encode_conversation(msgs)) == expected


def test_prompt_placeholders_must_match_media(processor):
    img = random_image(56, 56)
    ok = processor.encode_prompt("<|vision_start|><|image_pad|><|vision_end|>What?", images=[img])
    assert int((ok.input_ids == IMAGE_TOKEN_ID).sum()) == 4
    with pytest.raises(ValueError, match="1 image and 0 video placeholders but 2 images"):
        processor.encode_prompt("<|image_pad|> What?", images=[img, img])


def test_missing_and_unreadable_images_raise_media_errors(processor, tmp_path):
    with pytest.raises(MediaError, match="nope.png"):
        processor.encode_conversation(
            [{"role": "user", "content": [{"type": "image", "image": "nope.png"}]}], media_root=tmp_path
        )
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(MediaError) as err:
        processor.encode_conversation([{"role": "user", "content": [{"type": "image", "image": str(bad)}]}])
    assert err.value.reason in ("corrupt", "unsupported")


def test_bad_message_structure_is_named(processor):
    with pytest.raises(ValueError, match="role must be"):
        processor.encode_conversation([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="item 0: type must be"):
        processor.encode_conversation([{"role": "user", "content": [{"type": "audio"}]}])


def test_processor_save_and_load(processor, tmp_path):
    processor.config.max_pixels = 1234 * 784
    processor.save_pretrained(tmp_path)
    again = KeyeVLProcessor.from_pretrained(tmp_path)
    assert again.config.max_pixels == 1234 * 784
    assert again.tokenizer.convert_tokens_to_ids("<|fast_end|>") == 151677
    assert (tmp_path / PREPROCESSOR_CONFIG).is_file() and again.image_config == ImageProcessorConfig()
    processor.config.max_pixels = KeyeVLProcessor().config.max_pixels


# --- images: keye-vl-utils' resize, then the image processor's own (preprocessor_config.json) ----------------------


def image_tokens(processor: KeyeVLProcessor, image: Image.Image) -> int:
    sample = processor.encode_conversation([{"role": "user", "content": [{"type": "image", "image": image}]}])
    return int((sample.input_ids == IMAGE_TOKEN_ID).sum())


@pytest.mark.parametrize(
    "width, height, stage1, stage2, tokens",
    [
        (1920, 816, (812, 1932), (644, 1540), 1265),  # was 2,001 tokens with the first stage alone
        (4480, 3136, (3136, 4480), (812, 1176), 1218),
        (100, 60, (56, 112), (56, 112), 8),  # inside both budgets: neither stage changes it
    ],
)
def test_two_stage_image_token_counts(processor, width, height, stage1, stage2, tokens):
    image = Image.new("RGB", (width, height), (90, 140, 200))
    first = load_image(image)
    assert (first.height, first.width) == stage1
    patches, grid = processor.encode_image(image)
    assert grid == [1, stage2[0] // 14, stage2[1] // 14] and patches.shape == (grid[1] * grid[2], 3 * 14 * 14)
    assert image_tokens(processor, image) == tokens
    prompt = processor.encode_prompt("<|vision_start|><|image_pad|><|vision_end|>", images=[image])
    assert int((prompt.input_ids == IMAGE_TOKEN_ID).sum()) == tokens


def test_preprocessor_config_is_saved_read_and_optional(tmp_path):
    """A custom preprocessor_config.json changes image tokens after save/load; without the file (checkpoints written
    before it existed) the published defaults apply and keye_processor_config.json is still read."""
    image = Image.new("RGB", (1920, 816), (90, 140, 200))
    processor = KeyeVLProcessor(image_config=ImageProcessorConfig(max_pixels=200704))
    processor.config.system_prompt = "Be terse."
    processor.save_pretrained(tmp_path)
    again = KeyeVLProcessor.from_pretrained(tmp_path)
    assert again.image_config.max_pixels == 200704 and again.config.system_prompt == "Be terse."
    assert image_tokens(again, image) == 240  # 812x1932 -> 280x672 under 200,704 pixels

    (tmp_path / PREPROCESSOR_CONFIG).unlink()
    old = KeyeVLProcessor.from_pretrained(tmp_path)
    assert (tmp_path / PROCESSOR_CONFIG).is_file() and old.config.system_prompt == "Be terse."
    assert old.image_config == ImageProcessorConfig() and image_tokens(old, image) == 1265


CLIP_STATS = {"image_mean": (0.48145466, 0.4578275, 0.40821073), "image_std": (0.26862954, 0.26130258, 0.27577711)}


def transformers_pixels(first_stage: Image.Image, config: ImageProcessorConfig) -> torch.Tensor:
    """What the released image processor computes for a first-stage image: transformers' qwen2-vl ``smart_resize``
    for the size, then ``image_transforms.resize`` (PIL bilinear on uint8), ``rescale`` and ``normalize``."""
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    last = ChannelDimension.LAST
    arr = np.asarray(first_stage)
    size = smart_resize(arr.shape[0], arr.shape[1], 28, config.min_pixels, config.max_pixels)
    arr = resize(arr, size, resample=PILImageResampling.BILINEAR, input_data_format=last)
    arr = rescale(arr, config.rescale_factor, input_data_format=last)
    arr = normalize(arr, config.image_mean, config.image_std, input_data_format=last)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _photo_like(height: int, width: int, seed: int) -> Image.Image:
    """Smooth gradients plus sensor-like noise, saved and re-read as JPEG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    base = np.stack([xx / width * 255, yy / height * 255, (xx + yy) / (width + height) * 255], -1)
    arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    "config",
    [
        ImageProcessorConfig(),
        ImageProcessorConfig(max_pixels=200704, **CLIP_STATS),
        ImageProcessorConfig(min_pixels=401408, max_pixels=802816),  # upscales small images in the second stage
    ],
    ids=["published", "clip-stats-200k", "upscale"],
)
def test_image_pixels_equal_transformers_resize_rescale_normalize(tmp_path, config):
    images = [
        random_image(813, 1931, seed=1),
        random_image(190, 270, seed=2),
        _photo_like(1080, 1920, seed=3),
        Image.open(synthetic.write_image(tmp_path / "blocks.jpg", height=700, width=1500, seed=4)),
        Image.open(synthetic.write_image(tmp_path / "alpha.png", height=300, width=260, seed=5, mode="RGBA")),
    ]
    for image in images:
        first = load_image(image)
        patches, grid = image_to_patches(first, config)
        expected = transformers_pixels(first, config)
        assert list(expected.shape[1:]) == [grid[1] * 14, grid[2] * 14]
        assert torch.equal(patches, patchify(expected[None])), image.size


def test_video_pixels_use_the_config_but_no_second_resize():
    """Frames keep keye-vl-utils' slow/fast sizes (the released processor does not resize videos again); only the
    rescale and normalisation come from the config, bit-identical to transformers'."""
    from transformers.image_transforms import normalize, rescale
    from transformers.image_utils import ChannelDimension

    config = ImageProcessorConfig(max_pixels=3136, **CLIP_STATS)  # a tiny image budget must not shrink frames
    clip = random_clip(n=4, types=(0, 1, 1, 0), slow_hw=(56, 84), fast_hw=(28, 56))
    patches, grids = KeyeVLProcessor(image_config=config).encode_video(clip)
    assert grids == [[1, 4, 6], [1, 2, 4], [1, 2, 4], [1, 4, 6]]
    first = ChannelDimension.FIRST
    expected = [
        normalize(rescale(p.numpy(), 1 / 255, input_data_format=first), *CLIP_STATS.values(), input_data_format=first)
        for p in clip_pixels(clip)
    ]
    assert torch.equal(patches, torch.cat([patchify(torch.from_numpy(e)[None]) for e in expected]))


def test_extreme_aspect_after_the_first_resize_is_a_media_error(processor):
    """29x5800 passes keye-vl-utils' check (ratio 200) but rounds to 28x5796 (207); the released processor's
    ``smart_resize`` refuses that, so the sample is skipped with a reason rather than crashing a worker."""
    with pytest.raises(MediaError) as err:
        processor.encode_image(Image.new("RGB", (5800, 29)))
    assert err.value.reason == "unsupported" and "aspect ratio" in str(err.value)


def test_config_is_frozen_and_replaceable():
    config = dataclasses.replace(ImageProcessorConfig(), max_pixels=401408)
    assert config.max_pixels == 401408
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_pixels = 1  # type: ignore[misc]
