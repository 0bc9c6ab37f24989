"""Is this answer correct? Decided here once, for evaluation scores and for the RL accuracy reward alike.

:func:`check_answer` reduces a raw model output to its final answer (``keye.reasoning.extract_final_answer``:
drop ``<analysis>``/``<think>``, last ``<answer>``, last ``\\boxed{}``), extracts it by answer kind (a choice
letter, 是/否, a 是/否 list, a number, free text) and compares it with the gold answer; what the rules cannot
decide goes to the judge when one is given. Because ``eval/`` and ``train/rl/rewards.py`` both call it, a
benchmark's accuracy equals the mean accuracy reward on the same outputs (nanochat's "the reward *is* the
task's evaluate function").

An extraction says *why* it is not usable (``ambiguous``: several different answers; ``unanswered``: none),
because a model that hedges and a model that says nothing are different failures and reports count them apart.
"""

from __future__ import annotations

import importlib.util
import re
import string
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from keye.judge import Judge
from keye.reasoning import extract_final_answer

OK, AMBIGUOUS, UNANSWERED = "ok", "ambiguous", "unanswered"
CHOICE, YES_NO, YES_NO_LIST, NUMBER, TEXT = "mcq", "yes_no", "yes_no_list", "number", "text"
KINDS = (CHOICE, YES_NO, YES_NO_LIST, NUMBER, TEXT)
LETTERS = string.ascii_uppercase
YES, NO = "是", "否"

# math-verify (a core dependency) decides LaTeX/sympy equivalence; it is imported on first use because it pulls in
# sympy (~0.7 s), which code importing only the extractors should not pay.
HAVE_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None


@dataclass
class Extracted:
    status: str  # ok | ambiguous | unanswered
    value: str | None = None


@dataclass(frozen=True)
class Check:
    """One verdict: what was extracted, whether it is correct, ``how`` (``rule``/``judge``) and a judge failure.

    ``judge_failed`` marks an answer the rules could not decide and the judge never graded: scored as not
    correct, but counted apart by every caller so a broken judge is visible.
    """

    extracted: Extracted
    correct: bool
    how: str = "rule"
    judge_failed: bool = False


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
    """Full-width to half-width, lower case, no punctuation or whitespace: for finding option texts in answers."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not (ch.isspace() or unicodedata.category(ch).startswith("P")))


# ------------------------------------------------------------------------------------------------ choice letters
# Strong letter forms: "(B)", "B.", "B)", "B:", "option B", "answer is B", "答案是B", "选B".
_STRONG_LETTER = [
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"(?<![A-Za-z])([A-Z])[.:：)）](?![A-Za-z0-9])"),
    re.compile(r"(?<![A-Za-z])([A-Z])[.:：)）]\s"),
    re.compile(r"(?i:option|answer(?: is)?|choice)[\s:：]*\(?([A-Z])\b"),
    re.compile(r"(?:答案|选项|选择|选)[是为:：\s]*\(?([A-Z])(?![A-Za-z])"),
]
_BARE_LETTER = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


def _distinct(values: list[str]) -> Extracted | None:
    found = sorted(set(values))
    if len(found) == 1:
        return Extracted(OK, found[0])
    if len(found) > 1:
        return Extracted(AMBIGUOUS, "".join(found))
    return None


def match_choice(answer: str, options: Sequence[str], n_letters: int | None = None) -> Extracted:
    """Match a final answer against lettered options: a letter form first, then option text, then a bare letter.

    ``n_letters`` bounds the valid letters when the option texts are unknown (RL records without ``choices``).
    """
    text = answer.strip()
    valid = set(LETTERS[: n_letters or len(options)])
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


def extract_choice(output: str, options: Sequence[str], n_letters: int | None = None) -> Extracted:
    return match_choice(extract_final_answer(output), options, n_letters)


def choice_letter(gold: str, options: Sequence[str]) -> str | None:
    """The gold letter from ``A``/``(A)``/``A. text``/one option's text; None when it is none of these."""
    text = gold.strip()
    valid = LETTERS[: len(options)] if options else LETTERS
    letter, rest = split_option_prefix(text)
    if letter is not None and letter in valid:
        return letter
    m = re.fullmatch(r"\(?([A-Z])\)?\.?", text)
    if m and m.group(1) in valid:
        return m.group(1)
    if len(text) == 1 and text.upper() in valid:
        return text.upper()
    matches = [letter_of(i) for i, o in enumerate(options) if normalize_text(o) == normalize_text(rest or text)]
    return matches[0] if len(matches) == 1 else None


