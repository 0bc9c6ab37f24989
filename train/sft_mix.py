"""SFT data mixes by reasoning mode, and the filter that keeps a sample only if its response fits its mode.

Keye-VL's LongCoT cold start trains all modes jointly - that is what teaches ``/think``, ``/no_think`` and automatic
selection (KEYE_FACTS A §5: ~330K non-reasoning, 230K reasoning, 20K auto-think, 100K think-with-image, ~24K
thinking + 80K non-thinking video).  A mix YAML lists sources, each with shard paths, a weight and one of the
:data:`SFT_MODES`; :func:`load_mix` validates it and :meth:`SFTMix.data_sources` gives the trainer's
``data.sources`` entries.  A sample whose response breaks its mode's grammar (a "thinking" sample without
``<think>``, a non-thinking one with it, a think-with-image one without a code round) would teach the wrong
format, so :func:`filter_by_mode` names the problem (the rules live in :mod:`keye.sft_modes`, shared with
``keye check-data``) and :class:`ModeFilter` counts the drops per reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keye.sft_modes import SFT_MODES, fit_modes
from keye.typed_config import ConfigError, load_config

__all__ = ["SFT_MODES", "MixSource", "ModeFilter", "SFTMix", "filter_by_mode", "load_mix"]


@dataclass
class MixSource:
    """One source of the mix: shards (globs/dirs/manifests, as the trainer reads them), weight and SFT mode."""

    name: str = ""
    mode: str = "non_thinking"
    weight: float = 1.0
    shards: list[str] = field(default_factory=list)


@dataclass
class SFTMix:
    """Schema of ``configs/sft/*.yaml``."""

    sources: list[MixSource] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("mix.sources: expected at least one source")
        names = [s.name for s in self.sources]
        for i, s in enumerate(self.sources):
            if not s.name:
                raise ValueError(f"mix.sources[{i}].name: expected a non-empty name")
            if names.count(s.name) > 1:
                raise ValueError(f"mix.sources[{i}].name: {s.name!r} is used twice")
            if s.mode not in SFT_MODES:
                raise ValueError(f"mix.sources[{i}].mode: expected one of {sorted(SFT_MODES)}, got {s.mode!r}")
            if not s.weight > 0:
                raise ValueError(f"mix.sources[{i}].weight: expected > 0, got {s.weight}")

    def proportions(self) -> dict[str, float]:
        """Each source's share of the samples (weights normalised to 1)."""
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}

    def mode_proportions(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for s, p in zip(self.sources, self.proportions().values()):
            out[s.mode] = out.get(s.mode, 0.0) + p
        return out

    def data_sources(self) -> list[dict[str, Any]]:
        """``data.sources`` entries for the trainer (``name``, ``shards``, ``weight``)."""
        return [{"name": s.name, "shards": list(s.shards), "weight": s.weight} for s in self.sources]

    def source(self, name: str) -> MixSource:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"mix has no source {name!r} (sources: {[s.name for s in self.sources]})")


def load_mix(path: str | Path, overrides: list[str] | None = None) -> SFTMix:
    """Read and validate a mix YAML; errors name the key and the file."""
    try:
        return load_config(SFTMix, path, overrides)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# ------------------------------------------------------------------------------------------------- the filter
def filter_by_mode(record: Mapping[str, Any], sft_mode: str | None = None) -> str | None:
    """``None`` when the record's response fits its SFT mode, else ``"<mode>: <reason>"`` (a counting key).

    ``sft_mode`` is the source's mode from the mix; without it the record's ``source`` field is used when it
    names an SFT mode. The rules are :func:`keye.sft_modes.fit_modes`' (the ones ``keye check-data`` reports).
    """
    sft_mode = sft_mode or None
    if sft_mode is not None and sft_mode not in SFT_MODES:
        return f"unknown: SFT mode {sft_mode!r} is not one of {sorted(SFT_MODES)}"
    return fit_modes(record, sft_mode).problem


class ModeFilter:
    """Callable keep/drop predicate for the data path, with a count of kept samples and of drops per reason."""

    def __init__(self, mix: SFTMix | None = None) -> None:
        self.modes = {s.name: s.mode for s in mix.sources} if mix else {}
        self.counts: Counter = Counter()

    def __call__(self, record: Mapping[str, Any], source: str | None = None) -> bool:
        reason = filter_by_mode(record, self.modes.get(source) if source else None)
        self.counts["kept" if reason is None else f"dropped/{reason}"] += 1
        return reason is None

    @property
    def dropped(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith("dropped/"))
