"""The vLLM generation engine (``keye.generation.vllm_engine``) against the transformers one, inside the vLLM
environment (``make vllm-env``; ``make test`` runs this file there, and it skips in an environment without vLLM).

One engine serves a perturbed head_dim-32 training export (vLLM's CPU attention needs head_dim >= 32) for the whole
module: the prompt ids vLLM reports equal ours for text, image and Slow-Fast video prompts, greedy tokens and
log-probs equal the transformers engine's, stop strings end a segment where they end it for the transformers
engine, the Thyme loop splices a sandbox crop and continues identically, and a weight push moves the engine onto
the trainer's new weights in place.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM engine tests run in the vLLM environment (make vllm-env)")

from data_pipelines import synthetic  # noqa: E402
from data_pipelines.sample_data import make_sample_data  # noqa: E402
from keye.cli.main import main as keye_main  # noqa: E402
from keye.generation import VLLMSettings  # noqa: E402
from keye.generation.vllm_engine import PromptMismatchError, VLLMEngine  # noqa: E402
from keye.generation.vllm_inputs import vllm_prompt  # noqa: E402
from keye.inference import ChatEngine, GenerationSettings  # noqa: E402
from keye.modeling import KeyeVLForConditionalGeneration  # noqa: E402
from keye.thyme import ToolLoop, ToolLoopConfig, thyme_conversation  # noqa: E402
from tests.released_helpers import export, perturbed_model  # noqa: E402
from tests.spine_fixtures import random_image  # noqa: E402

LOGPROB_ATOL = 1e-4  # fp32 on both sides; measured differences are ~1e-6


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(vLLM engine, transformers engine, checkpoint) on the same perturbed export, fp32 on the CPU."""
    torch.manual_seed(0)
    ckpt = export(perturbed_model(text={"head_dim": 32}), tmp_path_factory.mktemp("vllm_engine") / "export")
    vllm_engine = VLLMEngine.from_pretrained(ckpt, settings=VLLMSettings(max_model_len=8192), seed=0)
    yield vllm_engine, ChatEngine.from_pretrained(ckpt, device="cpu"), ckpt
    vllm_engine.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm_media")
    random_image(300, 420, seed=5).save(root / "image.png")
    # scene cuts every 30 frames at 60 fps: slow frames at the cuts, fast frames between (tests/test_vllm.py serves
    # a real 1080p clip; a small one keeps this module's CPU time down)
    video = synthetic.scene_cuts(root / "clip.mp4", every=60, num_frames=240, fps=60)
    return {"image": root / "image.png", "video": Path(video)}


def _conversations(media: dict[str, Path]) -> dict[str, list[dict]]:
    return {
        "text": [{"role": "user", "content": "Describe a quiet harbour at dawn in one sentence."}],
        "image": [
            {
                "role": "user",
                "content": [{"type": "image", "image": str(media["image"])}, {"type": "text", "text": "What?"}],
            }
        ],
        "video": [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": str(media["video"]), "max_frames": 12},
                    {"type": "text", "text": "Why?"},
                ],
            }
        ],
    }


def test_vllm_sees_our_prompt_ids_and_decodes_as_the_transformers_engine(engines, media):
    vllm_engine, hf_engine, _ = engines
    from vllm import SamplingParams

    convs = _conversations(media)
    samples = vllm_engine.encode(list(convs.values()))
    video = samples[2]
    assert 1 in video.meta["videos"][0].frame_types, "the clip should carry fast frames (Slow-Fast)"
    # what vLLM itself reports as the prompt it ran, for the request the engine builds from our sample
    raw = vllm_engine.llm.generate(
        [vllm_prompt(s, vllm_engine.processor.image_config) for s in samples],
        SamplingParams(max_tokens=1, temperature=0.0),
        use_tqdm=False,
    )
    for name, sample, out in zip(convs, samples, raw):
        assert list(out.prompt_token_ids) == sample.input_ids.tolist(), f"{name}: vLLM's prompt ids differ from ours"

    settings = GenerationSettings(max_new_tokens=8)
    got = vllm_engine.generate_encoded(samples, settings)
    want = hf_engine.generate_encoded(samples, settings)
    assert got.token_ids == want.token_ids and got.texts == want.texts
    for sample, ids, lps in zip(samples, got.token_ids, got.logprobs):
        full = torch.cat([sample.input_ids, torch.tensor(ids, dtype=torch.long)])
        with torch.no_grad():
            logits = hf_engine.model(input_ids=full[None], **sample.visual.as_kwargs()).logits[0].float()
        ours = torch.log_softmax(logits[:-1], -1).gather(1, full[1:, None])[:, 0][len(sample) - 1 :]
        np.testing.assert_allclose(lps[: len(ids)], ours.numpy(), atol=LOGPROB_ATOL)


def test_a_prompt_vllm_would_expand_differently_is_an_error(engines, media):
    vllm_engine, _, _ = engines
    (sample,) = vllm_engine.encode([_conversations(media)["image"]])
    ids = sample.input_ids.tolist()
    at = ids.index(151655)  # one image pad fewer than the grid has: the model would see a shifted prompt
    sample.input_ids = torch.tensor(ids[:at] + ids[at + 1 :])
    with pytest.raises(PromptMismatchError, match="differs from ours at token"):
        vllm_engine.generate_encoded([sample], GenerationSettings(max_new_tokens=2))


