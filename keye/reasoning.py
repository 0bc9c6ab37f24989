"""Reasoning modes of Keye-VL 1.5: the ``/think`` / ``/no_think`` / auto suffixes and the output grammar of each.

The mode is chosen by a suffix on the user text (no suffix = auto-think).  The same grammar is needed in three
places - SFT loading (reject samples that teach the wrong format), the RL format reward, and evaluation (pull
the final answer out of a reasoning trace) - so it lives here once.
"""

from __future__ import annotations

import re

MODE_SUFFIX: dict[str, str] = {"think": "/think", "no_think": "/no_think", "auto": ""}

_REASONING_BLOCK = re.compile(r"<(analysis|think)>.*?</\1>", re.DOTALL)
_STRAY_CLOSE = re.compile(r"</(?:analysis|think)>")
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_TOOL_ROUND = re.compile(r"<code>(.*?)</code>\s*<sandbox_output>(.*?)</sandbox_output>", re.DOTALL)
_TOOL_TAGS = ("<code>", "</code>", "<sandbox_output>", "</sandbox_output>")


def normalize_mode(mode: str | None) -> str:
    """``None`` means auto; anything outside :data:`MODE_SUFFIX` is an error naming the accepted values."""
    if mode is None:
        return "auto"
    if mode not in MODE_SUFFIX:
        raise ValueError(f"unknown reasoning mode {mode!r}; expected one of {sorted(MODE_SUFFIX)} or None")
    return mode


def _split_suffix(user_text: str) -> tuple[str, str]:
    """(text without a trailing mode suffix, the mode that suffix selected or 'auto')."""
    stripped = user_text.rstrip()
    # "/no_think" ends with "think" but not "/think", so the order of the checks does not matter.
    for mode in ("no_think", "think"):
        suffix = MODE_SUFFIX[mode]
        if stripped.endswith(suffix):
            return stripped[: -len(suffix)].rstrip(), mode
    return user_text, "auto"


def mode_of(user_text: str) -> str:
    """The mode a user turn selects by its suffix (``auto`` when it has none)."""
    return _split_suffix(user_text)[1]


def apply_mode(user_text: str, mode: str | None) -> str:
    """Append the mode suffix after a space (as the 1.5 README does); idempotent.

    A text that already ends with the other mode's suffix gets it replaced, so a dataset prompt that carries a
    suffix cannot end up with two conflicting ones.  ``None``/``"auto"`` leave the text unchanged.
    """
    mode = normalize_mode(mode)
    if mode == "auto":
        return user_text
    base, current = _split_suffix(user_text)
    if current == mode:
        return user_text
    return f"{base} {MODE_SUFFIX[mode]}" if base else MODE_SUFFIX[mode]


def strip_reasoning(text: str) -> str:
    """Drop ``<analysis>…</analysis>`` and ``<think>…</think>``; a closing tag without an opener drops all before it.

    The stray-closing-tag rule matches the eval wrapper of the original system: a chat template may put the
    opening ``<think>`` into the prompt, so the completion starts inside the reasoning.
    """
    text = _REASONING_BLOCK.sub("", text)
    last_close = None
    for m in _STRAY_CLOSE.finditer(text):
        last_close = m
    if last_close is not None:
        text = text[last_close.end() :]
    return text.strip()


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{…}`` with balanced braces, or ``None`` when there is no complete one."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth = 0
        for i in range(start + len("\\boxed"), len(text)):
            ch = text[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start + len("\\boxed{") : i]
        # Unbalanced (truncated) box: fall back to an earlier, complete one.
        start = text.rfind("\\boxed{", 0, start)
    return None


def extract_final_answer(text: str) -> str:
    r"""The final answer: last ``<answer>`` block (after stripping reasoning), then its ``\boxed{}``, trimmed."""
    body = strip_reasoning(text)
    answers = _ANSWER_BLOCK.findall(body)
    if answers:
        body = answers[-1]
    elif "<answer>" in body:  # truncated before </answer>: take what was written
        body = body[body.rfind("<answer>") + len("<answer>") :]
    boxed = last_boxed(body)
    if boxed is not None:
        body = boxed
    return body.strip()


def _tool_rounds_problem(think_body: str) -> str | None:
    """Thyme code rounds inside ``<think>`` must be complete ``<code>…</code><sandbox_output>…</sandbox_output>``."""
    rest = _TOOL_ROUND.sub("", think_body)
    for tag in _TOOL_TAGS:
        if tag in rest:
            return (
                f"unpaired {tag} inside <think> (code rounds must be <code>…</code><sandbox_output>…</sandbox_output>)"
            )
    return None


def _think_problem(text: str) -> str | None:
    for tag in _THINK_TAGS:
        n = text.count(tag)
        if n != 1:
            return f"think mode needs exactly one {tag}, found {n}"
    m = re.fullmatch(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>\s*", text, re.DOTALL)
    if m is None:
        return "think mode needs '<think>…</think>' followed by '<answer>…</answer>' and nothing else"
    think_body, answer = m.group(1), m.group(2)
    if not answer.strip():
        return "empty <answer>"
    problem = _tool_rounds_problem(think_body)
    if problem:
        return problem
    if any(tag in answer for tag in _TOOL_TAGS):
        return "code/sandbox tags are only allowed inside <think>"
    return None


def _no_think_problem(text: str) -> str | None:
    found = [tag for tag in _THINK_TAGS if tag in text]
    if found:
        return f"no_think mode must not contain {', '.join(found)}"
    return None


def response_fits_mode(text: str, mode: str | None) -> str | None:
    """``None`` when ``text`` follows the output grammar of ``mode``, else a short reason why not.

    think: ``<think>…</think><answer>…</answer>`` (one of each; Thyme code rounds only inside think);
    no_think: no think/answer tags at all; auto: ``<analysis>…</analysis>`` first, then either of the two.
    """
    mode = normalize_mode(mode)
    if not text.strip():
        return "empty response"
    if mode == "think":
        return _think_problem(text)
    if mode == "no_think":
        return _no_think_problem(text)
    m = re.match(r"\s*<analysis>(.*?)</analysis>", text, re.DOTALL)
    if m is None:
        return "auto mode must start with <analysis>…</analysis>"
    rest = text[m.end() :]
    if "<analysis>" in rest or "</analysis>" in rest:
        return "auto mode needs exactly one <analysis> block"
    if not rest.strip():
        return "auto mode has nothing after </analysis>"
    if any(tag in rest for tag in _THINK_TAGS):
        problem = _think_problem(rest)
        return f"auto mode (thinking branch): {problem}" if problem else None
    return None