# --------------------------------------------------------------------------------------------------------- 是/否
_YN_TOKEN = r"(?:不是的|不是|是的|否|是|yes|no|true|false)"
_YN_NO = ("不是的", "不是", "否", "no", "false")
# A conclusion marker followed by the token: "结论：否", "答案是否", "the answer is no".
_YN_MARKER = re.compile(
    rf"(?:结论|答案|回答|判断|综上所述|综上|因此|所以|answer(?:\s+is)?|conclusion)\s*(?:是|为)?\s*[:：]?\s*"
    rf"({_YN_TOKEN})(?![a-z\u4e00-\u9fff])"
)
_CLAUSE_SPLIT = re.compile(r"[，,。!！?？;；：:\n、]+")
_EN_LEAD = re.compile(r"(yes|no)\b")
_YES_WORDS = re.compile(r"(?<![a-z])(yes|true)(?![a-z])")
_NO_WORDS = re.compile(r"(?<![a-z])(no|false)(?![a-z])")


def _yn(token: str) -> str:
    return NO if token in _YN_NO else YES


def match_yes_no(answer: str) -> Extracted:
    """是/否 (or yes/no) taken from the answer's *conclusion*, never from any substring.

    The conclusion is a marked one (``结论：否``, ``the answer is no``; the last wins), else a clause that is
    only a yes/no word (``是，因为……``; the first clause wins, as the original wrapper reads the leading token).
    Text that only mentions 是/否 inside a sentence (``该评论没有色情内容，是正常评论``) is ambiguous: the judge
    decides it when one is configured. ``不是`` is 否 and ``是否`` ("whether") is no answer.
    """
    text = unicodedata.normalize("NFKC", answer).strip().lower()
    if not text:
        return Extracted(UNANSWERED)
    marked = _YN_MARKER.findall(text)
    if marked:
        return Extracted(OK, _yn(marked[-1]))
    clauses = [c.strip(" \t'\"“”‘’()（）[]【】") for c in _CLAUSE_SPLIT.split(text)]
    said = []
    for clause in clauses:
        if re.fullmatch(_YN_TOKEN, clause):
            said.append(_yn(clause))
        elif m := _EN_LEAD.match(clause):
            said.append(_yn(m.group(1)))
    if said and (clauses[0] and re.fullmatch(_YN_TOKEN, clauses[0]) or len(set(said)) == 1):
        return Extracted(OK, said[0])
    mentioned = text.replace("是否", " ")
    no = bool(re.search(r"否|不是", mentioned) or _NO_WORDS.search(mentioned))
    yes = "是" in mentioned.replace("不是", " ") or bool(_YES_WORDS.search(mentioned))
    if yes or no:
        return Extracted(AMBIGUOUS, (YES if yes else "") + (NO if no else ""))
    return Extracted(UNANSWERED)


def extract_yes_no(output: str) -> Extracted:
    return match_yes_no(extract_final_answer(output))


def normalize_yes_no(label: str) -> str | None:
    """Ground-truth label (是/否/yes/no/Yes/...) -> 是/否, or None when it is neither."""
    res = match_yes_no(label)
    return res.value if res.status == OK else None


# ----------------------------------------------------------------------------------------------------- 是/否 lists
_BRACKETS = re.compile(r"[\[【]([^\[\]【】]*)[\]】]")
_LIST_TOKEN = re.compile(r"不是|是|否|(?<![a-z])(?:yes|no)(?![a-z])", re.IGNORECASE)
_LIST_SEP = r"[\s_,，、;；/]+"
_LIST_RUN = re.compile(
    rf"(?:不是|是|否|(?<![a-z])(?:yes|no)(?![a-z]))(?:{_LIST_SEP}(?:不是|是|否|(?:yes|no)(?![a-z])))+", re.IGNORECASE
)


def _list_tokens(text: str) -> list[str]:
    return [NO if t.lower() in ("不是", "否", "no") else YES for t in _LIST_TOKEN.findall(text)]


