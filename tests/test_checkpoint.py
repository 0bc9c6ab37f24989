"""Checkpoint I/O: released Keye-VL 1.5 key names, building from local Qwen3 + SigLIP checkpoints, keye init."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from keye.checkpoint import PACKING_TABLE_KEY, load_released_state_dict, read_state_dict
from keye.modeling import KeyeVLForConditionalGeneration
from tests.spine_fixtures import micro_config


def released_state_dict(model) -> dict[str, torch.Tensor]:
    """A state dict in the released layout, including the keys the released files carry but 1.5 ignores."""
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    d = model.config.vision_config.hidden_size
    state["visual.vision_model.head.probe"] = torch.randn(1, 1, d)
    state["visual.vision_model.head.attention.in_proj_weight"] = torch.randn(3 * d, d)
    state["visual.vision_model.embeddings.packing_position_embedding.weight"] = torch.randn(32768, d)
    return state


def test_released_key_names_load_with_nothing_missing_or_unexpected():
    model = KeyeVLForConditionalGeneration(micro_config())
    names = set(model.state_dict())
    assert any(k.startswith("visual.vision_model.encoder.layers.0.self_attn.q_proj") for k in names)
    assert {"mlp_AR.pre_norm.weight", "mlp_AR.linear_1.weight", "mlp_AR.linear_2.weight", "lm_head.weight"} <= names
    assert any(k.startswith("model.layers.0.self_attn.q_norm") for k in names)
    state = released_state_dict(model)
    dropped = load_released_state_dict(model, state)
    assert sorted(dropped) == sorted(k for k in state if ".head." in k or "packing_position" in k)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_released_state_dict_with_a_wrong_key_is_rejected():
    model = KeyeVLForConditionalGeneration(micro_config())
    state = released_state_dict(model)
    state["mlp_AR.linear_3.weight"] = state.pop("mlp_AR.linear_2.weight")
    with pytest.raises(
        ValueError, match=r"missing \['mlp_AR.linear_2.weight'\].*unexpected \['mlp_AR.linear_3.weight'\]"
    ):
        load_released_state_dict(model, state)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    qwen = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=151936,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=False,
        )
    )
    siglip = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        )
    )
    qwen.save_pretrained(root / "qwen3")
    siglip.save_pretrained(root / "siglip")
    return root, qwen, siglip


def test_from_components_copies_llm_and_vit_weights(components):
    root, qwen, siglip = components
    model = KeyeVLForConditionalGeneration.from_components(str(root / "qwen3"), str(root / "siglip"))
    state = model.state_dict()
    for k, v in qwen.state_dict().items():
        assert torch.equal(state[k], v), k
    for k, v in siglip.state_dict().items():
        if "position_ids" in k or k.startswith("head.") or ".head." in k:
            continue
        name = k if k.startswith("vision_model.") else f"vision_model.{k}"
        assert torch.equal(state[f"visual.{name}"], v), k
    assert model.config.vision_config.image_size == 56
    # At the checkpoint's native 4x4 grid our patch + position embedding equals SigLIP's.
    pixels = torch.randn(1, 3, 56, 56)
    ours_in = pixels.reshape(1, 3, 4, 14, 4, 14).permute(0, 2, 4, 1, 3, 5).reshape(16, 3 * 14 * 14)
    ours = model.visual.vision_model.embeddings(ours_in, torch.tensor([[1, 4, 4]]))
    theirs = siglip.get_submodule("vision_model.embeddings" if hasattr(siglip, "vision_model") else "embeddings")(
        pixels
    )[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_keye_init_from_config_and_from_components(components, tmp_path):
    from keye.cli.init import init_checkpoint
    from keye.processing import KeyeVLProcessor

    root, _, _ = components
    summary = init_checkpoint(tmp_path / "built", llm=str(root / "qwen3"), vit=str(root / "siglip"))
    assert summary["projector"] > 0
    loaded = KeyeVLForConditionalGeneration.from_pretrained(tmp_path / "built")
    # the released layout's unused packing table is written (vLLM expects it) and dropped on load
    assert set(read_state_dict(tmp_path / "built")) == set(loaded.state_dict()) | {PACKING_TABLE_KEY}
    assert KeyeVLProcessor.from_pretrained(tmp_path / "built").tokenizer.convert_tokens_to_ids("<|frame|>") == 151675
    with pytest.raises(ValueError, match="either --config"):
        init_checkpoint(tmp_path / "x")
