"""Final-answer extraction and tolerant comparison (spec §9)."""

from __future__ import annotations

import pytest

from posttrain.scoring.answers import answers_match, extract_answer, normalize_answer, parse_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>2+2</think><answer>4</answer>", "4"),
        ("<answer>1</answer> no wait <answer> 42 </answer>", "42"),  # the last tag wins, trimmed
        ("<answer>7</answer> and \\boxed{8}", "7"),  # tags before \boxed
        ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # nested braces balance
        ("\\boxed{3} first, then \\boxed{{a}+{b}}", "{a}+{b}"),
        ("First 3, then 4.5.", "4.5"),  # last number; the full stop is not a decimal
        ("It costs 1,000,000 dollars", "1,000,000"),
        ("about -3/4 of it", "-3/4"),
        ("\\boxed{unclosed 12", "12"),  # unbalanced \boxed falls back to the last number
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("1,000", "1000"),
        ("  42 ", "42"),
        ("42.0", "42"),
        ("3/4", "0.75"),
        ("\\frac{3}{4}", "0.75"),
        ("\\dfrac{3}{4}", "3/4"),
        ("-0.5", "-1/2"),
        ("42.0000001", "42"),  # within rel_tol 1e-6
        ("1e3", "1000"),
        ("$5$", "5"),
        ("\\text{Yes}", "yes"),
        ("Paris.", "paris"),
    ],
)
def test_answers_match(pred, ref):
    assert answers_match(pred, ref)


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("42.001", "42"),
        ("41", "42"),
        ("1,2", "12"),
        ("3/0", "3"),
        (None, "1"),
        ("no", "yes"),
        ("", "0"),
    ],
)
def test_answers_do_not_match(pred, ref):
    assert not answers_match(pred, ref)


def test_tolerances_are_parameters():
    assert answers_match("42.001", "42", rel_tol=1e-3)
    assert not answers_match("0.0001", "0", rel_tol=0.0, abs_tol=1e-9)
    assert answers_match("0.0001", "0", rel_tol=0.0, abs_tol=1e-3)


def test_normalize_and_parse():
    assert normalize_answer("  The   ANSWER. ") == "the answer"
    assert parse_number("1,234.5") == 1234.5
    assert parse_number("abc") is None
    assert parse_number("inf") is None
