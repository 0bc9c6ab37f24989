"""ZeRO-3 partitioned loading: the model is built inside ``zero.Init`` and filled module by module; gathered, the
weights equal the checkpoint exactly, and a checkpoint that does not fit names the offending tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import train_helpers as th


def _cfg(path: Path):
    from train.config import TrainConfig

    cfg = TrainConfig()
    cfg.model.path = str(path)
    cfg.distributed.deepspeed_config = str(th.REPO / "configs/deepspeed/zero3.json")
    return cfg


def _ds(cfg) -> dict:
    from train.engine import deepspeed_config

    ds = deepspeed_config(cfg, world=1, precision="fp32")
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the smallest tensors
    return ds


@pytest.mark.parametrize("tied", [False, True])
def test_partitioned_load_equals_checkpoint(tmp_path, fresh_process_group, tied):
    import deepspeed
    from safetensors.torch import load_file

    from keye.cli.init import init_checkpoint
    from train.engine import init_distributed, load_model

    nano = dict(th.NANO_MODEL, tie_word_embeddings=tied)
    (tmp_path / "nano.yaml").write_text(th.yaml.safe_dump(nano))
    init_checkpoint(tmp_path / "ckpt", config=str(tmp_path / "nano.yaml"), seed=3)
    init_distributed("gloo")
    cfg = _cfg(tmp_path / "ckpt")
    model, _ = load_model(cfg, _ds(cfg), "fp32")
    params = dict(model.named_parameters())
    assert all(hasattr(p, "ds_id") for p in params.values())  # built partitioned, not partitioned afterwards
    (file,) = (tmp_path / "ckpt").glob("*.safetensors")
    saved = load_file(str(file))
    assert ("lm_head.weight" in params) == (not tied)
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param]):
            assert torch.equal(param.data, saved[name]), name


def test_partitioned_load_names_a_bad_tensor(tmp_path, fresh_process_group):
    from safetensors.torch import load_file, save_file

    from keye.cli.init import init_checkpoint
    from train.engine import init_distributed, load_model

    init_checkpoint(tmp_path / "ckpt", config=str(th.write_nano_model(tmp_path / "nano.yaml")), seed=0)
    (file,) = (tmp_path / "ckpt").glob("*.safetensors")
    state = load_file(str(file))
    state["model.norm.weight"] = torch.ones(7)
    del state["mlp_AR.linear_2.bias"]
    save_file(state, str(file), metadata={"format": "pt"})
    init_distributed("gloo")
    with pytest.raises(ValueError, match=r"mlp_AR\.linear_2\.bias"):
        cfg = _cfg(tmp_path / "ckpt")
        load_model(cfg, _ds(cfg), "fp32")
