"""GSPO learns on CPU: a micro model taught only the answer format (colour words with shuffled labels, so it ignores
the image) raises its greedy accuracy on "what colour is the shape?" clearly within a dozen RL steps.

Settings that differ from the 8B recipe, and why: 2 colours, 56-px images and 3 new tokens keep a step at ~2 s
on CPU; lr 3e-3 (the paper's 1e-6 would need thousands of steps).  The loss is GSPO with its published ε.
"""

from __future__ import annotations

import random

import pytest
import torch

from data_pipelines.packing import pack_row
from data_pipelines.sample_data import SHAPES, draw_shape
from keye.inference import ChatEngine, GenerationSettings
from keye.modeling import KeyeVLForConditionalGeneration
from keye.processing import KeyeVLProcessor
from tests.spine_fixtures import micro_config
from train.rl.config import HintConfig, RLConfig, RolloutConfig, UpdateConfig
from train.rl.losses import PolicyLossConfig
from train.rl.rewards import clean_answer
from train.rl.step import RLStep

COLOURS = ("red", "blue")
QUESTION = "What colour is the shape? Answer with one word."


def _task(root) -> list[dict]:
    records = []
    for i in range(8):
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        draw_shape(root / f"shape{i}.png", colour, shape, size=56, seed=i)
        records.append(
            {
                "id": f"p{i}",
                "mode": "no_think",
                "solution": colour,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "image": f"shape{i}.png"}, {"type": "text", "text": QUESTION}],
                    }
                ],
                "hints": [
                    "Look at the filled shape.",
                    "Ignore the gray background.",
                    f"The answer is one of: {', '.join(COLOURS)}.",
                    f"The shape is a {shape}.",
                    f"The answer is {colour}.",
                ],
            }
        )
    return records


def colour_task_gspo(model, engine, media_root, rollout_engine: str = "transformers"):
    """The colour task's GSPO step (8 prompts x 8 rollouts, hint ladder k=4, 4 minibatches) and its AdamW step."""
    cfg = RLConfig(
        prompts_per_step=8,
        rollout=RolloutConfig(group_size=8, max_new_tokens=3, media_root=str(media_root), engine=rollout_engine),
        loss=PolicyLossConfig(loss_type="gspo"),
        hints=HintConfig(k=4),
        update=UpdateConfig(minibatches=4),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def opt_step():
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return norm

    return RLStep(model, engine, cfg), opt_step


def format_only_sft(model, processor: KeyeVLProcessor, records: list[dict], root, rng: random.Random) -> None:
    """Every image paired with every colour, 30 steps: the model learns to answer with one colour word but not
    which one (what GSPO must then learn)."""
    sft = [
        processor.encode_conversation(
            r["messages"] + [{"role": "assistant", "content": c}], mode="no_think", media_root=root
        )
        for r in records
        for c in COLOURS
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        batch = pack_row(rng.sample(sft, 8), 8 * len(sft[0]))
        model(**batch.model_inputs()).loss.backward()
        opt.step()
        opt.zero_grad()


def _greedy_accuracy(engine: ChatEngine, records: list[dict], root) -> float:
    engine.model.eval()
    prompts = [
        engine.processor.encode_conversation(
            r["messages"], mode="no_think", add_generation_prompt=True, media_root=root
        )
        for r in records
    ]
    texts = engine.generate_encoded(prompts, GenerationSettings(max_new_tokens=3)).texts
    return sum(clean_answer(t) == r["solution"] for t, r in zip(texts, records)) / len(records)


@pytest.fixture
def one_thread():
    """Two OpenMP threads on two cores shared with other test processes spin-wait and run 3-6x slower; one
    thread gives the same numbers at a steady ~3.5 s per RL step."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_gspo_raises_accuracy_on_the_colour_task(tmp_path, one_thread):
    torch.manual_seed(0)
    rng = random.Random(0)
    records = _task(tmp_path)
    processor = KeyeVLProcessor()
    model = KeyeVLForConditionalGeneration(micro_config())
    format_only_sft(model, processor, records, tmp_path, rng)

    engine = ChatEngine(model, processor, "cpu")
    initial = _greedy_accuracy(engine, records, tmp_path)
    step, opt_step = colour_task_gspo(model, engine, tmp_path)
    curve = []
    for _ in range(12):
        rng.shuffle(records)
        stats = step.step(records, opt_step)
        curve.append(round(stats["reward/accuracy_reward/mean"], 3))
        assert stats["update/first_minibatch_ratio_dev"] == 0.0
    final = _greedy_accuracy(engine, records, tmp_path)
    print(f"greedy accuracy {initial:.3f} -> {final:.3f}; rollout accuracy per step {curve}")
    assert initial <= 0.625, "the SFT model should not already solve the task"
    assert final >= initial + 0.25, (initial, final, curve)
    assert sum(step.hints.probes[1:]) > 0, "an all-fail group should have been probed with hints"
