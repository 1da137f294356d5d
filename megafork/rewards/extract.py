"""Answer extraction and normalisation for verifiable math rewards.

    extract_answer("... so Answer: 42")            -> "42"     (DAPO format, last occurrence)
    extract_boxed(r"thus \\boxed{\\frac{1}{2}}")    -> r"\\frac{1}{2}" (nested braces)
    normalize_answer(" $1,000.$ ")                 -> "1000"
    answers_match("0.50", "1/2")                   -> True

`answers_match` uses math-verify (`pip install math-verify`) when it is installed, and the exact
string/number comparison below otherwise; which one ran is visible in `VERIFIER`.
"""
from __future__ import annotations

import re
from fractions import Fraction

# DAPO's format: "Answer: X" where X runs to the end of its line. The last occurrence wins, since a
# model that changes its mind restates the answer at the end.
_ANSWER_RE = re.compile(r"Answer[ \t]*:[ \t]*([^\n]*)", re.IGNORECASE)
_BOXED_HEADS = ("\\boxed{", "\\fbox{")


def extract_answer(text: str) -> str | None:
    """The text after the last "Answer:" on its line, stripped; None when absent or empty.

    Args:
        text: a model response.
    """
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    value = matches[-1].strip()
    return value or None


def extract_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` (or `\fbox{...}`), honouring nested braces.

    Returns None when there is no box or its braces never close.

    Args:
        text: a model response.
    """
    start = max(text.rfind(h) for h in _BOXED_HEADS)
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def extract_final(text: str) -> str | None:
    r"""The response's final answer: a `\boxed{}` inside the "Answer:" line or anywhere, else the
    "Answer:" text; None when neither exists."""
    answer = extract_answer(text)
    if answer is not None:
        boxed = extract_boxed(answer)
        return boxed if boxed is not None else answer
    return extract_boxed(text)


_LATEX_WRAPPERS = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")


def normalize_answer(answer: str) -> str:
    r"""Canonical string form used for comparison.

    Strips `$`, surrounding spaces, a trailing period, `\left`/`\right`, `\!` and spaces, unwraps
    `\text{}`-like wrappers, turns `\frac{a}{b}` into `a/b`, drops thousands separators in plain
    numbers and trailing zeros after a decimal point.

    Args:
        answer: an extracted answer.
    """
    s = answer.strip().strip("$").strip()
    s = s.rstrip(".").strip()
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = _LATEX_WRAPPERS.sub(r"\1", s)
    s = _FRAC.sub(r"\1/\2", s)
    s = s.replace(" ", "")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"[-+]?\d+\.\d*", s):
        s = s.rstrip("0").rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    return s


def _as_number(s: str) -> Fraction | None:
    try:
        if re.fullmatch(r"-?\d+/\d+", s):
            return Fraction(s)
        if re.fullmatch(r"-?\d+(\.\d+)?", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _math_verify():
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


VERIFIER = "math_verify" if _math_verify() is not None else "normalized_string"


def answers_match(predicted: str | None, ground_truth: str) -> bool:
    """Whether a predicted answer equals the ground truth.

    Exact after `normalize_answer`, or numerically equal (fractions and decimals); math-verify's
    symbolic check is added when installed.

    Args:
        predicted: the extracted answer (None counts as wrong).
        ground_truth: the reference answer.
    """
    if predicted is None:
        return False
    p, g = normalize_answer(predicted), normalize_answer(ground_truth)
    if p == g:
        return True
    pn, gn = _as_number(p), _as_number(g)
    if pn is not None and gn is not None:
        return pn == gn
    mv = _math_verify()
    if mv is not None:
        try:
            return bool(mv.verify(mv.parse(f"${ground_truth}$"), mv.parse(f"${predicted}$")))
        except Exception:  # math-verify raises on unparsable LaTeX; that answer is simply wrong
            return False
    return False
