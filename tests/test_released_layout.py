"""Checkpoints in the released Keye-VL 1.5 layout, both ways.

Written: ``config.json`` as vLLM reads it, remote code that transformers' Auto classes load with
``trust_remote_code=True`` without this project installed (and computing exactly what the project computes),
``preprocessor_config.json``, chat template and generation config. Read: our own checkpoints, those written by
earlier versions (nested ``text_config``), and a directory shaped like the released model's download.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.dynamic_module_utils import get_imports

from data_pipelines.image_reader import load_image
from keye.configuration import AUTO_MAP
from keye.modeling import PACKING_TABLE_KEY, KeyeVLForConditionalGeneration
from keye.processing import KeyeVLProcessor
from keye.remote_code import BUNDLE
from tests.released_helpers import export, perturbed_model, run_isolated
from tests.spine_fixtures import random_clip, random_image

ALLOWED_IMPORTS = {"torch", "transformers", "numpy", "PIL", "safetensors"}
STDLIB = set(sys.stdlib_module_names)  # what every Python has: only third-party imports need allowing


@pytest.fixture(scope="module")
def model() -> KeyeVLForConditionalGeneration:
    return perturbed_model()


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory) -> Path:
    return export(model, tmp_path_factory.mktemp("released") / "hf")


def _logits(model, sample) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=sample.input_ids[None], **sample.visual.as_kwargs()).logits[0]


def test_config_json_is_the_released_layout(ckpt, model):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["KeyeVL1_5ForConditionalGeneration"]
    assert "text_config" not in cfg and "mrope_section" not in cfg  # vLLM reads the text model at the top level
    assert cfg["hidden_size"] == model.config.text_config.hidden_size
    assert cfg["num_hidden_layers"] == model.config.text_config.num_hidden_layers
    assert cfg["rope_parameters"]["mrope_section"] == model.config.mrope_section
    assert cfg["vision_config"]["hidden_size"] == model.config.vision_config.hidden_size
    assert cfg["auto_map"] == AUTO_MAP
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    for ref in [*cfg["auto_map"].values(), *pre["auto_map"].values()]:
        assert (ckpt / (ref.split(".")[0] + ".py")).is_file(), ref
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]
    assert (ckpt / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (ckpt / "tokenizer_config.json").read_text()
    )
    weights = load_file(str(ckpt / "model.safetensors"))
    assert weights[PACKING_TABLE_KEY].shape == (32768, model.config.vision_config.hidden_size)


def test_remote_code_needs_only_torch_and_transformers(ckpt):
    for name in BUNDLE.values():
        imports = set(get_imports(str(ckpt / name)))
        assert imports <= ALLOWED_IMPORTS | STDLIB, f"{name} imports {sorted(imports - ALLOWED_IMPORTS - STDLIB)}"
        project_import = re.compile(r"^\s*(from|import)\s+(keye|data_pipelines|train|eval)\b", re.M)
        assert not project_import.search((ckpt / name).read_text()), name


def test_our_checkpoint_round_trips(ckpt, model):
    loaded = KeyeVLForConditionalGeneration.from_pretrained(str(ckpt)).eval()
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name

    def fields(cfg):
        return {k: v for k, v in cfg.to_dict().items() if k not in ("_name_or_path", "dtype")}

    assert fields(loaded.config.text_config) == fields(model.config.text_config)
    assert fields(loaded.config.vision_config) == fields(model.config.vision_config)
    assert loaded.config.mrope_section == model.config.mrope_section


def test_auto_classes_with_remote_code_compute_what_we_compute(ckpt, model, tmp_path):
    """transformers alone (the project's packages blocked) loads model and processor from the checkpoint's own
    files; prompt ids, pixels and logits equal the project's for an image + a Slow-Fast video conversation."""
    processor = KeyeVLProcessor.from_pretrained(ckpt)
    image = random_image(1100, 1500, seed=3)  # above the processor's own pixel cap: both resize stages act
    clip = random_clip(n=4, types=(0, 1, 1, 0), slow_hw=(56, 84), fast_hw=(28, 56))
    clip.timestamps = [0.0, 0.5, 4.05, 8.1]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "video", "video": clip},
                {"type": "text", "text": "What happens?"},
            ],
        }
    ]
    ours = processor.encode_conversation(messages, add_generation_prompt=True)
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    stage1 = load_image(image)  # keye-vl-utils' fetch_image: what a user hands the released processor
    torch.save(
        {
            "prompt": prompt,
            "image": stage1,
            "video": clip.frames,
            "kwargs": dict(
                height=[clip.slow_hw[0]],
                width=[clip.slow_hw[1]],
                fast_height=[clip.fast_hw[0]],
                fast_width=[clip.fast_hw[1]],
                timestamps=[torch.tensor(clip.timestamps, dtype=torch.float32)],
                frame_types=[torch.tensor(clip.frame_types)],
            ),
        },
        tmp_path / "inputs.pt",
    )
    run_isolated(
        f"""
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
ckpt = {str(ckpt)!r}
inputs = torch.load("inputs.pt", weights_only=False)
processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(ckpt, trust_remote_code=True).eval()
batch = processor(text=inputs["prompt"], images=[inputs["image"]], videos=[inputs["video"]], return_tensors="pt",
                  **inputs["kwargs"])
with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                   image_grid_thw=batch["image_grid_thw"], pixel_values_videos=batch["pixel_values_videos"],
                   video_grid_thw=batch["video_grid_thw"]).logits[0]
model.save_pretrained("resaved")  # saved again from the checkpoint's own copy of the code
processor.save_pretrained("resaved")
again = AutoModelForImageTextToText.from_pretrained("resaved", trust_remote_code=True).eval()
with torch.no_grad():
    logits_again = again(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                         image_grid_thw=batch["image_grid_thw"], pixel_values_videos=batch["pixel_values_videos"],
                         video_grid_thw=batch["video_grid_thw"]).logits[0]
torch.save({{"batch": dict(batch), "logits": logits, "logits_again": logits_again,
            "model_class": type(model).__module__}}, "outputs.pt")
""",
        tmp_path,
    )
    out = torch.load(tmp_path / "outputs.pt", weights_only=False)
    assert out["model_class"].startswith("transformers_modules.")  # the checkpoint's copy, not the project
    batch = out["batch"]
    assert batch["input_ids"][0].tolist() == ours.input_ids.tolist()
    assert torch.equal(batch["pixel_values"].flatten(1), ours.visual.pixel_values)
    assert torch.equal(batch["image_grid_thw"], ours.visual.image_grid_thw)
    assert torch.equal(batch["pixel_values_videos"].flatten(1), ours.visual.pixel_values_videos)
    assert torch.equal(batch["video_grid_thw"], ours.visual.video_grid_thw)
    assert torch.equal(batch["num_frames"], torch.tensor([4]))
    torch.testing.assert_close(out["logits"], _logits(model, ours), rtol=0, atol=1e-5)
    assert torch.equal(out["logits_again"], out["logits"])
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_checkpoint_of_an_earlier_version_loads(model, tmp_path):
    """Nested ``text_config``, top-level ``mrope_section``, no packing table: what earlier versions wrote."""
    old = tmp_path / "old"
    old.mkdir()
    cfg = model.config.to_dict()
    text = {k: cfg.pop(k) for k in list(cfg) if k in model.config.text_config.to_dict() and k != "tie_word_embeddings"}
    text["rope_parameters"] = {k: v for k, v in text["rope_parameters"].items() if k != "mrope_section"}
    cfg.update(
        text_config=text, mrope_section=model.config.mrope_section, architectures=["KeyeVLForConditionalGeneration"]
    )
    cfg.pop("auto_map")
    (old / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old / "model.safetensors"))
    loaded = KeyeVLForConditionalGeneration.from_pretrained(str(old)).eval()
    assert loaded.config.mrope_section == model.config.mrope_section
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def _released_download(ckpt: Path, released: Path) -> Path:
    """``ckpt`` rewritten into the shape of the released model's download (see the test below)."""
    shutil.copytree(ckpt, released, ignore=shutil.ignore_patterns("*.py", "model.safetensors", "config.json", "keye_*"))
    cfg = json.loads((ckpt / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(
        model_type="KeyeVL1_5",
        rope_theta=rope["rope_theta"],
        rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
        auto_map={
            "AutoConfig": "configuration_keye_vl_1_5.KeyeVL1_5Config",
            "AutoModel": "modeling_keye_vl_1_5.KeyeVL1_5ForConditionalGeneration",
        },
    )
    cfg["vision_config"]["model_type"] = "KeyeVL1_5_vision"
    (released / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(ckpt / "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(released / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (released / "model.safetensors.index.json").write_text(json.dumps(index))
    pre = json.loads((released / "preprocessor_config.json").read_text())
    pre["size"] = {"min_pixels": pre["min_pixels"], "max_pixels": pre["max_pixels"]}
    (released / "preprocessor_config.json").write_text(json.dumps(pre))
    return released


def test_a_download_shaped_like_the_released_model_loads(ckpt, model, tmp_path):
    """The released model's directory: its own remote-code names, a model_type we do not register, the legacy
    ``rope_theta`` + ``rope_scaling: {type: mrope}`` form, sharded safetensors with an index, the unused packing
    table, and a preprocessor_config.json with transformers' extra keys. Fine-tuning starts from it
    (``model.path=DIR``), so model and processor must load and compute what the same weights compute here."""
    released = _released_download(ckpt, tmp_path / "Keye-VL-1_5-8B")
    rope = model.config.text_config.rope_parameters
    loaded = KeyeVLForConditionalGeneration.from_pretrained(str(released)).eval()
    assert loaded.config.mrope_section == model.config.mrope_section
    assert loaded.config.text_config.rope_parameters["rope_theta"] == rope["rope_theta"]
    processor = KeyeVLProcessor.from_pretrained(released)
    sample = processor.encode_conversation(
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": random_image(70, 90)}, {"type": "text", "text": "hi"}],
            }
        ],
        add_generation_prompt=True,
    )
    torch.testing.assert_close(_logits(loaded, sample), _logits(model, sample), rtol=0, atol=0)


@pytest.mark.slow
def test_training_starts_from_the_released_download_and_exports_our_layout(ckpt, tmp_path):
    """``model.path=`` a released-shaped directory trains, and the export is in the layout vLLM reads."""
    from tests import train_helpers as th

    released = _released_download(ckpt, tmp_path / "Keye-VL-1_5-8B")
    media = tmp_path / "media"
    media.mkdir()
    shards = th.write_shard_set(tmp_path, "ft", th.make_records(media, 2, 0, 4), media)
    cfg = th.run_config(tmp_path / "run", tmp_path / "unused.yaml", [str(shards)], max_steps=2)
    cfg["model"] = {"path": str(released)}
    cfg["checkpoint"].update(export_hf=True)
    th.run(th.write_config(tmp_path / "ft.yaml", cfg), timeout=300)
    export = next(p.parent for p in (tmp_path / "run").rglob("config.json") if p.parent.name == "hf")
    assert json.loads((export / "config.json").read_text())["architectures"] == ["KeyeVL1_5ForConditionalGeneration"]
    assert (export / "modeling_keye_vl_1_5.py").is_file() and (export / "preprocessor_config.json").is_file()
    KeyeVLForConditionalGeneration.from_pretrained(str(export))
