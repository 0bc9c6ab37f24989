"""The Thyme tool loop with a scripted "model": real sandbox, real processor, exact token bookkeeping.

``ScriptedEngine`` is a ChatEngine whose model always writes one fixed response: it reads its own context, drops
the ``<sandbox_output>`` blocks, and emits the rest of the response up to the next stop string the loop asked
for. Everything else (encoding, splicing, images, masks, ATS, retries, limits, the sandbox) is the real code.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import pytest
import torch
from PIL import Image

from data_pipelines.encoded import IGNORE_INDEX
from keye.configuration import IMAGE_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID
from keye.inference import ChatEngine, GenerationResult, GenerationSettings
from keye.processing import KeyeVLProcessor
from keye.thyme import ToolLoop, ToolLoopConfig, add_thyme_prompt, thyme_conversation
from keye.thyme.loop import ERROR_PREFIX
from tests.sandbox_helpers import needs_bwrap, small_config
from tests.spine_fixtures import random_image
from train.rl.rewards import code_success_reward

BOX = (20, 30, 148, 126)
CROP_CODE = (
    "<code>\n```python\n"
    "img = Image.open(image_path)\n"
    f"crop = img.crop({BOX})\n"
    "processed_path = '/mnt/data/temp_processed_images/crop_{n}.png'\n"
    "crop.save(processed_path)\n"
    "print(processed_path)\n"
    "```\n</code>"
)


def crop_script(rounds: int = 1) -> str:
    code = "".join(f"Zoom in, step {n}.{CROP_CODE.replace('{n}', str(n))}" for n in range(rounds))
    return f"<think>The sign is small. {code}The crop shows a red sign.</think><answer>red</answer>"


@functools.cache
def processor() -> KeyeVLProcessor:
    return KeyeVLProcessor()


class ScriptedEngine(ChatEngine):
    """``script(prompt_text, settings) -> response(s)``: the first response the context is a prefix of is written
    (so a script can change its mind only where the context allows); records every call's settings and emitted text."""

    def __init__(self, script: Callable[[str, GenerationSettings], str | list[str]]) -> None:
        self.processor = processor()
        self.device = torch.device("cpu")
        self.script = script
        self.calls: list[dict] = []

    def generate_encoded(self, samples, settings, streamer=None) -> GenerationResult:
        tok = self.processor.tokenizer
        ids_out, texts = [], []
        for s in samples:
            context = self.processor.decode(s.input_ids.tolist(), skip_special_tokens=False)
            prompt, _, done = context.rpartition("<|im_start|>assistant\n")
            done = re.sub(r"<sandbox_output>.*?</sandbox_output>", "", done, flags=re.S)
            options = self.script(prompt, settings)
            options = [options] if isinstance(options, str) else options
            full = next((o for o in options if o.startswith(done)), None)
            assert full is not None, f"context {done!r} is not a prefix of the script"
            rest = full[len(done) :]
            ends = [rest.find(x) + len(x) for x in settings.stop_strings if x in rest]
            piece = rest[: min(ends)] if ends else rest
            ids = tok.encode(piece, add_special_tokens=False)[: settings.max_new_tokens]
            ids_out.append(ids)
            texts.append(tok.decode(ids))
        self.calls.append(
            {"batch": len(samples), "temperature": settings.temperature, "stops": list(settings.stop_strings)}
        )
        return GenerationResult(texts, ids_out, [0] * len(samples), [len(s) for s in samples], 0.0)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "photo.png"
    random_image(160, 200, seed=3).save(path)
    return path


def run_one(engine, conv, tmp_path, **cfg):
    base = dict(sandbox=small_config(), max_new_tokens=400)
    with ToolLoop(engine, ToolLoopConfig(**{**base, **cfg})) as loop:
        return loop.run([conv], out_dir=tmp_path / "out")[0]


def sandbox_span(ids: list[int], start: int) -> tuple[int, int]:
    """[first, last+1) of the first ``<sandbox_output>…</sandbox_output>`` at or after ``start``."""
    tok = processor().tokenizer
    open_ids = tok.encode("<sandbox_output>", add_special_tokens=False)
    close_ids = tok.encode("</sandbox_output>", add_special_tokens=False)
    a = next(i for i in range(start, len(ids)) if ids[i : i + len(open_ids)] == open_ids)
    b = next(i for i in range(a, len(ids)) if ids[i : i + len(close_ids)] == close_ids) + len(close_ids)
    return a, b


