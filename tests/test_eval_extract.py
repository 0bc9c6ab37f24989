"""Answer extraction edge cases: reasoning tags, boxed, letter forms, option text, 是/否, lists, hedges, silence."""

import pytest

from eval.extract import (
    AMBIGUOUS,
    OK,
    UNANSWERED,
    extract_choice,
    extract_yes_no,
    extract_yes_no_list,
    normalize_yes_no_list,
    split_option_prefix,
)

OPTS = ["up", "down", "left", "up-left"]


@pytest.mark.parametrize(
    "output, status, value",
    [
        ("B", OK, "B"),
        ("(C)", OK, "C"),
        ("D.", OK, "D"),
        ("The answer is A.", OK, "A"),
        ("<think>Maybe (A)? or (C)...</think><answer>(B)</answer>", OK, "B"),
        ("<analysis>easy</analysis>C", OK, "C"),
        ("still thinking about (A)</think>The best option is (D) up-left", OK, "D"),
        ("<answer>x</answer><answer>\\boxed{C}</answer>", OK, "C"),
        ("Final: \\boxed{\\text{B}}", OK, "B"),
        ("It moves down.", OK, "B"),
        ("up-left", OK, "D"),
        ("A or B", AMBIGUOUS, "AB"),
        ("(A) and (C) both fit", AMBIGUOUS, "AC"),
        ("I cannot tell from the video.", UNANSWERED, None),
        ("", UNANSWERED, None),
        ("<think>long reasoning that was cut", UNANSWERED, None),
        ("E", UNANSWERED, None),  # not one of the four letters
    ],
)
def test_extract_choice(output, status, value):
    got = extract_choice(output, OPTS)
    assert (got.status, got.value) == (status, value)


@pytest.mark.parametrize(
    "output, status, value",
    [
        ("是", OK, "是"),
        ("否", OK, "否"),
        ("<think>看起来像是同一个商品吗？不一定</think>否", OK, "否"),
        ("不是", OK, "否"),
        ("Yes.", OK, "是"),
        ("no", OK, "否"),
        ("是，不是色情评论以外的内容", OK, "是"),
        ("这个问题是否成立很难说", UNANSWERED, None),
        ("可能是也可能否", AMBIGUOUS, "是否"),
        ("<answer>\\boxed{是}</answer>", OK, "是"),
        ("not sure", UNANSWERED, None),
    ],
)
def test_extract_yes_no(output, status, value):
    got = extract_yes_no(output)
    assert (got.status, got.value) == (status, value)


def test_extract_yes_no_list():
    assert extract_yes_no_list("<think>…</think>结论：[是, 否, 是]").value == "是_否_是"
    assert extract_yes_no_list("【否，否】").value == "否_否"
    assert extract_yes_no_list("先是[1,2]，然后[是,是]").value == "是_是"
    assert extract_yes_no_list("是_否").value == "是_否"
    assert extract_yes_no_list("第二个视频和第一个相同").status == UNANSWERED
    assert normalize_yes_no_list("yes_No_是") == "是_否_是"


def test_split_option_prefix():
    assert split_option_prefix("(B) left") == ("B", "left")
    assert split_option_prefix("C. a cat") == ("C", "a cat")
    assert split_option_prefix("A cat sits") == (None, "A cat sits")
