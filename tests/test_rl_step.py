"""The RL step on the micro model: chunked log-probs, rollouts over text/image/multi-image/video prompts, masks,
on-policy ratio, progressive hinting, configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from data_pipelines import synthetic
from data_pipelines.encoded import IGNORE_INDEX
from data_pipelines.packing import pack_row
from data_pipelines.sample_data import draw_shape
from keye.inference import ChatEngine, GenerationResult
from keye.logprobs import token_logprobs
from keye.loss import shift_labels
from keye.modeling import KeyeVLForConditionalGeneration
from keye.processing import KeyeVLProcessor
from keye.typed_config import ConfigError
from tests.spine_fixtures import micro_config
from train.rl.config import HintConfig, RLConfig, RolloutConfig, UpdateConfig, load_rl_config
from train.rl.losses import policy_loss
from train.rl.rewards import RewardConfig, RewardTerm
from train.rl.rollout import Rollout
from train.rl.step import RLStep

LADDER = [f"hint-L{i}" for i in range(1, 6)]


@pytest.fixture(scope="module")
def processor() -> KeyeVLProcessor:
    return KeyeVLProcessor()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rl_media")
    draw_shape(root / "a.png", "red", "circle", size=56, seed=1)
    draw_shape(root / "b.png", "blue", "square", size=56, seed=2)
    synthetic.scene_cuts(root / "v.mp4", every=4, num_frames=8, fps=4.0, height=56, width=56, seed=0)
    return root


def _user(*items) -> list[dict]:
    return [{"role": "user", "content": list(items)}]


def _records() -> list[dict]:
    q = {"type": "text", "text": "What colour is the shape?"}
    return [
        {"id": "text", "mode": "no_think", "messages": _user({"type": "text", "text": "2+2?"}), "solution": "4"},
        {"id": "img", "mode": "no_think", "messages": _user({"type": "image", "image": "a.png"}, q), "solution": "red"},
        {
            "id": "multi",
            "mode": "no_think",
            "messages": _user({"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"}, q),
            "solution": "red",
        },
        {
            "id": "vid",
            "mode": "no_think",
            "messages": _user({"type": "video", "video": "v.mp4"}, {"type": "text", "text": "How many cuts?"}),
            "solution": "1",
        },
    ]


def length_reward(completion: str, sample) -> float:
    """A reward that differs between random rollouts, so that groups carry signal."""
    return float(len(completion))


def _model(seed: int = 0) -> KeyeVLForConditionalGeneration:
    torch.manual_seed(seed)
    return KeyeVLForConditionalGeneration(micro_config()).eval()


def _cfg(media: Path, **kw) -> RLConfig:
    rollout = RolloutConfig(group_size=2, max_new_tokens=4, media_root=str(media), batch_size=16)
    return RLConfig(
        prompts_per_step=4,
        rollout=rollout,
        update=kw.pop("update", UpdateConfig(minibatches=2, micro_batch_tokens=256, logprob_chunk=3)),
        **kw,
    )


def test_token_logprobs_equal_log_softmax_of_full_logits(processor, media):
    model = _model()
    samples = [
        processor.encode_conversation(
            r["messages"] + [{"role": "assistant", "content": "red"}], mode="no_think", media_root=media
        )
        for r in _records()[1:3]
    ]
    packed = pack_row(samples, sum(len(s) for s in samples))
    targets = shift_labels(packed.input_ids, packed.cu_seqlens)  # every position scored
    logits = model(**{k: v for k, v in packed.model_inputs().items() if k != "labels"}).logits.float()
    full = logits.log_softmax(-1)
    valid = targets != IGNORE_INDEX
    expect = full.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * valid
    got, ent = token_logprobs(model, packed.model_inputs(), targets, chunk_size=7, with_entropy=True)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    expect_ent = -(full.exp() * full).sum(-1) * valid
    torch.testing.assert_close(ent, expect_ent, atol=1e-4, rtol=1e-4)
    # differentiable through the chunked (checkpointed) projection
    got, _ = token_logprobs(model, packed.model_inputs(), targets, chunk_size=7)
    got.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_full_rl_step_over_text_image_multi_image_and_video(processor, media):
    model = _model()
    engine = ChatEngine(model, processor, "cpu")
    reward = RewardConfig(terms=[RewardTerm("accuracy_reward"), RewardTerm("tests.test_rl_step:length_reward", 0.1)])
    step = RLStep(model, engine, _cfg(media, reward=reward))
    before = {k: v.clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    def opt_step():
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return norm

    batch = step.rollout(_records())
    assert len(batch.rollouts) == 8 and [r.group for r in batch.rollouts] == [0, 0, 1, 1, 2, 2, 3, 3]
    for r in batch.rollouts[::2]:  # update inputs are the rollout's own ids: prompt ids = the encoded prompt
        prompt = step.sampler.encode_prompt(r.record["messages"], r.record)
        assert torch.equal(r.sample.input_ids[: r.prompt_length], prompt.input_ids)
        assert (r.sample.labels[: r.prompt_length] == IGNORE_INDEX).all()
        if r.record["id"] in ("img", "vid"):
            assert r.sample.visual.pixel_values is not None or r.sample.visual.pixel_values_videos is not None
    # old log-probs are what the current policy gives, recomputed independently
    again, _ = step._batch_logprobs(model, batch.rollouts, batch.minibatches, batch.mask.shape[1], with_entropy=False)
    assert torch.equal(again, batch.old_logp)
    stats = {**batch.stats, **step.update(batch, opt_step)}
    for key in (
        "reward/mean",
        "entropy",
        "update/pg_loss",
        "update/clip_frac",
        "update/ratio_mean",
        "tokens/update_per_s",
    ):
        assert math.isfinite(stats[key]), key
    for key in ("reward/accuracy_reward/mean", "reward/length_reward/std", "pass_rate", "zero_adv_group_frac"):
        assert key in stats
    assert stats["update/first_minibatch_ratio_dev"] == 0.0  # on-policy: ratio exactly 1
    assert stats["update/minibatches"] == 2 and stats["rollouts"] == 8 and stats["tokens/rollout_per_s"] > 0
    assert stats["zero_adv_group_frac"] < 1.0 and stats["reward/length_reward/std"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    state = step.state_dict()
    assert state["steps"] == 1 and state["sampler_calls"] >= 1


def test_masks_exclude_prompt_padding_and_sandbox_tokens(processor, media):
    model = _model()
    step = RLStep(model, ChatEngine(model, processor, "cpu"), _cfg(media))
    rec = _records()[1]
    prompt = processor.encode_conversation(rec["messages"], mode="think", add_generation_prompt=True, media_root=media)
    replies = [
        "<think>look<code>crop()</code><sandbox_output>a red crop</sandbox_output>red</think><answer>red</answer>",
        "<think>no</think><answer>blue</answer>",
    ]
    rollouts = []
    for i, reply in enumerate(replies):
        full = processor.encode_conversation(
            rec["messages"] + [{"role": "assistant", "content": reply}], mode="think", media_root=media
        )
        assert torch.equal(full.input_ids[: len(prompt)], prompt.input_ids)
        r = Rollout(rec, 0, full, len(prompt), reply, "eos", reward=float(i == 0))
        rollouts.append(r)
    batch = step.prepare(rollouts)
    tok = processor.tokenizer
    response0 = rollouts[0].sample.input_ids[len(prompt) :].tolist()
    n_resp = [len(r.sample) - len(prompt) for r in rollouts]
    opening, closing = (tok.encode(t, add_special_tokens=False) for t in ("<sandbox_output>", "</sandbox_output>"))
    starts = [j for j in range(len(response0)) if response0[j : j + len(opening)] == opening]
    ends = [j + len(closing) for j in range(len(response0)) if response0[j : j + len(closing)] == closing]
    assert len(starts) == len(ends) == 1
    a, b = starts[0], ends[0]
    mask0 = batch.mask[0]
    assert mask0[:a].all() and not mask0[a:b].any() and mask0[b : n_resp[0] - 1].all()  # sandbox span masked
    assert not mask0[n_resp[0] - 1 :].any()  # the "\n" after <|im_end|>, then padding
    assert int(batch.mask[1].sum()) == n_resp[1] - 1 and not batch.mask[1, n_resp[1] - 1 :].any()
    # perturbing log-probs where mask = 0 (prompt excluded by construction, sandbox, padding) changes nothing
    logp, _ = step._row_logprobs(model, rollouts, batch.mask.shape[1])
    logp = logp.detach().requires_grad_(True)
    loss, st = policy_loss(logp, batch.old_logp, batch.advantages, batch.mask, step.cfg.loss)
    loss.backward()
    assert (logp.grad[~batch.mask] == 0).all() and logp.grad[batch.mask].abs().sum() > 0
    noisy = torch.where(batch.mask, logp.detach(), torch.full_like(logp, float("nan")))
    old_noisy = torch.where(batch.mask, batch.old_logp, torch.full_like(logp, 1e6))
    loss2, st2 = policy_loss(noisy, old_noisy, batch.advantages, batch.mask, step.cfg.loss)
    assert torch.equal(loss.detach(), loss2) and st2["seq_len_mean"] == batch.mask.sum() / 2


class HintReader(ChatEngine):
    """Answers "7" only when the prompt carries a hint of level >= ``needed``, else "no"."""

    def __init__(self, model, processor, needed: int) -> None:
        super().__init__(model, processor, "cpu")
        self.needed = needed

    def generate_encoded(self, samples, settings, streamer=None):
        tok = self.processor.tokenizer
        out = []
        for s in samples:
            text = tok.decode(s.input_ids)
            level = max([i for i in range(1, 6) if f"hint-L{i}" in text], default=0)
            out.append(tok.encode("7" if level >= self.needed else "no", add_special_tokens=False))
        return GenerationResult([tok.decode(o) for o in out], out, [0] * len(samples), [len(s) for s in samples], 0.0)


def test_all_fail_prompt_is_probed_and_rolled_at_the_weakest_level_that_succeeds(processor, media):
    model = _model()
    cfg = _cfg(media, hints=HintConfig(k=2))
    step = RLStep(model, HintReader(model, processor, needed=3), cfg)
    hard = {"id": "hard", "mode": "no_think", "messages": _user({"type": "text", "text": "Q?"}), "solution": "7"}
    batch = step.rollout([{**hard, "hints": LADDER}, {**hard, "id": "nohint"}])
    st = batch.stats
    assert st["hint/probes_L1"] == 2 and st["hint/probes_L2"] == 2 and st["hint/probes_L3"] == 2
    assert st["hint/probes_L4"] == 0 and st["hint/pass_rate_L3"] == 1.0 and st["hint/groups_regenerated"] == 1
    assert step.hints.level_for("hard") == 3 and step.hints.level_for("nohint") == 0
    hinted, plain = batch.rollouts[:2], batch.rollouts[2:]
    assert all(r.hint_level == 3 and r.passed for r in hinted) and all(not r.passed for r in plain)
    tok = processor.tokenizer
    for r in hinted:  # the hint is in the user turn: prompt ids, never trained on
        assert "hint-L3" in tok.decode(r.sample.input_ids[: r.prompt_length])
        assert "hint" not in tok.decode(r.sample.input_ids[r.prompt_length :])
    # a hinted group that all passes tries to lower its level next time (it still needs L3)
    again = step.rollout([{**hard, "hints": LADDER}])
    assert again.rollouts[0].hint_level == 3 and step.hints.probes[0] == 2 and step.hints.level_for("hard") == 3


def test_configs_load_and_reject_bad_keys(tmp_path):
    big = load_rl_config("configs/rl/gspo_8b.yaml")
    assert big.loss.loss_type == "gspo" and big.loss.eps() == (3e-4, 4e-4) and big.loss.kl_coef == 0
    assert big.update.minibatches == 4 and big.rollout.group_size == 8 and big.hints.enabled
    tiny = load_rl_config("configs/rl/tiny.yaml", ["rl.loss.loss_type=grpo"])
    assert tiny.loss.eps() == (0.2, 0.28)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl:\n  update:\n    minibatchez: 2\n")
    with pytest.raises(ConfigError, match="minibatchez"):
        load_rl_config(bad)
    with pytest.raises(ValueError, match="pass_term"):
        RLConfig(pass_term="nope", reward=RewardConfig(terms=[RewardTerm("format_reward")]))
