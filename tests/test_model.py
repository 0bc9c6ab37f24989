"""The model: config round-trip, forward shapes, KV-cache generation, packing, save/load, errors."""

from __future__ import annotations

import pytest
import torch

from data_pipelines.encoded import IGNORE_INDEX
from keye.configuration import KeyeVLConfig
from keye.model_config import load_model_config
from keye.modeling import KeyeVLForConditionalGeneration
from tests.spine_fixtures import micro_config, random_clip, random_image


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return KeyeVLForConditionalGeneration(micro_config()).eval()


@pytest.fixture(scope="module")
def processor():
    from keye.processing import KeyeVLProcessor

    return KeyeVLProcessor()


def _conv(*items, text="Describe."):
    return [{"role": "user", "content": [*items, {"type": "text", "text": text}]}]


def _forward(model, sample, **kw):
    return model(input_ids=sample.input_ids[None], **sample.visual.as_kwargs(), **kw)


def test_config_round_trip(tmp_path):
    cfg = micro_config()
    cfg.save_pretrained(tmp_path)
    again = KeyeVLConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()
    assert again.text_config.hidden_size == 64 and again.vision_config.image_size == 112
    assert again.mrope_section == cfg.mrope_section


def test_mrope_section_must_fit_head_dim():
    with pytest.raises(ValueError, match="mrope_section"):
        micro_config(mrope_section=[2, 2, 2])


def test_8b_config_matches_published_sizes():
    cfg = load_model_config("configs/model/keye_vl_1_5_8b.yaml")
    with torch.device("meta"):
        model = KeyeVLForConditionalGeneration(cfg)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(model.model) + count(model.lm_head) == 8_190_735_360  # Qwen3-8B
    assert count(model.visual) == 412_987_248  # SigLIP-so400m-patch14-384 tower without its pooling head
    assert count(model.mlp_AR) == 4608 * 2 + 4608 * 4608 + 4608 + 4608 * 4096 + 4096
    assert count(model) == 8_643_848_560


def test_tiny_config_is_small_and_mostly_embedding():
    cfg = load_model_config("configs/model/tiny.yaml")
    with torch.device("meta"):
        model = KeyeVLForConditionalGeneration(cfg)
    total = sum(p.numel() for p in model.parameters())
    embed = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    assert total < 50_000_000 and embed / total > 0.9


def test_forward_shapes_text_image_multi_image_video(model, processor):
    vocab = model.config.text_config.vocab_size
    cases = {
        "text": _conv(),
        "image": _conv({"type": "image", "image": random_image(56, 84)}),
        "multi_image": _conv(
            {"type": "image", "image": random_image(56, 56, 1)}, {"type": "image", "image": random_image(84, 112, 2)}
        ),
        "video": _conv({"type": "video", "video": random_clip()}),
    }
    for name, conv in cases.items():
        sample = processor.encode_conversation(conv, add_generation_prompt=True)
        out = _forward(model, sample)
        assert out.logits.shape == (1, len(sample), vocab), name
        assert torch.isfinite(out.logits).all(), name


def test_visual_feature_count_matches_placeholders(model, processor):
    sample = processor.encode_conversation(_conv({"type": "image", "image": random_image(56, 84)}))
    n_pad = int((sample.input_ids == model.config.image_token_id).sum())
    assert model.encode_visual(sample.visual.pixel_values, sample.visual.image_grid_thw).shape[0] == n_pad == 2 * 3
    clip = random_clip()
    sample = processor.encode_conversation(_conv({"type": "video", "video": clip}))
    n_pad = int((sample.input_ids == model.config.video_token_id).sum())
    assert model.encode_visual(sample.visual.pixel_values_videos, sample.visual.video_grid_thw).shape[0] == n_pad
    assert n_pad == clip.visual_tokens()


def test_placeholder_mismatch_names_both_counts(model, processor):
    sample = processor.encode_conversation(_conv({"type": "image", "image": random_image(56, 84)}))
    ids = sample.input_ids.clone()
    ids[ids == model.config.image_token_id] = 100  # drop all placeholders, keep the pixels
    ids[-3] = model.config.image_token_id
    with pytest.raises(ValueError, match=r"placeholder tokens \(1\).*\(6"):
        model(input_ids=ids[None], pixel_values=sample.visual.pixel_values, image_grid_thw=sample.visual.image_grid_thw)


def test_generation_with_cache_equals_without(model, processor):
    convs = [
        _conv({"type": "image", "image": random_image(56, 84)}, text="What is shown?"),
        _conv({"type": "video", "video": random_clip()}, text="A longer question about what happens?"),
    ]
    batch = processor(convs)
    assert batch["attention_mask"][0, 0] == 0 or batch["attention_mask"][1, 0] == 0  # left padding present
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=151643, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kw)
        uncached = model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    # Batched, left-padded greedy decoding equals decoding each prompt alone.
    for b, conv in enumerate(convs):
        alone = processor([conv])
        with torch.no_grad():
            single = model.generate(**alone, use_cache=True, **kw)
        assert torch.equal(single[0, -8:], cached[b, -8:])


