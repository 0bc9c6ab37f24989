"""Weight-average HF-format Keye checkpoints (Keye-VL 1.5's "homologous-heterogeneous merging").

After 128K annealing the report averages several annealed models trained on different data mixes (and SFT experts
fine-tuned from one base): same architecture, different data. ``merge_checkpoints`` computes
``Σ_i w_i · θ_i`` per tensor (weights normalised to sum to 1) in float64 and casts back to the first checkpoint's
dtype. It streams one output shard at a time through ``safetensors.safe_open``, so merging 8B checkpoints needs
memory for one shard, not for every model. The config, processor and tokenizer files are copied from the first
checkpoint; ``merge_info.json`` records the sources and weights.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from keye.checkpoint import PACKING_TABLE_KEY, PACKING_TABLE_ROWS

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# config.json keys that do not describe the architecture (provenance, storage dtype).
VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}
DEFAULT_SHARD_BYTES = 5 * 2**30


def _vision_width(directory: Path) -> int:
    return int(json.loads((directory / "config.json").read_text())["vision_config"]["hidden_size"])


class MergeError(ValueError):
    """Checkpoints that cannot be averaged (different architecture, keys or shapes) or bad weights."""


@dataclass
class MergeReport:
    out: str
    sources: list[str]
    weights: list[float]
    tensors: int
    parameters: int
    shards: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Uniform when ``weights`` is None; otherwise non-negative, one per checkpoint, scaled to sum to 1."""
    if n < 2:
        raise MergeError(f"merging needs at least 2 checkpoints, got {n}")
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise MergeError(f"got {len(weights)} weights for {n} checkpoints")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(f"weights must be non-negative with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif k not in VOLATILE_CONFIG_KEYS:
            out[f"{prefix}{k}"] = v
    return out


def check_same_architecture(dirs: Sequence[Path]) -> None:
    """Raise naming the config keys where any checkpoint's ``config.json`` differs from the first's."""
    configs = []
    for d in dirs:
        path = d / "config.json"
        if not path.is_file():
            raise MergeError(f"{d} has no config.json (not an HF-format checkpoint)")
        configs.append(_flatten(json.loads(path.read_text())))
    for d, cfg in zip(dirs[1:], configs[1:]):
        diff = sorted(k for k in set(cfg) | set(configs[0]) if cfg.get(k, "<absent>") != configs[0].get(k, "<absent>"))
        if diff:
            shown = ", ".join(f"{k}: {configs[0].get(k, '<absent>')!r} vs {cfg.get(k, '<absent>')!r}" for k in diff[:5])
            raise MergeError(f"{d} has a different architecture from {dirs[0]}: {shown}")


class _Tensors:
    """Lazy access to one checkpoint's tensors (single or sharded safetensors)."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").is_file():
            with safe_open(str(directory / "model.safetensors"), "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise MergeError(f"{directory} has no model.safetensors or model.safetensors.index.json")
        self.directory = directory
        self.files = {name: safe_open(str(directory / name), "pt") for name in sorted(set(weight_map.values()))}
        self.weight_map = weight_map

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        sl = self.files[self.weight_map[key]].get_slice(key)
        return tuple(sl.get_shape()), sl.get_dtype()

    def get(self, key: str) -> torch.Tensor:
        return self.files[self.weight_map[key]].get_tensor(key)


def _check_keys_and_shapes(sources: list[_Tensors]) -> list[str]:
    first = sources[0]
    keys = list(first.weight_map)
    for src in sources[1:]:
        missing = sorted(set(keys) - set(src.weight_map))
        extra = sorted(set(src.weight_map) - set(keys))
        if missing or extra:
            raise MergeError(
                f"{src.directory} does not have the tensors of {first.directory}: "
                f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{'…' if len(extra) > 5 else ''}"
            )
        for key in keys:
            a, b = first.shape_dtype(key)[0], src.shape_dtype(key)[0]
            if a != b:
                raise MergeError(
                    f"tensor '{key}' has shape {list(a)} in {first.directory} but {list(b)} in {src.directory}"
                )
    return keys


def average_tensors(tensors: Sequence[torch.Tensor], weights: Sequence[float], key: str = "") -> torch.Tensor:
    """``Σ w_i t_i`` in float64, cast to the first tensor's dtype; integer/bool tensors must agree and are kept."""
    first = tensors[0]
    if not first.is_floating_point():
        if any(not torch.equal(t, first) for t in tensors[1:]):
            raise MergeError(f"non-float tensor '{key}' differs between checkpoints and cannot be averaged")
        return first
    acc = torch.zeros(first.shape, dtype=torch.float64)
    for t, w in zip(tensors, weights):
        acc.add_(t.to(torch.float64), alpha=w)
    return acc.to(first.dtype)


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _plan_shards(keys: list[str], source: _Tensors, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key in keys:
        shape, dtype = source.shape_dtype(key)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=_DTYPES[dtype]).element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _copy_side_files(src: Path, out: Path) -> None:
    """Processor, tokenizer and other files from ``src``; config.json and remote code in the released layout
    (rewritten from ``src``'s config, so merging checkpoints of an earlier version gives a current one)."""
    from keye.configuration import KeyeVLConfig
    from keye.remote_code import write_remote_code

    for path in src.iterdir():
        skip = path.name in (*WEIGHT_FILES, "merge_info.json", "pytorch_model.bin.index.json")
        if skip or path.name.endswith((".safetensors", ".bin")):
            continue
        target = out / path.name
        if path.is_dir():
            shutil.copytree(path, target, dirs_exist_ok=True)
        else:
            shutil.copy2(path, target)
    KeyeVLConfig.from_pretrained(str(src)).save_pretrained(str(out))
    write_remote_code(out)


def merge_checkpoints(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    weights: Sequence[float] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> MergeReport:
    """Write the weighted average of ``checkpoints`` to ``out`` (an HF-format checkpoint directory)."""
    dirs = [Path(c) for c in checkpoints]
    w = normalise_weights(weights, len(dirs))
    for d in dirs:
        if not d.is_dir():
            raise MergeError(f"checkpoint directory {d} does not exist")
    out = Path(out)
    if out.resolve() in {d.resolve() for d in dirs}:
        raise MergeError(f"output {out} is one of the inputs")
    check_same_architecture(dirs)
    sources = [_Tensors(d) for d in dirs]
    keys = _check_keys_and_shapes(sources)
    shards = _plan_shards(keys, sources[0], max_shard_bytes)

    if out.exists() and any(out.iterdir()):
        raise MergeError(f"output directory {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    _copy_side_files(dirs[0], out)
    weight_map: dict[str, str] = {}
    n_params = n_bytes = 0
    for i, shard_keys in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        merged = {}
        if i == len(shards) - 1 and PACKING_TABLE_KEY not in keys:  # earlier versions' checkpoints lack it
            like = sources[0].get(keys[0])
            merged[PACKING_TABLE_KEY] = torch.zeros(PACKING_TABLE_ROWS, _vision_width(dirs[0]), dtype=like.dtype)
            weight_map[PACKING_TABLE_KEY] = name
        for key in shard_keys:
            merged[key] = average_tensors([s.get(key) for s in sources], w, key).contiguous()
            n_params += merged[key].numel()
            n_bytes += merged[key].numel() * merged[key].element_size()
            weight_map[key] = name
        save_file(merged, str(out / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": n_bytes}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    report = MergeReport(str(out), [str(d) for d in dirs], w, len(keys), n_params, len(shards))
    (out / "merge_info.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report
