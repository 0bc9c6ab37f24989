"""Runs inside the vLLM environment (``make vllm-env``): serve a checkpoint with vLLM and record what it computes.

Usage: ``python tests/vllm_worker.py CKPT REQUESTS.pt OUT.json``. It never imports this project: the checkpoint
must load through its own remote code, as ``vllm serve CKPT --trust-remote-code`` would load it.

REQUESTS.pt holds a list of ``{"name", "prompt", "images", "videos", "mm_processor_kwargs", "max_tokens"}``
(images as uint8 ``[H, W, 3]`` arrays, videos as keye-vl-utils' uint8 ``[T, 3, H, W]`` frame stacks). OUT.json
gets, per request, vLLM's prompt token ids, the log-prob of each prompt token, and the greedy tokens with their
log-probs.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> int:
    ckpt, requests_path, out_path = sys.argv[1:4]
    import torch
    from PIL import Image
    from vllm import LLM, SamplingParams

    requests = torch.load(requests_path, weights_only=False)
    started = time.time()
    llm = LLM(
        model=ckpt,
        trust_remote_code=True,
        dtype="float32",
        max_model_len=32768,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 2, "video": 1},
        seed=0,
    )
    load_s = time.time() - started
    results = []
    for req in requests:
        mm: dict = {}
        if req.get("images"):
            images = [Image.fromarray(a) for a in req["images"]]
            mm["image"] = images if len(images) > 1 else images[0]
        if req.get("videos"):
            mm["video"] = req["videos"] if len(req["videos"]) > 1 else req["videos"][0]
        prompt = {"prompt": req["prompt"]}
        if mm:
            prompt["multi_modal_data"] = mm
        if req.get("mm_processor_kwargs"):
            prompt["mm_processor_kwargs"] = req["mm_processor_kwargs"]
        params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], prompt_logprobs=0, logprobs=0)
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        ids = list(out.prompt_token_ids)
        prompt_lp = [None] + [float(out.prompt_logprobs[i][ids[i]].logprob) for i in range(1, len(ids))]
        gen = out.outputs[0]
        gen_lp = [float(step[tok].logprob) for step, tok in zip(gen.logprobs, gen.token_ids)]
        results.append(
            {
                "name": req["name"],
                "prompt_token_ids": ids,
                "prompt_logprobs": prompt_lp,
                "token_ids": list(gen.token_ids),
                "logprobs": gen_lp,
            }
        )
    with open(out_path, "w") as f:
        json.dump({"load_s": load_s, "total_s": time.time() - started, "results": results}, f)
    return 0


if __name__ == "__main__":  # vLLM starts worker processes by spawning: keep the guard
    sys.exit(main())