def extract_yes_no_list(output: str) -> Extracted:
    """A 是/否 list as ``"是_否_是"``: the last bracketed one (``[是, 否, 是]``, ``【否，否】``), else the last run
    written without brackets (``结论：是，否，是``, ``是_否``)."""
    answer = unicodedata.normalize("NFKC", extract_final_answer(output))
    groups = [g for g in _BRACKETS.findall(answer) if _list_tokens(g)]
    if groups:
        return Extracted(OK, "_".join(_list_tokens(groups[-1])))
    runs = _LIST_RUN.findall(answer)
    if runs:
        return Extracted(OK, "_".join(_list_tokens(runs[-1])))
    if re.fullmatch(r"\s*(?:不是|是|否|yes|no)\s*", answer, re.IGNORECASE):
        return Extracted(OK, "_".join(_list_tokens(answer)))
    return Extracted(UNANSWERED)


def normalize_yes_no_list(label: str) -> str:
    """Ground truth ``是_否_是`` (or with yes/no) in the canonical ``是_否_是`` form."""
    return "_".join(_list_tokens(label))


# ------------------------------------------------------------------------------------------- numbers, free text
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?%?")


def to_number(s: str) -> float | None:
    """``"1,000.5"``, ``"3/4"``, ``"12%"``, ``"$5$"`` -> float; anything else -> None."""
    s = s.strip().strip("$").replace("\\%", "").rstrip("%").rstrip(".").strip()
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    m = re.fullmatch(r"([-+]?\d+)\s*/\s*(\d+)", s)
    if m and int(m.group(2)) != 0:
        return int(m.group(1)) / int(m.group(2))
    try:
        return float(s)
    except ValueError:
        return None


def extract_number(answer: str) -> Extracted:
    """A final answer as a number, or the one number it mentions (``"There are 12 apples."`` -> 12)."""
    if not answer:
        return Extracted(UNANSWERED)
    if to_number(answer) is not None:
        return Extracted(OK, answer)
    values = {to_number(m) for m in _NUMBER.findall(answer)} - {None}
    if len(values) == 1:
        return Extracted(OK, _NUMBER.findall(answer)[0])
    return Extracted(AMBIGUOUS, answer) if values else Extracted(UNANSWERED)


_ANSWER_PREFIX = re.compile(
    r"^\s*(?:(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|choice)\b(?:\s+is)?|(?:最终)?答案(?:是|为)?)\s*[:：]?\s*",
    re.IGNORECASE,
)


def clean_answer(text: str) -> str:
    """Final answer of an output (or a gold answer) without a leading "The answer is"/"答案是" or ``\\text{}``."""
    ans = _ANSWER_PREFIX.sub("", extract_final_answer(text), count=1).strip()
    m = re.fullmatch(r"\\text\{(.*)\}", ans, re.DOTALL)
    return (m.group(1) if m else ans).strip()


_TEXT_WRAP = re.compile(r"\\text\{([^{}]*)\}")
_KEEP = set("-+/\\()[]{}")  # punctuation that changes a mathematical answer ("-1/2" is not "12")


def answer_key(text: str) -> str:
    """A free-text answer for equality: no ``$``/``\\text{}``, full-width folded, lower case, no whitespace or
    punctuation except the characters that change a mathematical answer (signs, slashes, brackets)."""
    text = _TEXT_WRAP.sub(r"\1", text.strip().strip("$"))
    text = unicodedata.normalize("NFKC", text).lower()
    kept = []
    for i, ch in enumerate(text):
        between_digits = 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()
        if ch.isspace() or (unicodedata.category(ch)[0] == "P" and ch not in _KEEP and not between_digits):
            continue  # a decimal point or thousands separator survives; other punctuation does not
        kept.append(ch)
    return "".join(kept)


def math_verify_equal(gold: str, pred: str) -> bool:
    """``math_verify`` equivalence; False when it is not installed or cannot parse either side."""
    if not HAVE_MATH_VERIFY:
        return False
    from math_verify import parse, verify

    # math_verify's timeouts use signal.alarm, which only works on the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None

    def wrap(s: str) -> str:
        return s if ("$" in s or "\\boxed" in s) else f"${s}$"

    try:
        g = parse(wrap(gold), parsing_timeout=timeout)
        p = parse(wrap(pred), parsing_timeout=timeout)
        return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=timeout))
    except Exception:  # math_verify raises on pathological input; that is simply "not verified"
        return False


