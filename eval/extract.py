"""Answer extraction for the harness: the names eval code and its tests use, from the shared checker.

Extraction and scoring live once in :mod:`keye.answers`, which the RL accuracy reward calls too, so a benchmark
score and the mean accuracy reward on the same outputs cannot disagree.
"""

from __future__ import annotations

from keye.answers import (
    AMBIGUOUS,
    LETTERS,
    NO,
    OK,
    UNANSWERED,
    YES,
    Extracted,
    extract_choice,
    extract_yes_no,
    extract_yes_no_list,
    letter_of,
    match_choice,
    match_yes_no,
    normalize_text,
    normalize_yes_no,
    normalize_yes_no_list,
    split_option_prefix,
)

__all__ = [
    "AMBIGUOUS",
    "LETTERS",
    "NO",
    "OK",
    "UNANSWERED",
    "YES",
    "Extracted",
    "extract_choice",
    "extract_yes_no",
    "extract_yes_no_list",
    "letter_of",
    "match_choice",
    "match_yes_no",
    "normalize_text",
    "normalize_yes_no",
    "normalize_yes_no_list",
    "split_option_prefix",
]
