"""GSPO rollouts through the Thyme tool loop: sandbox output never counts as policy tokens; Thyme rewards score it."""

from __future__ import annotations

import pytest

from keye.thyme import ToolLoopConfig, thyme_conversation
from tests.sandbox_helpers import needs_bwrap, small_config
from tests.spine_fixtures import random_image
from tests.test_tool_loop import ScriptedEngine, crop_script, sandbox_span
from train.rl.config import RolloutConfig
from train.rl.rewards import code_success_reward, thyme_reward
from train.rl.rollout import RolloutSampler


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "photo.png"
    random_image(160, 200, seed=3).save(path)
    return path


@needs_bwrap
def test_tool_rollouts_mask_sandbox_output_and_score_with_thyme_rewards(tmp_path, image_file):
    engine = ScriptedEngine(lambda prompt, settings: crop_script(1))
    cfg = RolloutConfig(
        group_size=2, max_new_tokens=400, tool_loop=ToolLoopConfig(sandbox=small_config(), max_new_tokens=400)
    )
    sampler = RolloutSampler(engine, cfg, seed=0)
    record = {"id": "p0", "tools": True, "mode": "think", "solution": "red"}
    try:
        (group,) = sampler.sample([thyme_conversation("What colour is the sign?", [image_file])], [record], n=2)
    finally:
        sampler.close()
    assert len(group) == 2
    for rollout in group:
        ids = rollout.sample.input_ids.tolist()
        a, b = sandbox_span(ids, rollout.prompt_length)
        mask = rollout.response_mask.tolist()
        rel_a, rel_b = a - rollout.prompt_length, b - rollout.prompt_length
        assert not any(mask[rel_a:rel_b])  # the sandbox output (crop image tokens included) is not policy
        assert all(mask[:rel_a]) and any(mask[rel_b:])  # the code before it and the answer after it are
        assert rollout.sample.visual.image_grid_thw.shape[0] == 2  # input image + the crop, re-encoded
        assert code_success_reward(rollout.text, record) == 1.0
        assert thyme_reward(rollout.text, record) == pytest.approx(1.5)  # acc 1 + 0.5 format (no judge: cons 0)
