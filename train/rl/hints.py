"""Progressive prompt hinting (Keye-VL 1.5): a five-level hint ladder per hard prompt and the minimal level to use.

A prompt whose G rollouts all fail gives GSPO/GRPO zero advantage - no signal.  For such prompts the scheduler
probes the current model with k samples at hint levels 1, 2, … and keeps the weakest level at which it starts
succeeding; rollouts for that prompt then carry the hint in the user turn (which never receives loss).  Levels:

    0 no hint · 1 concept/observation · 2 strategy/method · 3 tools/formula · 4 steps/calculation · 5 full solution

Ladders are data on the prompt record (``hints: [str × 5]``), built offline by :func:`build_ladders` from a
reference solution with any engine that has ``generate(conversations, settings) -> list[str]``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from keye.reasoning import MODE_SUFFIX, apply_mode, mode_of, strip_reasoning

NUM_LEVELS = 5
LEVEL_NAMES = ("concept", "strategy", "tools", "steps", "solution")
LEVEL_DESCRIPTIONS = (
    "Concept/Observation: what to notice in the input, or which concept applies. Do not say how to proceed.",
    "Strategy/Method: which approach or method to take, without formulas or numbers.",
    "Tools/Formula: the specific formula, theorem or tool to use.",
    "Steps/Calculation: the first worked steps of the calculation, stopping before the final result.",
    "Complete solution: the full worked solution including the final answer.",
)

Messages = list[dict[str, Any]]
Sampler = Callable[[Messages, int], Sequence[str]]
Verifier = Callable[[str, Mapping[str, Any]], bool]


def validate_ladder(hints: Any, where: str = "hints") -> list[str]:
    """A ladder is exactly five non-empty strings, weakest first."""
    if not isinstance(hints, (list, tuple)) or len(hints) != NUM_LEVELS:
        raise ValueError(f"{where}: expected a list of {NUM_LEVELS} hint strings, got {hints!r:.120}")
    for i, h in enumerate(hints):
        if not isinstance(h, str) or not h.strip():
            raise ValueError(f"{where}[{i}] (L{i + 1} {LEVEL_NAMES[i]}): expected a non-empty string, got {h!r:.80}")
    return [h.strip() for h in hints]


def _with_hint(text: str, hint: str) -> str:
    """Insert the hint after the question but before a mode suffix, which must stay last."""
    mode = mode_of(text)
    if mode == "auto":
        return f"{text.rstrip()}\n\nHint: {hint}"
    base = text.rstrip()[: -len(MODE_SUFFIX[mode])].rstrip()
    return apply_mode(f"{base}\n\nHint: {hint}", mode)


def hinted_messages(messages: Sequence[Mapping[str, Any]], ladder: Sequence[str] | None, level: int) -> Messages:
    """A copy of ``messages`` with the level-``level`` hint in the last user turn (level 0: unchanged copy).

    Content may be a string or a list of typed items (``{"type": "text", "text": …}``, images, videos); the hint
    goes into the last text item, or a new text item is appended when the turn has none.
    """
    out = copy.deepcopy([dict(m) for m in messages])
    if level == 0:
        return out
    if not 1 <= level <= NUM_LEVELS:
        raise ValueError(f"hint level: expected 0..{NUM_LEVELS}, got {level}")
    hint = validate_ladder(ladder)[level - 1]
    for msg in reversed(out):
        if msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, list):
            text_items = [c for c in content if isinstance(c, dict) and c.get("type") == "text"]
            if text_items:
                text_items[-1]["text"] = _with_hint(str(text_items[-1].get("text", "")), hint)
            else:
                content.append({"type": "text", "text": f"Hint: {hint}"})
        else:
            msg["content"] = _with_hint(str(content or ""), hint)
        return out
    raise ValueError("hinted_messages: the conversation has no user turn to put the hint in")


class HintScheduler:
    """Per-prompt minimal hint level, found by probing the current model; resumable via ``state_dict``.

    ``sampler(messages, k)`` returns k completions; ``verifier(completion, record)`` says whether one is correct.
    ``min_passes`` of the k probe samples must pass for a level to count as succeeding.
    """

    def __init__(self, k: int = 4, min_passes: int = 1, max_level: int = NUM_LEVELS) -> None:
        if k < 1 or not 1 <= min_passes <= k:
            raise ValueError(
                f"HintScheduler: expected k >= 1 and 1 <= min_passes <= k, got k={k}, min_passes={min_passes}"
            )
        if not 1 <= max_level <= NUM_LEVELS:
            raise ValueError(f"HintScheduler: max_level must be in 1..{NUM_LEVELS}, got {max_level}")
        self.k, self.min_passes, self.max_level = k, min_passes, max_level
        self.levels: dict[str, int] = {}
        self.probes = [0] * (NUM_LEVELS + 1)  # samples drawn per level (index 0 = unhinted re-probes)
        self.passes = [0] * (NUM_LEVELS + 1)
        self.unsolved: set[str] = set()

    @staticmethod
    def _pid(record: Mapping[str, Any]) -> str:
        if "id" not in record:
            raise KeyError("HintScheduler: the prompt record has no 'id' to remember its hint level by")
        return str(record["id"])

    def level_for(self, record_or_id: Mapping[str, Any] | str) -> int:
        pid = record_or_id if isinstance(record_or_id, str) else self._pid(record_or_id)
        return self.levels.get(pid, 0)

    def messages_for(self, record: Mapping[str, Any]) -> Messages:
        """The record's messages with its current hint (unchanged when it needs none or has no ladder)."""
        level = self.level_for(record)
        return hinted_messages(record["messages"], record.get("hints"), level if record.get("hints") else 0)

    def _set(self, pid: str, level: int) -> None:
        if level == 0:
            self.levels.pop(pid, None)
        else:
            self.levels[pid] = level

    def search(
        self, record: Mapping[str, Any], sampler: Sampler, verifier: Verifier, start: int = 1, stop: int | None = None
    ) -> int:
        """Probe levels ``start..stop`` in order; remember and return the first that succeeds (``stop`` if none)."""
        pid = self._pid(record)
        stop = self.max_level if stop is None else stop
        ladder = record.get("hints")
        if ladder is None and stop > 0:
            raise ValueError(f"HintScheduler: prompt {pid!r} has no 'hints' ladder to probe with")
        for level in range(start, stop + 1):
            completions = list(sampler(hinted_messages(record["messages"], ladder, level), self.k))
            n_pass = sum(1 for c in completions if verifier(c, record))
            self.probes[level] += len(completions)
            self.passes[level] += n_pass
            if n_pass >= self.min_passes:
                self.unsolved.discard(pid)
                self._set(pid, level)
                return level
        self.unsolved.add(pid)
        self._set(pid, stop)
        return stop

    def observe(
        self,
        record: Mapping[str, Any],
        passes: Sequence[bool],
        sampler: Sampler,
        verifier: Verifier,
        level: int | None = None,
    ) -> int:
        """Update after a group of rollouts made at ``level`` (default: the current one); return the level to use.

        Any pass: nothing to do, except that a pass *without* a hint forgets the prompt's stored level.
        All failed: probe from the next level up.  Without a ladder the prompt simply stays unhinted.
        """
        pid = self._pid(record)
        level = self.level_for(pid) if level is None else level
        if any(passes):
            if level == 0:
                self._set(pid, 0)
                self.unsolved.discard(pid)
            return self.level_for(pid)
        if not record.get("hints") or level >= self.max_level:
            return self.level_for(pid)
        return self.search(record, sampler, verifier, start=level + 1)

    def reprobe(self, record: Mapping[str, Any], sampler: Sampler, verifier: Verifier) -> int:
        """Try to lower a hinted prompt's level (e.g. once an epoch): probe from unhinted up to its current level."""
        current = self.level_for(record)
        if current == 0:
            return 0
        return self.search(record, sampler, verifier, start=0, stop=current)

    def stats(self) -> dict[str, float]:
        """Per-level probe counts and pass rates, and how many prompts sit at each level, for logging."""
        out: dict[str, float] = {
            "hint/prompts_hinted": float(len(self.levels)),
            "hint/unsolved": float(len(self.unsolved)),
        }
        for level in range(NUM_LEVELS + 1):
            out[f"hint/probes_L{level}"] = float(self.probes[level])
            out[f"hint/pass_rate_L{level}"] = self.passes[level] / self.probes[level] if self.probes[level] else 0.0
            if level:
                out[f"hint/prompts_L{level}"] = float(sum(1 for v in self.levels.values() if v == level))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "min_passes": self.min_passes,
            "max_level": self.max_level,
            "levels": dict(self.levels),
            "probes": list(self.probes),
            "passes": list(self.passes),
            "unsolved": sorted(self.unsolved),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("levels", "probes", "passes"):
            if key not in state:
                raise KeyError(f"HintScheduler.load_state_dict: missing {key!r} in the saved state")
        self.k = int(state.get("k", self.k))
        self.min_passes = int(state.get("min_passes", self.min_passes))
        self.max_level = int(state.get("max_level", self.max_level))
        self.levels = {str(k): int(v) for k, v in state["levels"].items()}
        self.probes = [int(x) for x in state["probes"]]
        self.passes = [int(x) for x in state["passes"]]
        self.unsolved = set(state.get("unsolved", []))


