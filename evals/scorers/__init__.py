"""Scorers: small pure classes with parameters, built from specs like
`{"name": "numeric", "params": {"tolerance": 0.5}, "label": "close-enough"}`.

`label` (default: the name) keys the scores in results, so one run may hold two regex scorers."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .base import Score, ScoreInput, Scorer, ScorerSpecError
from .judge import (
    FLIP_SUFFIX,
    Judge,
    JudgeCall,
    UnparseableVerdict,
    parse_pairwise_verdict,
    parse_rubric_verdict,
)
from .similarity import Similarity, encoder_for
from .structured import JsonSchema, JsonValid
from .text import Contains, ExactMatch, Numeric, Regex

SCORERS: dict[str, Any] = {
    cls.name: cls for cls in (ExactMatch, Contains, Regex, Numeric, JsonValid, JsonSchema, Similarity, Judge)
}
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_SCORERS = 10


def scorer_spec_normalise(spec: Any) -> dict[str, Any]:
    """{"name", "label", "params"} with the params checked by building the scorer once."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise ScorerSpecError("a scorer is a name or an object {name, params, label}")
    unknown = sorted(set(spec) - {"name", "params", "label"})
    if unknown:
        raise ScorerSpecError(f"unknown key {unknown[0]!r} (allowed: name, params, label)", field=unknown[0])
    name = spec.get("name")
    if name not in SCORERS:
        raise ScorerSpecError(f"name must be one of {', '.join(sorted(SCORERS))}", field="name")
    params = spec.get("params") or {}
    if not isinstance(params, Mapping):
        raise ScorerSpecError("params must be an object", field="params")
    label = spec.get("label") or name
    if not isinstance(label, str) or not _LABEL.match(label):
        raise ScorerSpecError("label must be 1-64 letters, digits, '.', '_' or '-'", field="label")
    SCORERS[name].from_params(params)
    return {"name": name, "label": label, "params": dict(params)}


def scorer_specs_normalise(specs: Any, *, field: str = "scorers") -> list[dict[str, Any]]:
    """A non-empty list of specs with distinct labels; errors name the spec, e.g. "scorers[1].params.pattern"."""
    if isinstance(specs, (str, Mapping)):
        specs = [specs]
    if not isinstance(specs, list) or not specs:
        raise ScorerSpecError("give at least one scorer", field=field)
    if len(specs) > MAX_SCORERS:
        raise ScorerSpecError(f"at most {MAX_SCORERS} scorers", field=field)
    normalised: list[dict[str, Any]] = []
    for index, spec in enumerate(specs):
        try:
            one = scorer_spec_normalise(spec)
        except ScorerSpecError as exc:
            where = f"{field}[{index}]" + (f".{exc.field}" if exc.field else "")
            raise ScorerSpecError(exc.message, field=where) from exc
        if any(other["label"] == one["label"] for other in normalised):
            raise ScorerSpecError(f"two scorers are labelled {one['label']!r}; give one a label",
                                  field=f"{field}[{index}].label")
        normalised.append(one)
    return normalised


def scorer_build(spec: Mapping[str, Any]) -> Scorer:
    """A scorer from a normalised spec."""
    scorer: Scorer = SCORERS[spec["name"]].from_params(spec.get("params") or {})
    return scorer


__all__ = [
    "FLIP_SUFFIX",
    "SCORERS",
    "Contains",
    "ExactMatch",
    "JsonSchema",
    "JsonValid",
    "Judge",
    "JudgeCall",
    "Numeric",
    "Regex",
    "Score",
    "ScoreInput",
    "Scorer",
    "ScorerSpecError",
    "Similarity",
    "UnparseableVerdict",
    "encoder_for",
    "parse_pairwise_verdict",
    "parse_rubric_verdict",
    "scorer_build",
    "scorer_spec_normalise",
    "scorer_specs_normalise",
]
