"""The five SFT modes of Keye-VL 1.5's LongCoT cold start, and which of them a sample record fits.

An SFT mode names the kind of data a sample teaches; each maps to a reasoning grammar of :mod:`keye.reasoning`
(``video`` uses the record's own ``think``/``no_think``/auto mode) plus a few rules of its own. :func:`fit_modes`
is the one place that applies them: ``keye check-data`` and ``keye shards`` report with it, and the trainer's mode
check (``train.sft_mix.filter_by_mode``, ``data.check_modes``) keeps or drops records with it.

The last assistant turn must be, per mode:

- ``thinking``: ``<think>…</think><answer>…</answer>`` (one of each, nothing around them);
- ``non_thinking``: plain text, no ``<think>``/``<answer>`` tags;
- ``auto_think``: ``<analysis>…</analysis>`` first, then a plain answer or ``<think>…</think><answer>…</answer>``;
- ``think_with_image``: as ``thinking``, with at least one ``<code>…</code><sandbox_output>…</sandbox_output>``
  round inside ``<think>``;
- ``video``: the grammar of the record's own mode (``mode`` field, else a ``/think``/``/no_think`` suffix, else
  auto), and a video in a user turn.

A record's ``mode`` (or its last user turn's suffix), when set, must agree with the mode's grammar.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from keye.reasoning import mode_of, normalize_mode, response_fits_mode

# SFT mode -> reasoning grammar (None: the record's own think/no_think/auto decides, as for video)
SFT_MODES: dict[str, str | None] = {
    "thinking": "think",
    "non_thinking": "no_think",
    "auto_think": "auto",
    "think_with_image": "think",
    "video": None,
}
# When a record's source names no SFT mode, the mode it is counted under is the most specific one it fits.
MOST_SPECIFIC_FIRST = ("think_with_image", "video", "auto_think", "thinking", "non_thinking")
NO_SFT_SOURCE = "unknown: no SFT mode (pass the source's mode or set 'source' to one of the SFT modes)"


def _text_of(content: Any) -> str:
    """An assistant turn as text; images (Thyme sandbox outputs) become ``<image>``."""
    if isinstance(content, str):
        return content
    parts = []
    for item in content or []:
        if item.get("type") == "text":
            parts.append(str(item.get("text", "")))
        else:
            parts.append(f"<{item.get('type')}>")
    return "".join(parts)


def _last(record: Mapping[str, Any], role: str) -> Mapping[str, Any] | None:
    for msg in reversed(record.get("messages") or []):
        if msg.get("role") == role:
            return msg
    return None


def _has_item(record: Mapping[str, Any], kind: str) -> bool:
    for msg in record.get("messages") or []:
        content = msg.get("content")
        if msg.get("role") == "user" and isinstance(content, list) and any(i.get("type") == kind for i in content):
            return True
    return False


def _declared_mode(record: Mapping[str, Any]) -> str | None:
    """The record's reasoning mode: its ``mode`` field, else the suffix on its last user turn (None if neither)."""
    if record.get("mode") is not None:
        return normalize_mode(record["mode"])
    user = _last(record, "user")
    if user is None:
        return None
    suffixed = mode_of(_text_of(user.get("content")))
    return suffixed if suffixed != "auto" else None


def _broken_rule(record: Mapping[str, Any], sft_mode: str) -> str | None:
    """The first rule of ``sft_mode`` that ``record`` breaks, or ``None`` when it fits."""
    try:
        declared = _declared_mode(record)
    except ValueError as exc:
        return str(exc)
    grammar = SFT_MODES[sft_mode] or declared or "auto"
    if declared is not None and declared != grammar:
        return f"record mode {declared!r} disagrees with the SFT mode (expects {grammar!r})"
    reply = _last(record, "assistant")
    if reply is None:
        return "no assistant turn"
    text = _text_of(reply.get("content"))
    problem = response_fits_mode(text, grammar)
    if problem:
        return problem
    if sft_mode == "think_with_image" and "<code>" not in text:
        return "no <code> round in the reasoning"
    if sft_mode == "video" and not _has_item(record, "video"):
        return "no video in the user turns"
    return None


