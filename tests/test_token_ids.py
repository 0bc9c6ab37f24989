"""Token ids are the checkpoint's: a config with other ids encodes, packs, shards and runs like the defaults, id for
id, and a packer or model given ids that differ from the samples' says so."""

from __future__ import annotations

import pytest
import torch

from data_pipelines.encoded import EncodedSample, TokenIds
from data_pipelines.packing import Packer
from keye.modeling import KeyeVLForConditionalGeneration
from keye.processing import KeyeVLProcessor
from keye.sequence_parallel import shard_packed_batch
from tests.spine_fixtures import micro_config, random_clip, random_image

# each layout token moved to another id of the vocabulary (Qwen's <tool_call>, <|fim_*|>, … tokens, unused here)
REMAP = {
    "image_token_id": 151659,
    "video_token_id": 151660,
    "vision_start_token_id": 151661,
    "vision_end_token_id": 151662,
    "frame_token_id": 151663,
    "fast_start_token_id": 151664,
    "fast_end_token_id": 151657,
}


@pytest.fixture(scope="module")
def processors() -> tuple[KeyeVLProcessor, KeyeVLProcessor]:
    default = KeyeVLProcessor(model_config=micro_config())
    return default, KeyeVLProcessor(default.tokenizer, model_config=micro_config(**REMAP))


def id_map(default: TokenIds, other: TokenIds) -> torch.Tensor:
    """A vocabulary permutation swapping each default id with its remapped one."""
    perm = torch.arange(151936)
    for name in REMAP:
        a, b = getattr(default, name.removesuffix("_token_id")), getattr(other, name.removesuffix("_token_id"))
        perm[a], perm[b] = b, a
    return perm


def conversations() -> list[list[dict]]:
    def conv(item: dict | None, question: str, answer: str) -> list[dict]:
        content = [item, {"type": "text", "text": question}] if item else question
        return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]

    return [
        conv(None, "Hi there", "Hello there there there"),
        conv({"type": "video", "video": random_clip()}, "Describe the clip.", "Random frames, four of them."),
        conv({"type": "image", "image": random_image(56, 84)}, "What is it?", "Noise."),
    ]


def rows(processor: KeyeVLProcessor, samples: list[EncodedSample]) -> list:
    return list(Packer(samples, max_seq_len=512, token_ids=processor.token_ids, pad_to_multiple_of=8))


def test_other_ids_encode_pack_and_shard_like_the_defaults(processors):
    default, remapped = processors
    assert remapped.token_ids == TokenIds.from_config(micro_config(**REMAP), pad=151643) != default.token_ids
    perm = id_map(default.token_ids, remapped.token_ids)
    ours = [remapped.encode_conversation(c) for c in conversations()]
    theirs = [default.encode_conversation(c) for c in conversations()]
    for a, b in zip(ours, theirs, strict=True):
        assert a.token_ids == remapped.token_ids
        assert torch.equal(a.input_ids, perm[b.input_ids])  # the same layout, id for id
        assert torch.equal(a.labels, b.labels) and torch.equal(a.position_ids, b.position_ids)
        assert a.num_visual_tokens == b.num_visual_tokens
        for x, y in zip(a.visual.as_kwargs().values(), b.visual.as_kwargs().values(), strict=True):
            assert (x is None and y is None) or torch.equal(x, y)
    assert ours[1].num_visual_tokens > 0 and int((ours[1].input_ids == REMAP["fast_start_token_id"]).sum()) == 2

    [row], [ref] = rows(remapped, ours), rows(default, theirs)
    assert torch.equal(row.input_ids, perm[ref.input_ids]) and int(row.cu_seqlens[-1]) > int(row.cu_seqlens[-2])
    assert torch.equal(row.cu_seqlens, ref.cu_seqlens) and torch.equal(row.position_ids, ref.position_ids)
    for r in range(2):
        got, want = shard_packed_batch(row, r, 2), shard_packed_batch(ref, r, 2)
        assert torch.equal(got.input_ids, perm[want.input_ids]) and torch.equal(got.shift_labels, want.shift_labels)
        assert (got.image_token_offset, got.video_token_offset) == (want.image_token_offset, want.video_token_offset)
    assert shard_packed_batch(row, 1, 2).video_token_offset > 0  # the cut falls among the video's tokens

    # the model finds the placeholders by its config's ids: with the vocabulary rows permuted to match, the remapped
    # model on the remapped row computes what the default model computes on the default row
    torch.manual_seed(0)
    model = KeyeVLForConditionalGeneration(micro_config()).eval()
    other = KeyeVLForConditionalGeneration(micro_config(**REMAP)).eval()
    state = model.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][perm]
    other.load_state_dict(state)
    with torch.no_grad():
        want = model(**ref.model_inputs())
        torch.testing.assert_close(other(**row.model_inputs()).loss, want.loss, rtol=1e-6, atol=1e-6)
        got = other(**shard_packed_batch(row, 0, 1).model_inputs(None))
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="the model's config has 151655/151656"):
            model(**shard_packed_batch(row, 0, 1).model_inputs(None))
        with pytest.raises(ValueError, match="placeholder tokens"):
            model(**row.model_inputs())


def test_the_packer_refuses_samples_encoded_with_other_ids(processors):
    default, remapped = processors
    samples = [remapped.encode_conversation(c) for c in conversations()[:1]]
    with pytest.raises(ValueError, match=r"encoded with token ids TokenIds\(image=151659.*packer was built with"):
        rows(default, samples)


def test_from_pretrained_takes_the_checkpoints_ids(processors, tmp_path):
    default, _ = processors
    default.save_pretrained(tmp_path)
    assert KeyeVLProcessor.from_pretrained(tmp_path).token_ids == default.token_ids  # no config.json: the defaults
    micro_config(**REMAP).save_pretrained(tmp_path)
    assert KeyeVLProcessor.from_pretrained(tmp_path).token_ids.image == REMAP["image_token_id"]
