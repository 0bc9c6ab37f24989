"""Reasoning modes: suffixes, stripping reasoning, final-answer extraction and the per-mode output grammar."""

import pytest

from keye.reasoning import (
    MODE_SUFFIX,
    apply_mode,
    extract_final_answer,
    last_boxed,
    mode_of,
    response_fits_mode,
    strip_reasoning,
)


def test_mode_suffix_table():
    assert MODE_SUFFIX == {"think": "/think", "no_think": "/no_think", "auto": ""}


@pytest.mark.parametrize(
    "text,mode,expected",
    [
        ("Describe the video.", "think", "Describe the video. /think"),
        ("Describe the video.", "no_think", "Describe the video. /no_think"),
        ("Describe the video.", "auto", "Describe the video."),
        ("Describe the video.", None, "Describe the video."),
        ("Describe the video. /think", "no_think", "Describe the video. /no_think"),
        ("Describe the video. /no_think", "think", "Describe the video. /think"),
        ("", "think", "/think"),
    ],
)
def test_apply_mode(text, mode, expected):
    assert apply_mode(text, mode) == expected


@pytest.mark.parametrize("mode", ["think", "no_think", "auto", None])
def test_apply_mode_is_idempotent_and_readable_back(mode):
    once = apply_mode("What is 2+2?", mode)
    assert apply_mode(once, mode) == once
    assert mode_of(once) == (mode or "auto")


def test_apply_mode_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown reasoning mode 'deep'"):
        apply_mode("x", "deep")


def test_strip_reasoning():
    assert strip_reasoning("<analysis>hard</analysis><think>a\nb</think> Final.") == "Final."
    assert strip_reasoning("reasoning without opener</think>\nAnswer B") == "Answer B"
    assert strip_reasoning("x</analysis>y</think>z") == "z"
    assert strip_reasoning("  plain  ") == "plain"


def test_extract_final_answer():
    assert (
        extract_final_answer("<think>maybe \\boxed{3}</think><answer>It is \\boxed{\\frac{1}{2}}.</answer>")
        == "\\frac{1}{2}"
    )
    assert extract_final_answer("<answer>A</answer> then <answer> B </answer>") == "B"
    assert extract_final_answer("<think>...</think>The answer is C.") == "The answer is C."
    assert extract_final_answer("so \\boxed{x^{2}} and \\boxed{y") == "x^{2}"  # truncated last box skipped
    assert extract_final_answer("<think>t</think><answer>42") == "42"  # truncated before </answer>
    assert last_boxed("no box") is None


THINK_OK = (
    "<think>look<code>```python\nprint(1)\n```</code>\n<sandbox_output>1</sandbox_output>ok</think>\n<answer>B</answer>"
)


@pytest.mark.parametrize(
    "text,mode,ok",
    [
        (THINK_OK, "think", True),
        ("<think>a</think><answer>B</answer>", "think", True),
        ("<think>a</think>B", "think", False),
        ("<think>a</think><think>b</think><answer>B</answer>", "think", False),
        ("<think>a</think><answer> </answer>", "think", False),
        ("<think>a</think><answer>B</answer> trailing", "think", False),
        ("<think>a<code>x</code></think><answer>B</answer>", "think", False),  # code never executed
        ("<think>a</think><answer>B<code>x</code><sandbox_output>1</sandbox_output></answer>", "think", False),
        ("The answer is B.", "no_think", True),
        ("<think>a</think>B", "no_think", False),
        ("B </answer>", "no_think", False),
        ("<analysis>easy</analysis>B", "auto", True),
        ("<analysis>hard</analysis><think>a</think><answer>B</answer>", "auto", True),
        ("<analysis>hard</analysis><think>a</think>B", "auto", False),
        ("B", "auto", False),
        ("<analysis>x</analysis>", "auto", False),
        ("<analysis>x</analysis><analysis>y</analysis>B", "auto", False),
        ("  ", "no_think", False),
    ],
)
def test_response_fits_mode(text, mode, ok):
    reason = response_fits_mode(text, mode)
    assert (reason is None) == ok, reason
    if not ok:
        assert isinstance(reason, str) and reason


def test_response_fits_mode_reason_names_the_tag():
    assert "</answer>" in response_fits_mode("<think>a</think><answer>B", "think")
    assert "<think>" in response_fits_mode("<think>a</think>B", "no_think")