def test_packed_equals_unpacked(model, processor):
    samples = [
        processor.encode_conversation(_conv(text="Only text here.")),
        processor.encode_conversation(_conv({"type": "image", "image": random_image(56, 84)})),
        processor.encode_conversation(_conv({"type": "video", "video": random_clip()})),
    ]
    with torch.no_grad():
        alone = [_forward(model, s).logits[0] for s in samples]
        ids = torch.cat([s.input_ids for s in samples])[None]
        pos = torch.cat([s.position_ids for s in samples], dim=1)[:, None]
        lens = torch.tensor([0] + [len(s) for s in samples])
        cu = torch.cumsum(lens, 0).to(torch.int32)
        packed = model(
            input_ids=ids,
            position_ids=pos,
            cu_seqlens=cu,
            pixel_values=samples[1].visual.pixel_values,
            image_grid_thw=samples[1].visual.image_grid_thw,
            pixel_values_videos=samples[2].visual.pixel_values_videos,
            video_grid_thw=samples[2].visual.video_grid_thw,
        ).logits[0]
    for k, ref in enumerate(alone):
        torch.testing.assert_close(packed[cu[k] : cu[k + 1]], ref, atol=1e-4, rtol=1e-4)


def test_packed_loss_equals_sum_of_sample_losses(model, processor):
    convs = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}],
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": random_image(56, 56)}, {"type": "text", "text": "?"}],
            },
            {"role": "assistant", "content": "A noisy square."},
        ],
    ]
    samples = [processor.encode_conversation(c) for c in convs]
    sums, counts = [], []
    for s in samples:
        out = model(
            input_ids=s.input_ids[None],
            labels=s.labels[None],
            pixel_values=s.visual.pixel_values,
            image_grid_thw=s.visual.image_grid_thw,
            num_items_in_batch=1,
        )
        sums.append(out.loss)
        counts.append(out.num_label_tokens)
    ids = torch.cat([s.input_ids for s in samples])[None]
    labels = torch.cat([s.labels for s in samples])[None]
    pos = torch.cat([s.position_ids for s in samples], dim=1)[:, None]
    cu = torch.tensor([0, len(samples[0]), len(samples[0]) + len(samples[1])], dtype=torch.int32)
    out = model(
        input_ids=ids,
        labels=labels,
        position_ids=pos,
        cu_seqlens=cu,
        pixel_values=samples[1].visual.pixel_values,
        image_grid_thw=samples[1].visual.image_grid_thw,
        num_items_in_batch=1,
    )
    torch.testing.assert_close(out.loss, sum(sums), atol=1e-4, rtol=1e-5)
    assert int(out.num_label_tokens) == int(sum(counts))
    assert out.logits is None  # with labels, logits are not materialised by default


def test_loss_gradient_reaches_every_trainable_part(processor):
    model = KeyeVLForConditionalGeneration(micro_config()).train()
    conv = [
        {"role": "user", "content": [{"type": "image", "image": random_image(56, 56)}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "Squares."},
    ]
    s = processor.encode_conversation(conv)
    assert (s.labels != IGNORE_INDEX).sum() > 0
    out = model(
        input_ids=s.input_ids[None],
        labels=s.labels[None],
        pixel_values=s.visual.pixel_values,
        image_grid_thw=s.visual.image_grid_thw,
    )
    out.loss.backward()
    for part in (model.visual, model.mlp_AR, model.model.layers):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_text_only_batch_can_still_run_the_vision_tower():
    model = KeyeVLForConditionalGeneration(micro_config()).train()
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model(input_ids=ids, labels=ids, always_run_vision=True)
    out.loss.backward()
    grads = [p.grad for p in model.visual.parameters()]
    assert all(g is not None for g in grads)  # every ViT parameter took part (ZeRO-3 gathers stay in step)
    assert all(torch.count_nonzero(g) == 0 for g in grads)  # ... with zero contribution


def test_save_load_round_trip_is_exact(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    again = KeyeVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    sample = processor.encode_conversation(_conv({"type": "video", "video": random_clip()}))
    with torch.no_grad():
        torch.testing.assert_close(_forward(again, sample).logits, _forward(model, sample).logits, atol=0, rtol=0)


def test_auto_classes_load_the_checkpoint(model, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    import keye.auto  # noqa: F401

    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "KeyeVLConfig"
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tmp_path), KeyeVLForConditionalGeneration)


def test_generate_uses_multimodal_positions(model, processor):
    """Greedy generate's tokens equal a plain forward pass's argmax over prompt + generated tokens (with images)."""
    conv = _conv({"type": "image", "image": random_image(84, 112)}, {"type": "video", "video": random_clip()})
    batch = processor([conv])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=151643, eos_token_id=None)
        full = out[0]
        sample = processor.encode_conversation(conv, add_generation_prompt=True)
        ids = full[None]
        logits = model(
            input_ids=ids,
            pixel_values=sample.visual.pixel_values,
            image_grid_thw=sample.visual.image_grid_thw,
            pixel_values_videos=sample.visual.pixel_values_videos,
            video_grid_thw=sample.visual.video_grid_thw,
        ).logits[0]
    prompt_len = len(sample)
    assert logits[prompt_len - 1 : -1].argmax(-1).tolist() == full[prompt_len:].tolist()


def test_vision_tower_runs_exactly_once_per_forward(model, processor):
    """ZeRO-3 gathers stay in step only if every rank makes the same number of ViT calls per forward."""
    calls = []
    handle = model.visual.register_forward_hook(lambda *_: calls.append(1))
    try:
        both = processor.encode_conversation(
            _conv({"type": "image", "image": random_image(56, 56)}, {"type": "video", "video": random_clip()})
        )
        with torch.no_grad():
            _forward(model, both)
            assert len(calls) == 1
            model(input_ids=torch.tensor([[1, 2, 3]]), always_run_vision=True)
            assert len(calls) == 2
            model(input_ids=torch.tensor([[1, 2, 3]]))
            assert len(calls) == 2
    finally:
        handle.remove()
