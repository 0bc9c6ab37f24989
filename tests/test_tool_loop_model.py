"""The Thyme loop with the real tiny random model: a scripted code round, then real decoding over the spliced crop;
``keye chat --tools`` and the eval engine's tool path end to end."""

from __future__ import annotations

import pytest
import torch

from eval.config import EvalConfig
from eval.engine import load_engine, settings_for
from keye.cli.init import init_checkpoint
from keye.cli.main import main as keye_main
from keye.inference import ChatEngine
from keye.thyme import ToolChatEngine, ToolLoop, ToolLoopConfig, thyme_conversation
from tests.sandbox_helpers import needs_bwrap, small_config
from tests.spine_fixtures import random_image
from tests.test_tool_loop import ScriptedEngine, crop_script


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tool_ckpt") / "tiny"
    init_checkpoint(out, config="configs/model/tiny.yaml")
    return out


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tool_img") / "photo.png"
    random_image(160, 200, seed=3).save(path)
    return path


class HalfScripted(ChatEngine):
    """The real model, except that its first ``scripted`` generation calls write the crop round."""

    def __init__(self, engine: ChatEngine, scripted: int) -> None:
        super().__init__(engine.model, engine.processor, "cpu")
        self.script = ScriptedEngine(lambda prompt, settings: crop_script(1))
        self.script.processor = engine.processor
        self.scripted = scripted
        self.real_ids: list[list[int]] = []

    def generate_encoded(self, samples, settings, streamer=None):
        if self.scripted:
            self.scripted -= 1
            return self.script.generate_encoded(samples, settings)
        result = super().generate_encoded(samples, settings, streamer)
        self.real_ids.extend(result.token_ids)
        return result


@pytest.fixture(scope="module")
def crop_then_real(checkpoint, image_file, tmp_path_factory):
    """A scripted crop round (text + code segments, ATS), then the real model decodes greedily over the crop."""
    from tests.sandbox_helpers import BWRAP_PROBLEM

    if BWRAP_PROBLEM is not None:
        pytest.skip(f"no bubblewrap jail here: {BWRAP_PROBLEM}")
    engine = HalfScripted(ChatEngine.from_pretrained(checkpoint, device="cpu"), scripted=2)
    cfg = ToolLoopConfig.evaluation(max_new_tokens=90, max_rounds=1, sandbox=small_config())
    with ToolLoop(engine, cfg) as loop:
        conv = thyme_conversation("What colour is the sign?", [image_file])
        traj = loop.run([conv], out_dir=tmp_path_factory.mktemp("tool_out"))[0]
    return engine, traj


def test_real_model_continues_after_a_crop_round(crop_then_real):
    engine, traj = crop_then_real
    assert traj.rounds[0].status == "ok" and len(traj.rounds[0].images) == 1
    (real,) = engine.real_ids
    assert len(real) >= 1 and traj.segments[-1].tokens == len(real) and traj.segments[-1].temperature == 0.0
    s = traj.sample
    assert s.visual.image_grid_thw.shape[0] == 2 and traj.finish_reason in ("length", "eos", "max_rounds", "answer")
    end = len(s) - (traj.finish_reason == "eos")
    assert s.input_ids[end - len(real) : end].tolist() == real
    assert traj.policy_mask[end - len(real) :].tolist() == [1] * (len(s) - end + len(real))


def test_forward_on_final_sample_reproduces_greedy_generation(crop_then_real):
    """The RL trainer's view: one forward pass over the final sample (both images) must reproduce the greedy choices
    made during generation, i.e. the recomputed log-probs are of exactly the generated tokens in their context."""
    engine, traj = crop_then_real
    (real,) = engine.real_ids
    s = traj.sample
    with torch.no_grad():
        out = engine.model(
            input_ids=s.input_ids[None],
            position_ids=s.position_ids[:, None],
            pixel_values=s.visual.pixel_values,
            image_grid_thw=s.visual.image_grid_thw,
        )
    start = len(s) - (traj.finish_reason == "eos") - len(real)
    assert out.logits[0, start - 1 : start - 1 + len(real)].argmax(-1).tolist() == real


@needs_bwrap
def test_chat_tools_cli_runs(checkpoint, image_file, capsys):
    code = keye_main(
        ["chat", "--model", str(checkpoint), "--image", str(image_file), "--tools", "--max-new-tokens", "6", "Colour?"]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "code round(s)" in err and "finish: " in err


def test_eval_engine_with_tools(checkpoint, image_file):
    cfg = EvalConfig(model=str(checkpoint), device="cpu", tools=True, tool_options={"max_rounds": 2})
    engine = load_engine(cfg)
    try:
        assert isinstance(engine, ToolChatEngine) and engine.loop.config.max_rounds == 2
        assert engine.loop.config.retries == 5  # Thyme's evaluation defaults underneath the options
        settings = settings_for(cfg)
        settings.max_new_tokens = 5
        conv = [
            {"role": "user", "content": [{"type": "image", "image": str(image_file)}, {"type": "text", "text": "Q"}]}
        ]
        (text,) = engine.generate([conv], settings)
        assert isinstance(text, str) and engine.last_trajectories[0].policy_tokens >= 1
        prompt = engine.processor.decode(engine.last_trajectories[0].sample.input_ids.tolist())
        assert f"User Image Path: {image_file}" in prompt
    finally:
        engine.close()
    with pytest.raises(ValueError, match="tools=true needs engine 'keye'"):
        load_engine(EvalConfig(engine="tests.eval_fake_engine:make", tools=True))
    with pytest.raises(Exception, match="max_roundz"):
        load_engine(EvalConfig(model=str(checkpoint), tools=True, tool_options={"max_roundz": 2}))