@dataclass(frozen=True)
class ModeFit:
    """Which SFT modes a record fits. ``source_mode`` is the mode it is held to (its ``source`` when that names an
    SFT mode, or the mode passed in); ``reasons`` give, for every mode it does not fit, the first rule it broke."""

    source_mode: str | None
    fits: tuple[str, ...]
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def mode(self) -> str | None:
        """The mode the record trains as: its source mode if it fits it; with no source mode, the most specific
        mode it fits; ``None`` when it fits none (or not the one it is held to)."""
        if self.source_mode is not None:
            return self.source_mode if self.source_mode in self.fits else None
        return next((m for m in MOST_SPECIFIC_FIRST if m in self.fits), None)

    @property
    def problem(self) -> str | None:
        """The trainer's drop reason (``"<mode>: <rule>"``, also its counting key), ``None`` when it keeps it."""
        if self.source_mode is None:
            return NO_SFT_SOURCE
        if self.source_mode in self.fits:
            return None
        return f"{self.source_mode}: {self.reasons[self.source_mode]}"

    def failures(self) -> list[str]:
        """Why the record fits no mode, as ``"<mode>: <rule>"`` keys (empty when :attr:`mode` is set): the source
        mode's rule, or, without a source mode, each mode's first broken rule (``"<mode>, <mode>: <rule>"`` for
        modes that broke the same one)."""
        if self.mode is not None:
            return []
        if self.source_mode is not None:
            return [f"{self.source_mode}: {self.reasons[self.source_mode]}"]
        by_rule: dict[str, list[str]] = {}
        for m in SFT_MODES:
            by_rule.setdefault(self.reasons[m], []).append(m)
        return [f"{', '.join(modes)}: {rule}" for rule, modes in by_rule.items()]

    def explain(self) -> str:
        """One line: the mode, or why none."""
        if self.mode is not None:
            if self.source_mode is not None:
                return self.mode
            return (
                f"{self.mode} (fits {', '.join(self.fits)}; its source names no SFT mode, so SFT training drops it: "
                f"set 'source' to {self.mode})"
            )
        if self.source_mode is not None:
            others = f" (it fits {', '.join(self.fits)})" if self.fits else ""
            return f"fits no SFT mode: {self.failures()[0]}{others}"
        return "fits no SFT mode: " + "; ".join(self.failures())


def fit_modes(record: Mapping[str, Any], sft_mode: str | None = None) -> ModeFit:
    """Check ``record`` (a sample-record dict) against all five SFT modes' rules.

    The record is held to ``sft_mode`` when given, else to its ``source`` when that is an SFT mode name (what the
    trainer's mode check does). Only the last assistant turn is checked, as the trainer's check always has.
    """
    if sft_mode is not None and sft_mode not in SFT_MODES:
        raise ValueError(f"SFT mode {sft_mode!r} is not one of {sorted(SFT_MODES)}")
    source = record.get("source")
    held = sft_mode or (source if isinstance(source, str) and source in SFT_MODES else None)
    reasons: dict[str, str] = {}
    fits = []
    for mode in SFT_MODES:
        rule = _broken_rule(record, mode)
        if rule is None:
            fits.append(mode)
        else:
            reasons[mode] = rule
    return ModeFit(held, tuple(fits), reasons)


@dataclass
class ModeTally:
    """Counts of records per SFT mode and per failure reason, for ``keye check-data`` and ``keye shards``."""

    records: int = 0
    modes: Counter = field(default_factory=Counter)
    fit_none: int = 0
    no_sft_source: int = 0  # fit a mode, but their source names none (SFT training drops them)
    invalid: int = 0  # lines that are no valid record at all (bad JSON, schema, media); reason = the category
    reasons: Counter = field(default_factory=Counter)

    def add(self, fit: ModeFit) -> None:
        self.records += 1
        if fit.mode is None:
            self.fit_none += 1
            self.reasons.update(fit.failures())
            return
        self.modes[fit.mode] += 1
        if fit.source_mode is None:
            self.no_sft_source += 1

    def add_invalid(self, reason: str) -> None:
        self.records += 1
        self.invalid += 1
        self.reasons[reason] += 1

    @property
    def ok(self) -> bool:
        return not (self.fit_none or self.invalid)

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "fit": sum(self.modes.values()),
            "fit_none": self.fit_none,
            "invalid": self.invalid,
            "no_sft_source": self.no_sft_source,
            "modes": {m: self.modes[m] for m in SFT_MODES if self.modes[m]},
            "reasons": dict(self.reasons.most_common()),
        }

    def summary(self) -> str:
        """One line, e.g. ``SFT modes: thinking 4, video 8; fit none 1 (thinking: empty <answer> ×1)``."""
        modes = ", ".join(f"{m} {n}" for m, n in self.as_dict()["modes"].items()) or "none"
        line = f"SFT modes: {modes}; fit none {self.fit_none}"
        if self.invalid:
            line += f"; invalid {self.invalid}"
        if self.reasons:
            line += " (" + "; ".join(f"{r} ×{n}" for r, n in self.reasons.most_common()) + ")"
        if self.no_sft_source:
            line += (
                f"; {self.no_sft_source} fit a mode but their source names none (fine for pretraining; SFT training "
                "drops them)"
            )
        return line