def free_match(pred: str, gold: str, tolerance: float = 1e-4) -> bool:
    """Rule equality of two free-form answers: numbers within relative ``tolerance`` when both are numbers
    (decisive), else the normalised text, else math-verify equivalence."""
    g_num, p_num = to_number(gold), to_number(pred)
    if g_num is not None and p_num is not None:
        return abs(p_num - g_num) <= tolerance * max(1.0, abs(g_num))
    if answer_key(pred) == answer_key(gold):
        return True
    return math_verify_equal(gold, pred)


# ---------------------------------------------------------------------------------------------------- the check
def infer_kind(gold: str, options: Sequence[str] = ()) -> str:
    """The answer kind a gold answer implies, for records that do not name one (RL prompt records)."""
    text = gold.strip()
    if options and choice_letter(text, options) is not None:
        return CHOICE
    if not options and re.fullmatch(r"\(?[A-Z]\)?\.?", text):
        return CHOICE
    if re.fullmatch(r"(?i)是|否|不是|yes|no|true|false", text):
        return YES_NO
    if re.fullmatch(r"(?i)(?:是|否|yes|no)(?:_(?:是|否|yes|no))+", text):
        return YES_NO_LIST
    if to_number(text) is not None:
        return NUMBER
    return TEXT


def check_answer(
    output: str,
    gold: str,
    kind: str,
    *,
    options: Sequence[str] = (),
    question: str = "",
    judge: Judge | None = None,
    tolerance: float = 1e-4,
) -> Check:
    """Is ``output`` (a raw model output) a correct answer ``gold`` of ``kind``?

    The judge is asked only what the rules cannot decide: an unusable choice/是/否/list extraction, a number
    that is not written as one, free text the rules call different. An empty answer is wrong without asking.
    """
    if kind not in KINDS:
        raise ValueError(f"answer kind must be one of {KINDS}, got {kind!r}")
    if kind in (CHOICE, YES_NO):
        return _check_pick(extract_final_answer(output), gold, kind, options, question, judge)
    if kind == YES_NO_LIST:
        final, want = extract_final_answer(output), normalize_yes_no_list(gold)
        ext = extract_yes_no_list(output)
        if ext.status == OK or not final or judge is None:
            return Check(ext, ext.status == OK and ext.value == want)
        verdict = judge.grade(question, want.replace("_", "，"), final)
        return Check(ext, bool(verdict), "judge", verdict is None)
    final = clean_answer(output)
    if kind == NUMBER or to_number(gold) is not None:  # free text with a numeric truth is checked as a number
        ext = extract_number(final)
        if ext.status == OK:  # a number against a number: the rules decide
            return Check(ext, free_match(ext.value or "", gold, tolerance))
    else:
        ext = Extracted(OK, final) if final else Extracted(UNANSWERED)
    if not final:
        return Check(ext, False)
    if free_match(final, gold, tolerance):
        return Check(ext, True)
    if judge is None:
        return Check(ext, False)
    verdict = judge.grade(question, gold, final)
    return Check(ext, bool(verdict), "judge", verdict is None)


def _check_pick(final: str, gold: str, kind: str, options: Sequence[str], question: str, judge: Judge | None) -> Check:
    """A choice letter or 是/否: the rule's pick, else (when the rule finds none or several) the judge's."""
    if kind == CHOICE:
        want = choice_letter(gold, options)
        if want is None:
            raise ValueError(f"gold answer {gold!r:.60} is neither a choice letter nor one option's text")
        n_letters = len(options) or max(4, LETTERS.index(want) + 1)
        choices = list(LETTERS[:n_letters])

        def match(text: str) -> Extracted:
            return match_choice(text, options, n_letters)
    else:
        want, choices, match = normalize_yes_no(gold), [YES, NO], match_yes_no
    ext = match(final)
    if ext.status == OK or not final or judge is None:
        return Check(ext, ext.status == OK and ext.value == want)
    picked = judge.choose(question, final, choices)
    again = match(picked) if picked else None
    if again is not None and again.status == OK:
        return Check(again, again.value == want, "judge")
    return Check(ext, False, "judge" if picked is not None else "rule", picked is None)
