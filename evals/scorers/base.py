"""What every scorer shares. Scorers are plain Python (no Django): each takes a model's output and the
item's reference and returns a `Score`; a scorer that cannot score an item says why instead of raising."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

ERROR_MAX_CHARS = 300


class ScorerSpecError(ValueError):
    """A scorer spec that cannot be used; `field` names the parameter at fault (e.g. "params.pattern")."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True)
class Score:
    """One scorer's verdict on one item.

    `value` is in [0, 1] for every built-in scorer (1 = right); `passed` is the pass/fail reading used by
    McNemar's test. Both are None when the scorer could not score the item, and `error` says why."""

    value: float | None
    passed: bool | None
    error: str = ""
    detail: str = ""
    # A pairwise judge asked twice, the answers swapped: whether its two verdicts disagreed (position bias).
    flipped: bool | None = None

    def __post_init__(self) -> None:
        if self.value is not None and not math.isfinite(self.value):
            raise ValueError(f"a score must be finite, got {self.value!r}")
        if self.value is None and not self.error:
            raise ValueError("a score without a value must say why (error)")

    @classmethod
    def of(cls, passed: bool, *, detail: str = "") -> Score:
        return cls(value=1.0 if passed else 0.0, passed=passed, detail=detail)

    @classmethod
    def failure(cls, error: str) -> Score:
        return cls(value=None, passed=None, error=error[:ERROR_MAX_CHARS])

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"value": self.value, "passed": self.passed}
        if self.error:
            body["error"] = self.error
        if self.detail:
            body["detail"] = self.detail[:ERROR_MAX_CHARS]
        if self.flipped is not None:
            body["flipped"] = self.flipped
        return body


@dataclass(frozen=True)
class ScoreInput:
    """What a scorer sees of one item: the model's output, the reference, and the question asked."""

    output: str
    reference: str | None = None
    prompt: str = ""
    metadata: Mapping[str, Any] | None = None


class Scorer:
    """Base class: subclasses set `name` and `binary` and implement `score`.

    `binary` scorers are pass/fail (compared with exact McNemar); the others are graded (paired bootstrap)."""

    name: ClassVar[str] = ""
    binary: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = False

    def score(self, case: ScoreInput) -> Score:
        raise NotImplementedError

    def __call__(self, case: ScoreInput) -> Score:
        if self.needs_reference and case.reference is None:
            return Score.failure("the item has no reference answer")
        try:
            return self.score(case)
        except Exception as exc:  # a scorer bug on one item must not stop a whole run
            return Score.failure(f"{type(exc).__name__}: {exc}")


def param(params: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None, *,
          required: bool = False) -> Any:
    """A typed parameter from a spec, or ScorerSpecError naming it."""
    if key not in params:
        if required:
            raise ScorerSpecError(f"{key} is required", field=f"params.{key}")
        return default
    value = params[key]
    # bool is an int in Python; a flag given where a number is wanted is a mistake.
    if isinstance(value, bool) and kind is not bool and not (isinstance(kind, tuple) and bool in kind):
        raise ScorerSpecError(f"{key} must be {_kind_name(kind)}, not a boolean", field=f"params.{key}")
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind):
        raise ScorerSpecError(f"{key} must be {_kind_name(kind)}", field=f"params.{key}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object",
             list: "a list"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def check_unknown(params: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ScorerSpecError(
            f"unknown parameter {unknown[0]!r} (allowed: {', '.join(sorted(allowed)) or 'none'})",
            field=f"params.{unknown[0]}",
        )
