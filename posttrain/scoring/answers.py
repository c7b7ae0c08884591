"""Final-answer extraction and comparison for verifiable rewards (spec §9, DeepSeek-R1-Zero).

`extract_answer` looks, in order of preference, for
1. the content of the LAST `<answer>…</answer>` (the R1-Zero format),
2. the content of the LAST `\\boxed{…}`, read with balanced braces so `\\boxed{\\frac{1}{2}}`
   gives `\\frac{1}{2}` (the MATH convention),
3. the LAST number in the text (GSM8K-style free text),
and returns None when there is none of these. The last occurrence wins because models often
restate intermediate results before the final one.

`answers_match` compares numerically, with tolerance, when both sides read as numbers
("1,000", " 42 ", "42.0", "-3/4", "\\frac{3}{4}", "0.75" all parse), else compares the
normalised strings.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\s*\{")
# An optional sign, then 1,234,567 (thousand separators) or plain digits or .5, then an optional
# decimal part and an optional /denominator. "42." at a sentence end gives "42".
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?:\.\d+)?(?:/\d+)?")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces balance, else None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in a completion: last <answer> tag, else last \\boxed{}, else last number."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(s: str) -> str:
    """Canonical text of an answer: trimmed, lower-case, single spaces, no `$…$`, `\\text{}`,
    `\\left`/`\\right` or trailing full stop, and `\\frac{a}{b}` written as `a/b`."""
    s = str(s).strip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s.strip("$").strip()
    s = _TEXT.sub(r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = _FRAC.sub(r"(\1)/(\2)", s)
    s = re.sub(r"\((-?[\d.]+)\)", r"\1", s)  # "(3)/(4)" -> "3/4" once the parts are plain numbers
    s = " ".join(s.split()).lower()
    return s.rstrip(".").strip()


def parse_number(s: str) -> float | None:
    """The value of a numeric answer ("1,000", "42.0", "-3/4", "\\frac{3}{4}", "1e-3"), else None."""
    s = normalize_answer(s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = s.replace(" ", "")
    try:
        value = float(Fraction(s))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def answers_match(pred: str | None, ref: str, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Whether a predicted answer equals the reference: numerically with tolerance when both are
    numbers, else as normalised strings. A missing prediction (None) never matches."""
    if pred is None or ref is None:
        return False
    pred_value, ref_value = parse_number(str(pred)), parse_number(str(ref))
    if pred_value is not None and ref_value is not None:
        return math.isclose(pred_value, ref_value, rel_tol=rel_tol, abs_tol=abs_tol)
    return normalize_answer(str(pred)) == normalize_answer(str(ref))


def is_correct(completion: str, reference) -> bool:
    """Whether a completion's extracted final answer equals the reference (None never does)."""
    if reference is None:
        return False
    return answers_match(extract_answer(completion), str(reference))