def test_stop_strings_end_a_segment_where_the_transformers_engine_ends_it(engines, media):
    vllm_engine, hf_engine, _ = engines
    samples = vllm_engine.encode([_conversations(media)["image"]])
    free = hf_engine.generate_encoded(samples, GenerationSettings(max_new_tokens=16)).token_ids[0]
    tok = hf_engine.processor.tokenizer
    stop = tok.decode(free[:6])[-3:]  # ends inside the 6th token's text (or earlier)
    settings = GenerationSettings(max_new_tokens=16, stop_strings=[stop])
    got = vllm_engine.generate_encoded(samples, settings).token_ids[0]
    assert got == hf_engine.generate_encoded(samples, settings).token_ids[0]
    assert len(got) <= 6 and stop in tok.decode(got)


def test_thyme_loop_splices_the_sandbox_crop_and_continues_as_with_transformers(engines, tmp_path):
    """A scripted crop round (so a random model writes code), then each engine decodes greedily over the spliced
    crop: the vLLM prompt holds the sandbox image, and both trajectories end with the same tokens."""
    from tests.sandbox_helpers import BWRAP_PROBLEM, small_config
    from tests.test_tool_loop import ScriptedEngine, crop_script

    if BWRAP_PROBLEM is not None:
        pytest.skip(f"no bubblewrap jail here: {BWRAP_PROBLEM}")
    vllm_engine, hf_engine, _ = engines

    class CropFirst:
        """``inner``, except that its first two calls write the crop round (text, then ATS code segment)."""

        def __init__(self, inner):
            self.inner, self.processor, self.scripted = inner, inner.processor, 2
            self.script = ScriptedEngine(lambda prompt, settings: crop_script(1))
            self.script.processor = inner.processor

        def generate_encoded(self, samples, settings):
            if self.scripted:
                self.scripted -= 1
                return self.script.generate_encoded(samples, settings)
            return self.inner.generate_encoded(samples, settings)

    image = tmp_path / "photo.png"
    random_image(160, 200, seed=3).save(image)
    cfg = ToolLoopConfig.evaluation(max_new_tokens=120, max_rounds=1, sandbox=small_config())
    trajectories = []
    for engine in (vllm_engine, hf_engine):
        with ToolLoop(CropFirst(engine), cfg) as loop:
            conv = thyme_conversation("What colour is the sign?", [image])
            trajectories.append(loop.run([conv], out_dir=tmp_path / engine.name)[0])
    got, want = trajectories
    assert got.rounds[0].status == "ok" and len(got.rounds[0].images) == 1
    assert got.sample.visual.image_grid_thw.shape[0] == 2  # the input image and the spliced crop
    assert got.sample.input_ids.tolist() == want.sample.input_ids.tolist()
    assert got.finish_reason == want.finish_reason
    policy = got.policy_mask.bool()
    lp = got.engine_logprobs
    assert lp is not None and lp[policy].isfinite().any() and not lp[~policy].isfinite().any()


def test_weight_push_moves_the_engine_onto_the_trainers_weights(engines, media):
    """After one optimizer step and one push, the engine's log-probs of a fixed sequence equal the trainer's (fp32
    tolerance) and differ from before the push; no restart, no files."""
    vllm_engine, _, ckpt = engines
    trainer = KeyeVLForConditionalGeneration.from_pretrained(str(ckpt)).train()
    (prompt,) = vllm_engine.encode([_conversations(media)["image"]])
    answer = torch.tensor(vllm_engine.processor.tokenizer.encode("A red sign on a wall."), dtype=torch.long)
    sample = prompt
    sample.input_ids = torch.cat([prompt.input_ids, answer])

    def trainer_logprobs() -> torch.Tensor:
        with torch.no_grad():
            logits = trainer(input_ids=sample.input_ids[None], **sample.visual.as_kwargs()).logits[0].float()
        return torch.log_softmax(logits[:-1], -1).gather(1, sample.input_ids[1:, None])[:, 0]

    before = vllm_engine.sequence_logprobs([sample])[0]
    np.testing.assert_allclose(before.numpy(), trainer_logprobs().numpy(), atol=LOGPROB_ATOL)

    opt = torch.optim.AdamW(trainer.parameters(), lr=1e-2)
    labels = torch.cat([torch.full_like(prompt.input_ids[: len(sample) - len(answer)], -100), answer])
    trainer(input_ids=sample.input_ids[None], labels=labels[None], **sample.visual.as_kwargs()).loss.backward()
    opt.step()
    seconds = vllm_engine.update_weights(trainer.named_parameters())
    after = vllm_engine.sequence_logprobs([sample])[0]
    want = trainer_logprobs()
    print(f"weight push {seconds:.3f} s; max |Δ| engine vs trainer {float((after - want).abs().max()):.2e}")
    np.testing.assert_allclose(after.numpy(), want.numpy(), atol=LOGPROB_ATOL)
    assert float((after - before).abs().max()) > 1e-2, "the push did not change the engine's weights"


def test_keye_eval_with_vllm_predicts_what_the_default_engine_predicts(engines, tmp_path):
    """``keye eval --engine vllm`` on the generated fixtures (TIME and video MCQ: Slow-Fast videos; KC-MMBench:
    frame lists) gives the default engine's predictions, greedy in fp32."""
    _, _, ckpt = engines
    make_sample_data(tmp_path / "sample", n_images=4)
    args = ["--model", str(ckpt), "--bench", "time,kc_mmbench,video_mcq", "--data", str(tmp_path / "sample" / "eval")]
    args += ["--limit", "2", "generation.max_new_tokens=8", "generation.batch_size=4", "progress=false"]
    preds = {}
    for engine in ("transformers", "vllm"):
        out = tmp_path / engine
        assert keye_main(["eval", *args, "--out", str(out), "--engine", engine]) == 0
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        preds[engine] = {(r["bench"], r["id"]): r["prediction"] for r in rows}
        config = json.loads((out / "results.json").read_text())["config"]
        assert config["generation"]["engine"] == engine
    assert len(preds["vllm"]) >= 6 and preds["vllm"] == preds["transformers"]
