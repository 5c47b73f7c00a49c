"""Scorers on structured output: valid JSON, and JSON valid under a JSON Schema."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import jsonschema

from .base import Score, ScoreInput, Scorer, ScorerSpecError, check_unknown, param

# Models often wrap JSON in a Markdown fence; reading through one is allowed unless `strict` is set.
_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n?```\s*$", re.DOTALL)


def parse_json_output(text: str, *, strict: bool) -> tuple[Any, str]:
    """(value, "") or (None, why it is not JSON)."""
    body = text
    if not strict:
        fenced = _FENCE.match(text)
        if fenced:
            body = fenced.group(1)
    try:
        return json.loads(body), ""
    except (json.JSONDecodeError, RecursionError) as exc:
        return None, f"not JSON: {exc}"


class JsonValid(Scorer):
    name = "json_valid"

    def __init__(self, *, strict: bool = False):
        self.strict = strict

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> JsonValid:
        check_unknown(params, {"strict"})
        return cls(strict=param(params, "strict", bool, False))

    def score(self, case: ScoreInput) -> Score:
        _, problem = parse_json_output(case.output, strict=self.strict)
        return Score.of(not problem, detail=problem)


class JsonSchema(Scorer):
    """The output is JSON and valid under `schema` (any draft jsonschema knows; `$schema` picks it)."""

    name = "json_schema"

    def __init__(self, *, schema: Mapping[str, Any], strict: bool = False):
        try:
            validator_class = jsonschema.validators.validator_for(schema)
            validator_class.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ScorerSpecError(f"schema is not a valid JSON Schema: {exc.message}", field="params.schema") from exc
        self.validator = validator_class(schema)
        self.strict = strict

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> JsonSchema:
        check_unknown(params, {"schema", "strict"})
        return cls(schema=param(params, "schema", dict, required=True), strict=param(params, "strict", bool, False))

    def score(self, case: ScoreInput) -> Score:
        value, problem = parse_json_output(case.output, strict=self.strict)
        if problem:
            return Score.of(False, detail=problem)
        error = jsonschema.exceptions.best_match(self.validator.iter_errors(value))
        if error is None:
            return Score.of(True)
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return Score.of(False, detail=f"{where}: {error.message}")
