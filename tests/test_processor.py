"""The processor: chat template, placeholder expansion, labels, modes, bad inputs."""

from __future__ import annotations

import pytest
import torch

from data_pipelines.media import MediaError
from keye.configuration import (
    FAST_END_TOKEN_ID,
    FAST_START_TOKEN_ID,
    FRAME_TOKEN_ID,
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
)
from keye.encoded import IGNORE_INDEX
from keye.image_processing import merge_grids, patchify
from keye.processing import KeyeVLProcessor
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
    assert sample.image_grid_thw.tolist() == [[1, 4, 8]]
    assert int((sample.input_ids == IMAGE_TOKEN_ID).sum()) == 8
    assert sample.pixel_values.shape == (32, 3 * 14 * 14)


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
    assert sample.video_grid_thw.tolist() == [[1, 4, 6], [2, 2, 4], [1, 4, 6]]
    assert sample.pixel_values_videos.shape[0] == 2 * 24 + 2 * 8


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
    processor.config.max_pixels = KeyeVLProcessor().config.max_pixels
