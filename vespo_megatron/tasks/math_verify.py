"""Checking a free-form math response against a ground-truth answer, with exact rational comparison.

The final answer of a response is the content of its last `\\boxed{...}` (nested braces allowed) or, without one,
its last number. Numbers are parsed to `fractions.Fraction`: signs, thousands separators, decimals, `a/b`,
`\\frac{a}{b}` / `\\dfrac` / `\\tfrac`, `$...$`, a trailing period and a trailing percent sign (ignored: "50%"
matches "50") are understood, so "0.75", "3/4" and "\\frac{3}{4}" are the same answer. Answers that are not numbers
are compared as text with whitespace and `$` removed. Rules are listed in docs/tasks.md.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_FRAC = r"\\[dt]?frac"
# A minus is a sign only where it cannot be a binary operator: not after a digit, letter, or closing bracket.
_SIGN = r"(?:(?<![\w)\]}.])[-+])?"
_PLAIN = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_IN_TEXT = re.compile(
    rf"{_SIGN}{_FRAC}\s*\{{\s*[-+]?[\d.,]+\s*\}}\s*\{{\s*[-+]?[\d.,]+\s*\}}"  # \frac{3}{4}
    rf"|{_SIGN}(?:{_PLAIN})\s*/\s*(?:{_PLAIN})"  # 3/4
    rf"|{_SIGN}(?:{_PLAIN})"  # 12, 1,234.5, .5
)
_FULL_FRAC = re.compile(rf"([-+]?){_FRAC}\{{([-+]?[\d.]+)\}}\{{([-+]?[\d.]+)\}}")
_FULL_RATIO = re.compile(r"([-+]?[\d.]+)/([-+]?[\d.]+)")
_FULL_DECIMAL = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` in `text`, braces balanced; None if there is none."""
    start = max(text.rfind(cmd + "{") for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    open_at = text.index("{", start)
    depth = 0
    for pos in range(open_at, len(text)):
        if text[pos] == "{":
            depth += 1
        elif text[pos] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : pos]
    return None  # unbalanced: the box was cut off


def _normalise(text: str) -> str:
    text = text.replace("\u2212", "-").replace("{,}", ",").replace("\\,", "").replace("\\!", "")
    text = text.replace("\\left", "").replace("\\right", "").replace("\\%", "%").replace("$", "")
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\s+", "", text)
    return text.rstrip(".")


def _decimal(text: str) -> Fraction | None:
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    if not _FULL_DECIMAL.fullmatch(text):
        return None
    return Fraction(text)


def parse_number(text: str) -> Fraction | None:
    """`text` as an exact rational if the whole of it is one number, else None (also for a zero denominator)."""
    text = _normalise(text)
    if text.endswith("%"):
        text = text[:-1]
    boxed = last_boxed(text)
    if boxed is not None:
        return parse_number(boxed)
    while text[:1] + text[-1:] in ("()", "{}"):
        text = text[1:-1]
    if match := _FULL_FRAC.fullmatch(text):
        sign, num, den = match.groups()
    elif match := _FULL_RATIO.fullmatch(text.replace(",", "") if "/" in text else ""):
        sign, (num, den) = "", match.groups()
    else:
        return _decimal(text)
    num, den = _decimal(num), _decimal(den)
    if num is None or den is None or den == 0:
        return None
    value = num / den
    return -value if sign == "-" else value


def extract_answer(response: str) -> str | None:
    """The final-answer text of a response: last `\\boxed{}` content, else the last number; None if neither."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    matches = _NUMBER_IN_TEXT.findall(response.replace("\u2212", "-"))
    return matches[-1] if matches else None


def answers_match(response: str, answer: str) -> bool:
    """True when the final answer of `response` equals `answer` (exactly as rationals when both are numbers)."""
    predicted = extract_answer(response)
    if predicted is None:
        return False
    expected_value = parse_number(answer)
    if expected_value is not None:
        value = parse_number(predicted)
        if value is None and "=" in predicted:  # \boxed{x = 5}
            value = parse_number(predicted.rsplit("=", 1)[1])
        return value == expected_value
    return _normalise(predicted) == _normalise(answer)


def math_reward(response: str, answer: str) -> float:
    """1.0 if `answers_match(response, answer)` else 0.0."""
    return 1.0 if answers_match(response, answer) else 0.0
