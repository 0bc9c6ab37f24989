"""What the vLLM engine sends, checked without vLLM: placeholders collapsed to vLLM's form, images recovered from our
patches bit for bit, videos carried as decoded clips; and, where vLLM is not installed, asking for it fails at
config load with one line that says how to install it."""

from __future__ import annotations

import pytest
import torch

from data_pipelines import synthetic
from keye.configuration import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID
from keye.generation import vllm_available
from keye.generation.vllm_inputs import (
    VIDEOS_META,
    ClipRecordingProcessor,
    collapse_visual_tokens,
    patches_to_images,
    vllm_prompt,
)
from keye.image_processing import image_to_patches
from keye.processing import KeyeVLProcessor
from tests.spine_fixtures import random_image


@pytest.fixture(scope="module")
def processor() -> ClipRecordingProcessor:
    return ClipRecordingProcessor.wrap(KeyeVLProcessor())


def test_each_visual_item_collapses_to_one_placeholder_and_text_is_untouched(processor, tmp_path):
    image = tmp_path / "a.png"
    random_image(120, 200, seed=1).save(image)
    video = synthetic.scene_cuts(tmp_path / "v.mp4", every=60, num_frames=240, fps=60)
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(image)},
                {"type": "video", "video": video, "max_frames": 8},
                {"type": "image", "image": str(image)},
                {"type": "text", "text": "Compare."},
            ],
        }
    ]
    sample = processor.encode_conversation(msgs, add_generation_prompt=True)
    ids = sample.input_ids.tolist()
    collapsed = collapse_visual_tokens(ids, processor.token_ids)
    spans = [collapsed[i : i + 3] for i, t in enumerate(collapsed) if t == VISION_START_TOKEN_ID]
    assert spans == [
        [VISION_START_TOKEN_ID, IMAGE_TOKEN_ID, VISION_END_TOKEN_ID],
        [VISION_START_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_TOKEN_ID],
        [VISION_START_TOKEN_ID, IMAGE_TOKEN_ID, VISION_END_TOKEN_ID],
    ]
    outside = [t for t in ids if t not in (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)]
    assert collapsed[-8:] == ids[-8:] and len(collapsed) < len(outside)  # frame/timestamp ids went with the video
    prompt = vllm_prompt(sample, processor.image_config)
    assert prompt["prompt_token_ids"] == collapsed
    clip = sample.meta[VIDEOS_META][0]
    assert prompt["multi_modal_data"]["video"] is clip.frames and len(prompt["multi_modal_data"]["image"]) == 2
    kwargs = prompt["mm_processor_kwargs"]
    assert kwargs["frame_types"][0].tolist() == clip.frame_types and 1 in clip.frame_types
    assert kwargs["timestamps"][0].tolist() == clip.timestamps
    assert (kwargs["height"], kwargs["fast_height"]) == ([clip.slow_hw[0]], [clip.fast_hw[0]])


def test_images_come_back_from_our_patches_bit_for_bit(processor):
    for seed, (h, w) in enumerate([(300, 420), (57, 1000), (900, 64)]):
        patches, grid = processor.encode_image(random_image(h, w, seed=seed))
        (image,) = patches_to_images(patches, torch.tensor([grid]), processor.image_config)
        again, grid_again = image_to_patches(image, processor.image_config)  # what the checkpoint's processor does
        assert grid_again == grid and torch.equal(again, patches)


def test_a_video_without_its_decoded_clip_is_refused(tmp_path):
    video = synthetic.scene_cuts(tmp_path / "v.mp4", every=60, num_frames=120, fps=60)
    msgs = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "?"}]}]
    sample = KeyeVLProcessor().encode_conversation(msgs, add_generation_prompt=True)  # a plain processor
    with pytest.raises(ValueError, match="no decoded clips"):
        vllm_prompt(sample, KeyeVLProcessor().image_config)


@pytest.mark.skipif(vllm_available(), reason="checks the message shown where vLLM is not installed")
def test_asking_for_vllm_without_it_fails_at_config_load_in_one_line(tmp_path, capsys):
    from keye.cli.main import main as keye_main

    assert keye_main(["train", "configs/rl/tiny.yaml", "rl.rollout.engine=vllm"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "rl.rollout.engine" in err and "make vllm-env" in err, err
    code = keye_main(["eval", "--model", str(tmp_path), "--bench", "time", "--data", str(tmp_path), "--engine", "vllm"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and "generation.engine" in err and "make vllm-env" in err, err
