"""Scorers on text: exact match, contains, regex, and numbers with a tolerance."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .base import Score, ScoreInput, Scorer, ScorerSpecError, check_unknown, param

MAX_PATTERN_CHARS = 1000
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_SPACES = re.compile(r"\s+")


def _normalise(text: str, *, strip: bool, case_sensitive: bool, collapse_whitespace: bool) -> str:
    if collapse_whitespace:
        text = _SPACES.sub(" ", text)
    if strip:
        text = text.strip()
    if not case_sensitive:
        text = text.casefold()
    return text


class ExactMatch(Scorer):
    """The output equals the reference (after stripping whitespace at the ends, by default)."""

    name = "exact_match"
    needs_reference = True

    def __init__(self, *, strip: bool = True, case_sensitive: bool = True, collapse_whitespace: bool = False):
        self.strip = strip
        self.case_sensitive = case_sensitive
        self.collapse_whitespace = collapse_whitespace

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ExactMatch:
        check_unknown(params, {"strip", "case_sensitive", "collapse_whitespace"})
        return cls(
            strip=param(params, "strip", bool, True),
            case_sensitive=param(params, "case_sensitive", bool, True),
            collapse_whitespace=param(params, "collapse_whitespace", bool, False),
        )

    def score(self, case: ScoreInput) -> Score:
        options = {"strip": self.strip, "case_sensitive": self.case_sensitive,
                   "collapse_whitespace": self.collapse_whitespace}
        return Score.of(_normalise(case.output, **options) == _normalise(case.reference or "", **options))


class Contains(Scorer):
    """The output contains a fixed substring, or the item's reference when none is given."""

    name = "contains"

    def __init__(self, *, substring: str | None = None, case_sensitive: bool = True):
        self.substring = substring
        self.case_sensitive = case_sensitive

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Contains:
        check_unknown(params, {"substring", "case_sensitive"})
        substring = param(params, "substring", str)
        if substring == "":
            raise ScorerSpecError("substring must not be empty", field="params.substring")
        return cls(substring=substring, case_sensitive=param(params, "case_sensitive", bool, True))

    def score(self, case: ScoreInput) -> Score:
        needle = self.substring if self.substring is not None else case.reference
        if not needle:
            return Score.failure("no substring given and the item has no reference answer")
        haystack = case.output
        if not self.case_sensitive:
            needle, haystack = needle.casefold(), haystack.casefold()
        return Score.of(needle in haystack)


class Regex(Scorer):
    """The output matches a regular expression (`search` anywhere by default, or `fullmatch`)."""

    name = "regex"
    _FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}

    def __init__(self, *, pattern: str, flags: str = "", mode: str = "search"):
        compiled = 0
        for letter in flags:
            if letter not in self._FLAGS:
                raise ScorerSpecError(f"flag {letter!r} is not one of i, m, s", field="params.flags")
            compiled |= self._FLAGS[letter]
        if len(pattern) > MAX_PATTERN_CHARS:
            raise ScorerSpecError(f"pattern is longer than {MAX_PATTERN_CHARS} characters", field="params.pattern")
        try:
            self.pattern = re.compile(pattern, compiled)
        except re.error as exc:
            raise ScorerSpecError(f"pattern is not a valid regular expression: {exc}", field="params.pattern") from exc
        if mode not in ("search", "fullmatch"):
            raise ScorerSpecError("mode must be 'search' or 'fullmatch'", field="params.mode")
        self.mode = mode

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Regex:
        check_unknown(params, {"pattern", "flags", "mode"})
        return cls(
            pattern=param(params, "pattern", str, required=True),
            flags=param(params, "flags", str, ""),
            mode=param(params, "mode", str, "search"),
        )

    def score(self, case: ScoreInput) -> Score:
        match = self.pattern.fullmatch(case.output.strip()) if self.mode == "fullmatch" else self.pattern.search(case.output)
        return Score.of(match is not None)


class Numeric(Scorer):
    """A number read from the output is within a tolerance of the reference number.

    Within means |output - reference| <= max(tolerance, relative_tolerance * |reference|)."""

    name = "numeric"
    needs_reference = True

    def __init__(self, *, tolerance: float = 0.0, relative_tolerance: float = 0.0, extract: str = "first"):
        for key, value in (("tolerance", tolerance), ("relative_tolerance", relative_tolerance)):
            if not (math.isfinite(value) and value >= 0):
                raise ScorerSpecError(f"{key} must be a non-negative number", field=f"params.{key}")
        if extract not in ("first", "last", "whole"):
            raise ScorerSpecError("extract must be 'first', 'last' or 'whole'", field="params.extract")
        self.tolerance = tolerance
        self.relative_tolerance = relative_tolerance
        self.extract = extract

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Numeric:
        check_unknown(params, {"tolerance", "relative_tolerance", "extract"})
        return cls(
            tolerance=param(params, "tolerance", float, 0.0),
            relative_tolerance=param(params, "relative_tolerance", float, 0.0),
            extract=param(params, "extract", str, "first"),
        )

    def read_number(self, text: str) -> float | None:
        if self.extract == "whole":
            return _to_float(text.strip())
        found = _NUMBER.findall(text)
        if not found:
            return None
        return _to_float(found[0] if self.extract == "first" else found[-1])

    def score(self, case: ScoreInput) -> Score:
        expected = _to_float((case.reference or "").strip())
        if expected is None:
            return Score.failure(f"the reference {case.reference!r} is not a number")
        got = self.read_number(case.output)
        if got is None:
            # No number at all is a wrong answer, not a scorer failure: the model did answer.
            return Score.of(False, detail="no number in the output")
        allowed = max(self.tolerance, self.relative_tolerance * abs(expected))
        return Score.of(abs(got - expected) <= allowed)


def _to_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