# ------------------------------------------------------------------------------------------------ ladder building
LADDER_INSTRUCTION = (
    "You write hints for a student who failed to solve the problem below. Using the reference solution, write "
    "five hints of increasing strength:\n"
    + "\n".join(f"L{i + 1}. {d}" for i, d in enumerate(LEVEL_DESCRIPTIONS))
    + '\nReply with only a JSON object {"L1": "...", "L2": "...", "L3": "...", "L4": "...", "L5": "..."}.'
)


def question_text(record: Mapping[str, Any]) -> str:
    """The bare question of a prompt record: ``question``, else the text of its last user turn."""
    if record.get("question"):
        return str(record["question"])
    for msg in reversed(record.get("messages") or []):
        if msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, list):
                content = "\n".join(
                    str(c.get("text", "")) for c in content if isinstance(c, dict) and c.get("type") == "text"
                )
            return str(content or "")
    raise ValueError(f"prompt {record.get('id', '?')!r}: no 'question' and no user turn")


def ladder_conversation(record: Mapping[str, Any]) -> Messages:
    """The text-only request to a strong model for one prompt's ladder."""
    solution = record.get("reference_solution") or record.get("solution")
    if not solution:
        raise ValueError(f"prompt {record.get('id', '?')!r}: no 'reference_solution' or 'solution' to build hints from")
    user = f"{LADDER_INSTRUCTION}\n\nProblem:\n{question_text(record)}\n\nReference solution:\n{solution}"
    return [{"role": "user", "content": user}]


