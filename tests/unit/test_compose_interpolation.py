"""Compose's interpolation grammar and .env files (desired/compose/interpolation)."""

from __future__ import annotations

import pytest

from cynchrod.desired.compose import interpolation as ip

ENV = {"SET": "value", "EMPTY": ""}


@pytest.mark.parametrize(("text", "expected"), [
    ("plain", "plain"),
    ("$SET", "value"),
    ("${SET}", "value"),
    ("a-${SET}-b", "a-value-b"),
    ("${UNSET}", ""),
    ("${UNSET:-d}", "d"),
    ("${EMPTY:-d}", "d"),
    ("${EMPTY-d}", ""),
    ("${UNSET-d}", "d"),
    ("${SET:-d}", "value"),
    ("${SET:+alt}", "alt"),
    ("${EMPTY:+alt}", ""),
    ("${EMPTY+alt}", "alt"),
    ("${UNSET:-${SET}}", "value"),
    ("${UNSET:-x${UNSET2:-y}z}", "xyz"),
    ("$$SET", "$SET"),
    ("cost: $$5", "cost: $5"),
    ("${SET:?must}", "value"),
    ("${EMPTY?must}", ""),
])
def test_interpolation(text: str, expected: str) -> None:
    assert ip.interpolate(text, ENV) == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("${UNSET:?set UNSET please}", "required variable UNSET is missing a value: set UNSET please"),
    ("${EMPTY:?}", "required variable EMPTY is missing a value"),
    ("${UNSET?x}", "required variable UNSET"),
    ("${SET", "without its }"),
    ("${}", "needs a variable name"),
    ("a $ b", "lone $"),
    ("${SET!x}", "unexpected text"),
])
def test_interpolation_errors(text: str, fragment: str) -> None:
    with pytest.raises(ip.InterpolationError, match=None) as info:
        ip.interpolate(text, ENV)
    assert fragment in info.value.message


def test_env_file() -> None:
    text = ("# comment\n\nexport A=1\nB = two words # comment\nC='lit $A'\nD=\"x\\ny $A\"\nE=${A}-${B}\n"
            "F=#notcomment\nBARE\n")
    assert ip.parse_env_file(text) == {"A": "1", "B": "two words", "C": "lit $A", "D": "x\ny 1", "E": "1-two words",
                                       "F": "#notcomment"}


def test_env_file_bad_line_says_which() -> None:
    with pytest.raises(ip.InterpolationError, match="expected KEY=VALUE") as info:
        ip.parse_env_file("A=1\nnot a line\n")
    assert info.value.line == 2
