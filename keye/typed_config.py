"""Typed configs: a dataclass is the schema, YAML files fill it, ``key.sub=value`` overrides it.

One loader for every run (model, training stage, SFT, RL, eval), built on OmegaConf's structured configs, so
that an unknown key or a wrong type is always reported the same way: naming the key and the file it came from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown, mistyped, or a file cannot be read; the message names the key and the source."""


def yaml_layers(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """The files a YAML config is made of, base-most first: ``(path, its own mapping without _base_)`` each.

    ``_base_: other.yaml`` (relative to the file) names the file underneath; the run's own file comes last. Used
    where it matters which file set a key (``train.config.apply_rate_rule``); :func:`read_yaml` merges them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("_base_", None)
    return [*(yaml_layers(path.parent / base) if base else []), (str(path), data)]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; ``_base_: other.yaml`` (relative to the file) is merged underneath."""
    layers = yaml_layers(path)
    if len(layers) == 1:
        return layers[0][1]
    merged = OmegaConf.merge(*(OmegaConf.create(data) for _, data in layers))
    return OmegaConf.to_container(merged)


def config_layers(path: str | Path | None, overrides: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """What a run config is merged from, in order: its files (base-most first), then the command-line overrides
    (source ``command line``) as one nested mapping."""
    layers = yaml_layers(path) if path else []
    if overrides:
        dotlist = [o for o in overrides if "=" in o]
        layers.append(("command line", OmegaConf.to_container(OmegaConf.from_dotlist(dotlist))))
    return layers


def _structured(cls: type[T], layers: list[tuple[str, Any]]) -> T:
    cfg = OmegaConf.structured(cls)
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"{source}: bad config key '{key}': {reason}") from None
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"{cls.__name__}: key '{key}': {str(exc).splitlines()[0]}") from None
    except ValueError as exc:  # a config dataclass's own check (``__post_init__``), which names the key
        sources = " + ".join(source for source, _ in layers) or cls.__name__
        raise ConfigError(f"{sources}: {exc}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from an optional YAML file plus ``key.sub=value`` overrides; errors name key and source."""
    layers: list[tuple[str, Any]] = []
    if path:
        layers.append((str(path), read_yaml(path)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override '{bad[0]}' is not of the form key=value")
        layers.append(("command-line override", OmegaConf.from_dotlist(list(overrides))))
    return _structured(cls, layers)


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>") -> T:
    """Build ``cls`` from an in-memory mapping with the same checks as :func:`load_config`."""
    return _structured(cls, [(source, data)])


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain mapping of a config dataclass (tuples become lists), fit for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config next to a checkpoint so that the run can be reproduced."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