def parse_ladder(text: str) -> list[str]:
    """Five hints from a reply: a JSON object with L1..L5 (or a 5-element list), else lines ``L1: …`` … ``L5: …``."""
    body = strip_reasoning(text)
    fence = re.search(r"```(?:json)?\s*(.*?)```", body, re.DOTALL)
    candidates = [fence.group(1)] if fence else []
    m = re.search(r"[\[{].*[\]}]", body, re.DOTALL)
    if m:
        candidates.append(m.group(0))
    json_error: ValueError | None = None
    for cand in candidates:
        try:
            data = json.loads(cand)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            keyed = {str(k).strip().upper(): v for k, v in data.items()}
            data = [keyed.get(f"L{i}") for i in range(1, NUM_LEVELS + 1)]
        try:
            return validate_ladder(data, "ladder reply")
        except ValueError as exc:
            json_error = exc
    found: dict[int, str] = {}
    pattern = re.compile(
        r"^\s*\**L([1-5])\**\s*[.:)\-]\s*(.*?)(?=^\s*\**L[1-5]\**\s*[.:)\-]|\Z)", re.DOTALL | re.MULTILINE
    )
    for mm in pattern.finditer(body):
        found.setdefault(int(mm.group(1)), mm.group(2).strip())
    if not found and json_error is not None:
        raise json_error
    return validate_ladder([found.get(i, "") for i in range(1, NUM_LEVELS + 1)], "ladder reply")


def build_ladders(
    records: Iterable[dict[str, Any]],
    engine: Any,
    settings: Any = None,
    batch_size: int = 8,
    retries: int = 1,
    failures: list[tuple[str, str]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield each record, in input order, with ``hints`` added; records that failed are yielded unchanged.

    ``failures`` (if given) collects ``(id, reason)`` for records without a solution to build from or whose
    reply never parsed (after ``retries`` re-asks), so a tool can report them.  Records that already have a
    valid ladder are passed through without asking the engine.
    """
    if batch_size < 1:
        raise ValueError(f"build_ladders: batch_size must be >= 1, got {batch_size}")

    def flush(batch: list[dict[str, Any]], needing: list[int]) -> Iterator[dict[str, Any]]:
        pending = list(needing)
        reasons: dict[int, str] = {}
        for _ in range(1 + max(0, retries)):
            if not pending:
                break
            replies = engine.generate([ladder_conversation(batch[i]) for i in pending], settings)
            if len(replies) != len(pending):
                raise RuntimeError(f"engine.generate returned {len(replies)} replies for {len(pending)} conversations")
            still = []
            for i, reply in zip(pending, replies):
                try:
                    batch[i]["hints"] = parse_ladder(reply)
                except ValueError as exc:
                    reasons[i] = str(exc)
                    still.append(i)
            pending = still
        if failures is not None:
            failures.extend((str(batch[i].get("id", "?")), reasons[i]) for i in pending)
        yield from batch

    batch: list[dict[str, Any]] = []
    needing: list[int] = []
    for record in records:
        out = dict(record)
        batch.append(out)
        try:
            validate_ladder(out.get("hints"))
            continue  # already has a ladder: passed through in order
        except ValueError:
            pass
        try:
            ladder_conversation(out)
        except ValueError as exc:  # nothing to build from: counted and passed through, not fatal
            if failures is not None:
                failures.append((str(out.get("id", "?")), str(exc)))
            continue
        needing.append(len(batch) - 1)
        if len(needing) == batch_size:
            yield from flush(batch, needing)
            batch, needing = [], []
    if batch:
        yield from flush(batch, needing)
