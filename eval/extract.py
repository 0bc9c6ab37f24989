"""Answer extraction: from a raw model output to a letter, 是/否, a 是/否 list or a normalised free-form answer.

Every extractor first reduces the output to its final answer with ``keye.reasoning.extract_final_answer`` (drop
``<analysis>``/``<think>``, last ``<answer>``, last ``\\boxed{}``), then matches. The result says *why* it is
not usable (``ambiguous``: several different answers; ``unanswered``: none), because a model that hedges and a
model that says nothing are different failures and the report counts them apart.
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass

from keye.reasoning import extract_final_answer

OK, AMBIGUOUS, UNANSWERED = "ok", "ambiguous", "unanswered"
LETTERS = string.ascii_uppercase
YES, NO = "是", "否"


@dataclass
class Extracted:
    status: str  # ok | ambiguous | unanswered
    value: str | None = None


def letter_of(index: int) -> str:
    return LETTERS[index]


_OPTION_PREFIX = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.:：、)）])\s*")


def split_option_prefix(option: str) -> tuple[str | None, str]:
    """``"(B) left"``/``"B. left"`` -> (``"B"``, ``"left"``); an option without a letter prefix -> (None, text)."""
    m = _OPTION_PREFIX.match(option)
    if m:
        return m.group(1) or m.group(2), option[m.end() :].strip()
    return None, option.strip()


def normalize_text(text: str) -> str:
    """Full-width to half-width, lower case, no punctuation or whitespace: for comparing free-form answers."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not (ch.isspace() or unicodedata.category(ch).startswith("P")))


# Strong letter forms: "(B)", "B.", "B)", "B:", "option B", "answer is B", "答案是B", "选B".
_STRONG_LETTER = [
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"(?<![A-Za-z])([A-Z])[.:：)）](?![A-Za-z0-9])"),
    re.compile(r"(?<![A-Za-z])([A-Z])[.:：)）]\s"),
    re.compile(r"(?i:option|answer(?: is)?|choice)[\s:：]*\(?([A-Z])\b"),
    re.compile(r"(?:答案|选项|选择|选)[是为:：\s]*\(?([A-Z])(?![A-Za-z])"),
]
_BARE_LETTER = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


def _distinct(letters: list[str]) -> Extracted | None:
    found = sorted(set(letters))
    if len(found) == 1:
        return Extracted(OK, found[0])
    if len(found) > 1:
        return Extracted(AMBIGUOUS, "".join(found))
    return None


def match_choice(answer: str, options: list[str]) -> Extracted:
    """Match a final answer against lettered options: a letter form first, then option text, then a bare letter."""
    text = answer.strip()
    valid = set(LETTERS[: len(options)])
    if not text:
        return Extracted(UNANSWERED)
    m = re.fullmatch(r"\(?([A-Z])\)?[.:：)）]?", text)
    if m and m.group(1) in valid:
        return Extracted(OK, m.group(1))
    strong = [g for pat in _STRONG_LETTER for g in pat.findall(text) if g in valid]
    res = _distinct(strong)
    if res is not None:
        return res
    norm = normalize_text(text)
    texts = [normalize_text(split_option_prefix(o)[1]) for o in options]
    hits = [i for i, t in enumerate(texts) if t and t in norm]
    # "up" is inside "up-left": keep only hits that are not part of another, longer hit.
    hits = [i for i in hits if not any(j != i and texts[i] in texts[j] for j in hits)]
    res = _distinct([LETTERS[i] for i in hits])
    if res is not None:
        return res
    if len(text.split()) <= 5:
        res = _distinct([g for g in _BARE_LETTER.findall(text) if g in valid])
        if res is not None:
            return res
    return Extracted(UNANSWERED)


def extract_choice(output: str, options: list[str]) -> Extracted:
    return match_choice(extract_final_answer(output), options)


_YES_WORDS = re.compile(r"(?<![a-z])(yes|true)(?![a-z])")
_NO_WORDS = re.compile(r"(?<![a-z])(no|false)(?![a-z])")


def match_yes_no(answer: str) -> Extracted:
    """是/否 (or yes/no). "不是" counts as 否; "是否" ("whether") is ignored; both present -> ambiguous."""
    text = unicodedata.normalize("NFKC", answer).strip().lower()
    if not text:
        return Extracted(UNANSWERED)
    text = text.replace("是否", " ")
    no_zh = bool(re.search(r"否|不是", text))
    yes_zh = "是" in text.replace("不是", " ")
    yes = yes_zh or bool(_YES_WORDS.search(text))
    no = no_zh or bool(_NO_WORDS.search(text))
    if yes and no:
        # A direct answer first ("是，因为……不是……") settles it, as the original wrapper reads the leading token.
        lead = re.match(r"\s*(不是|否|no\b|false\b|是|yes\b|true\b)", text)
        if lead:
            return Extracted(OK, NO if lead.group(1) in ("不是", "否", "no", "false") else YES)
        return Extracted(AMBIGUOUS, YES + NO)
    if yes:
        return Extracted(OK, YES)
    if no:
        return Extracted(OK, NO)
    return Extracted(UNANSWERED)


def extract_yes_no(output: str) -> Extracted:
    return match_yes_no(extract_final_answer(output))


def normalize_yes_no(label: str) -> str | None:
    """Ground-truth label (是/否/yes/no/Yes/...) -> 是/否, or None when it is neither."""
    res = match_yes_no(label)
    return res.value if res.status == OK else None


_BRACKETS = re.compile(r"[\[【]([^\[\]【】]*)[\]】]")
_LIST_TOKEN = re.compile(r"不是|是|否|yes|no", re.IGNORECASE)


def _list_tokens(text: str) -> list[str]:
    return [NO if t.lower() in ("不是", "否", "no") else YES for t in _LIST_TOKEN.findall(text)]


def extract_yes_no_list(output: str) -> Extracted:
    """The last bracketed 是/否 list (``[是, 否, 是]``) as ``"是_否_是"``; a bare ``是_否_是`` answer also counts."""
    answer = extract_final_answer(output)
    groups = [g for g in _BRACKETS.findall(answer) if _list_tokens(g)]
    if groups:
        return Extracted(OK, "_".join(_list_tokens(groups[-1])))
    bare = unicodedata.normalize("NFKC", answer).strip()
    if bare and re.fullmatch(r"(?:(?:不是|是|否|yes|no)[\s_,，、;；/]*)+", bare, re.IGNORECASE):
        return Extracted(OK, "_".join(_list_tokens(bare)))
    return Extracted(UNANSWERED)


def normalize_yes_no_list(label: str) -> str:
    """Ground truth ``是_否_是`` (or with yes/no) in the canonical ``是_否_是`` form."""
    return "_".join(_list_tokens(label))
