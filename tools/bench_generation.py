"""Generated tokens per second of both generation engines on one checkpoint, and the vLLM weight-push time.

Run in the vLLM environment (it has both engines): ``.venv-vllm/bin/python tools/bench_generation.py`` (a fresh
``configs/model/tiny.yaml`` checkpoint unless ``--model DIR``). Each engine answers the same batch of encoded
prompts (an image + a question, as GSPO rollouts on the sample data) at the RL rollout setting (T=1, top-p 0.9,
top-k 50), once to warm up and then ``--repeats`` times; tokens/s counts the tokens each engine actually produced.
The push time is ``VLLMEngine.update_weights`` from an in-memory copy of the model (what ``RLStep`` does before a
rollout). Both engines run with the same torch thread count (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: a fresh configs/model/tiny.yaml one)")
    parser.add_argument("--batch", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    from data_pipelines.sample_data import draw_shape
    from keye.cli.init import init_checkpoint
    from keye.generation import VLLMSettings
    from keye.generation.vllm_engine import VLLMEngine
    from keye.inference import ChatEngine, GenerationSettings
    from keye.modeling import KeyeVLForConditionalGeneration

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="keye_bench_generation_"))
    model_dir = Path(args.model) if args.model else work / "tiny"
    if not args.model:
        init_checkpoint(model_dir, config=str(Path(__file__).resolve().parents[1] / "configs/model/tiny.yaml"))
    image = work / "image.png"
    draw_shape(image, "red", "circle", size=224, seed=0)
    question = [{"type": "image", "image": str(image)}, {"type": "text", "text": "What colour is the shape?"}]
    convs = [[{"role": "user", "content": question}] for _ in range(args.batch)]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=0.9, top_k=50, seed=0)

    engines = {
        "transformers": ChatEngine.from_pretrained(model_dir, device="cpu"),
        "vllm": VLLMEngine.from_pretrained(model_dir, device="cpu", settings=VLLMSettings(max_model_len=4096)),
    }
    report: dict = {"batch": args.batch, "max_new_tokens": args.max_new_tokens, "threads": args.threads}
    for name, engine in engines.items():
        samples = engine.encode(convs, mode="no_think")
        engine.generate_encoded(samples, settings)  # warm-up
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = engine.generate_encoded(samples, settings)
            seconds = time.perf_counter() - start
            rates.append(sum(len(ids) for ids in result.token_ids) / seconds)
        report[f"{name}_tokens_per_s"] = statistics.median(rates)

    vllm_engine = engines["vllm"]
    trainer = KeyeVLForConditionalGeneration.from_pretrained(str(model_dir))
    pushes = [vllm_engine.update_weights(trainer.named_parameters()) for _ in range(args.repeats)]
    report["vllm_weight_push_s"] = statistics.median(pushes)
    report["parameters"] = sum(p.numel() for p in trainer.parameters())
    vllm_engine.close()

    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['parameters'] / 1e6:.1f}M parameters, batch {args.batch}, {args.max_new_tokens} new tokens, "
              f"{args.threads} thread(s)")  # fmt: skip
        for name in engines:
            print(f"  {name:12s} {report[f'{name}_tokens_per_s']:8.1f} generated tokens/s")
        print(f"  vLLM weight push (update_weights, whole model): {report['vllm_weight_push_s']:.3f} s")
    return 0


if __name__ == "__main__":  # vLLM may start processes by spawning: keep the guard
    raise SystemExit(main())