@needs_bwrap
def test_crop_round_is_spliced_as_an_image_and_generation_continues(tmp_path, image_file):
    engine = ScriptedEngine(lambda prompt, settings: crop_script(1))
    conv = thyme_conversation("What colour is the sign?", [image_file])
    traj = run_one(engine, conv, tmp_path)

    assert traj.finish_reason == "answer" and traj.answer == "red"
    (rnd,) = traj.rounds
    assert rnd.status == "ok" and len(rnd.images) == 1 and rnd.code.startswith("img = Image.open")
    with Image.open(rnd.images[0]) as crop, Image.open(image_file) as original:
        assert crop.size == (BOX[2] - BOX[0], BOX[3] - BOX[1])
        assert list(crop.convert("RGB").getdata()) == list(original.convert("RGB").crop(BOX).getdata())

    # the crop, processed by the same processor, is the second image of the final sample
    patches, grid = processor().encode_image({"image": rnd.images[0]})
    s = traj.sample
    assert s.visual.image_grid_thw.tolist()[1] == grid and s.visual.image_grid_thw.shape[0] == 2
    assert torch.equal(s.visual.pixel_values[-patches.shape[0] :], patches)
    ids = s.input_ids.tolist()
    a, b = sandbox_span(ids, traj.prompt_length)
    n = grid[1] * grid[2] // 4
    block = [VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * n + [VISION_END_TOKEN_ID]
    assert ids[a + 4 : a + 4 + len(block)] == block  # right after the 4 tokens of "<sandbox_output>"

    # policy mask: 0 on the prompt and exactly the sandbox span, 1 on everything generated
    mask = traj.policy_mask.tolist()
    assert mask[: traj.prompt_length] == [0] * traj.prompt_length
    assert [i for i in range(traj.prompt_length, len(ids)) if mask[i] == 0] == list(range(a, b))
    assert ids[-1] == processor().tokenizer.convert_tokens_to_ids("<|im_end|>") or traj.finish_reason == "answer"
    assert torch.equal(s.labels == IGNORE_INDEX, traj.policy_mask == 0)

    # the same conversation re-encoded by the processor (open assistant turn) is token-for-token the same
    again = processor().encode_conversation(traj.messages, continue_final_message=True)
    assert torch.equal(again.input_ids, s.input_ids)
    assert torch.equal(again.labels, s.labels)
    assert torch.equal(again.position_ids, s.position_ids)
    assert torch.equal(again.visual.pixel_values, s.visual.pixel_values)
    assert "<sandbox_output><image></sandbox_output>The crop shows" in traj.text


@needs_bwrap
def test_ats_decodes_text_hot_and_code_greedy(tmp_path, image_file):
    engine = ScriptedEngine(lambda prompt, settings: crop_script(1))
    traj = run_one(engine, thyme_conversation("Colour?", [image_file]), tmp_path, text_temperature=1.0)
    got = [(seg.kind, seg.temperature, seg.stop) for seg in traj.segments]
    assert got == [("text", 1.0, "<code>"), ("code", 0.0, "</code>"), ("text", 1.0, "</answer>")]
    assert [c["temperature"] for c in engine.calls] == [1.0, 0.0, 1.0]
    assert engine.calls[1]["stops"] == ["</code>"] and "<code>" in engine.calls[0]["stops"]
    assert traj.segments[1].text.startswith("\n```python") and traj.segments[1].text.endswith("</code>")

    # without ATS the code is part of the text segment: one temperature, no stop at <code>
    engine = ScriptedEngine(lambda prompt, settings: crop_script(1))
    traj = run_one(engine, thyme_conversation("Colour?", [image_file]), tmp_path / "b", ats=False)
    assert [(seg.kind, seg.stop) for seg in traj.segments] == [("text", "</code>"), ("text", "</answer>")]
    assert traj.rounds[0].status == "ok"


@needs_bwrap
def test_failed_round_is_rolled_back_and_retried_hotter(tmp_path, image_file):
    bad = crop_script(1).replace("crop = img.crop", "crop = 1 / 0\ncrop = img.crop")

    def script(prompt, settings):  # greedy writes the broken code, sampling at T>=1 writes the working one
        return crop_script(1) if settings.temperature >= 1.0 else [bad, crop_script(1)]

    engine = ScriptedEngine(script)
    conv = thyme_conversation("Colour?", [image_file])
    traj = run_one(engine, conv, tmp_path, **{**_eval_sampling(), "retries": 2})
    (failed,) = traj.discarded_rounds
    assert failed.status == "error" and "ZeroDivisionError" in failed.error and failed.attempt == 0
    assert traj.rounds[0].status == "ok" and traj.rounds[0].attempt == 1
    kept = [(s.kind, s.temperature, s.retry) for s in traj.segments if not s.discarded]
    assert kept == [("text", 1.0, 1), ("code", 1.0, 1), ("text", 0.0, 0)]
    assert [(s.kind, s.temperature) for s in traj.segments if s.discarded] == [("text", 0.0), ("code", 0.0)]
    assert "1 / 0" not in traj.text and traj.answer == "red"
    assert len(traj.sample.visual.image_grid_thw) == 2  # the rolled-back attempt left no tokens or pixels behind
    assert code_success_reward(traj.text, {}) == 1.0

    # with no retries the error is spliced back, in the prefix the RL code reward recognises
    traj = run_one(ScriptedEngine(script), conv, tmp_path / "b", **_eval_sampling())
    assert traj.rounds[0].status == "error" and not traj.discarded_rounds
    assert f"<sandbox_output>{ERROR_PREFIX}ZeroDivisionError" in traj.text
    assert code_success_reward(traj.text, {}) == 0.0


def _eval_sampling() -> dict:
    return dict(text_temperature=0.0, code_temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


@needs_bwrap
def test_round_and_image_limits(tmp_path, image_file):
    second = "crop.save('/mnt/data/b_{n}.png')\nprocessed_path = [processed_path, '/mnt/data/b_{n}.png']\n"
    two = CROP_CODE.replace("print(processed_path)", second + "print(processed_path)")
    script = crop_script(3).replace(CROP_CODE.replace("{n}", "0"), two.replace("{n}", "0"))
    traj = run_one(ScriptedEngine(lambda p, s: script), thyme_conversation("?", [image_file]), tmp_path, max_rounds=2)
    assert traj.finish_reason == "max_rounds" and len(traj.rounds) == 2
    assert traj.text.endswith("<code>")  # the third block was never run

    traj = run_one(
        ScriptedEngine(lambda p, s: script), thyme_conversation("?", [image_file]), tmp_path / "b", max_images=2
    )
    first = traj.rounds[0]
    assert len(first.images) == 1 and first.dropped_images == 1 and "1 image(s) not shown" in first.feedback
    assert traj.rounds[1].images == [] and traj.rounds[1].dropped_images == 1
    assert traj.sample.visual.image_grid_thw.shape[0] == 2 and traj.finish_reason == "answer"


@needs_bwrap
def test_batch_advances_together_and_finished_trajectories_drop_out(tmp_path, image_file):
    scripts = {"Q0": crop_script(2), "Q1": "<think>Easy.</think><answer>blue</answer>", "Q2": crop_script(1)}

    def script(prompt, settings):
        return next(v for k, v in scripts.items() if k in prompt)

    engine = ScriptedEngine(script)
    convs = [thyme_conversation(q, [image_file]) for q in scripts]
    with ToolLoop(engine, ToolLoopConfig(sandbox=small_config(), max_new_tokens=400)) as loop:
        trajs = loop.run(convs, out_dir=tmp_path / "out")
    assert [t.answer for t in trajs] == ["red", "blue", "red"]
    assert [len(t.rounds) for t in trajs] == [2, 0, 1]
    assert all(r.status == "ok" for t in trajs for r in t.rounds)  # a session's later rounds run on another thread
    assert [c["batch"] for c in engine.calls] == [3, 2, 2, 1, 1]  # Q1 answers at once; Q2 finishes a round early
    for t in trajs:  # every trajectory's sample is self-consistent
        again = processor().encode_conversation(t.messages, continue_final_message=True)
        assert torch.equal(again.input_ids, t.sample.input_ids)


def test_budget_and_prefilled_turn_without_sandbox(tmp_path):
    """No code: the token budget ends the trajectory; a prefilled assistant turn is continued, not re-answered."""
    engine = ScriptedEngine(lambda p, s: "<think>" + "a b c " * 50)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>"}]
    with ToolLoop(engine, ToolLoopConfig(max_new_tokens=12)) as loop:
        traj = loop.run([conv], out_dir=tmp_path)[0]
    assert traj.finish_reason == "length" and traj.policy_tokens == 12
    assert traj.text.startswith("<think>a b c") and traj.messages[-1]["role"] == "assistant"
    prompt = processor().encode_conversation(conv, continue_final_message=True)
    assert torch.equal(traj.sample.input_ids[: traj.prompt_length], prompt.input_ids)


def test_continue_final_message_leaves_the_turn_open():
    proc = processor()
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>so"}]
    closed = proc.encode_conversation(conv).input_ids.tolist()
    open_ = proc.encode_conversation(conv, continue_final_message=True).input_ids.tolist()
    assert closed[: len(open_)] == open_ and closed[len(open_) :] == proc.tokenizer.encode("<|im_end|>\n")
    with pytest.raises(ValueError, match="assistant turn last"):
        proc.encode_conversation(conv[:1], continue_final_message=True)
    with pytest.raises(ValueError, match="exclude each other"):
        proc.encode_conversation(conv, continue_final_message=True, add_generation_prompt=True)


def test_thyme_prompt_carries_image_path_and_size(image_file):
    conv = thyme_conversation("What colour?", [image_file])
    text = conv[1]["content"][-1]["text"]
    assert f"User Image Path: {image_file}" in text and "User Image Size: 200x160" in text
    assert conv[0]["role"] == "system" and "<code>" in conv[0]["content"]
    bench = [{"role": "user", "content": [{"type": "image", "image": str(image_file)}, {"type": "text", "text": "Q"}]}]
    out = add_thyme_prompt(bench, [str(image_file)])
    assert out[0]["role"] == "system" and "User Image Size: 200x160" in out[-1]["content"][-1]["text"]
    assert bench[0]["content"][-1] == {"type": "text", "text": "Q"}  # the input is not modified
