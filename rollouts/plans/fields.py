"""The validator's building blocks: an error collector, typed field readers that name the field and the
reason, and the parsers of one SLO, one guardrail and one step."""

from __future__ import annotations

import math
from typing import Any

from experiments.metrics import METRICS
from rollouts.plans.model import (
    _SLO_RE,
    _STEP_KEYS,
    DEFAULT_STEP_DURATION_S,
    DEFAULT_STEP_REQUESTS,
    MAX_DURATION_S,
    Guardrail,
    Slo,
    Step,
)


class _Errors:
    def __init__(self) -> None:
        self.errors: dict[str, list[str]] = {}

    def add(self, path: str, message: str) -> None:
        self.errors.setdefault(path, []).append(message)

    def __bool__(self) -> bool:
        return bool(self.errors)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _fraction(errors: _Errors, path: str, value: Any, *, allow_zero: bool, allow_one: bool = True) -> float | None:
    """A share written as 0.25 or "25%"."""
    number: float | None
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            number = float(value.strip()[:-1]) / 100.0
        except ValueError:
            number = None
    else:
        number = _number(value)
    low = "0" if allow_zero else "more than 0"
    high = "1" if allow_one else "less than 1"
    if number is None:
        errors.add(path, f"must be a fraction from {low} to {high} (0.25) or a percentage ('25%')")
        return None
    if number < 0 or number > 1 or (number == 0 and not allow_zero) or (number == 1 and not allow_one):
        errors.add(path, f"must be from {low} to {high}, got {value!r}")
        return None
    return number


def _integer(errors: _Errors, path: str, value: Any, *, minimum: int, maximum: int) -> int | None:
    number = _number(value)
    if number is None or not number.is_integer():
        errors.add(path, "must be a whole number")
        return None
    if not minimum <= number <= maximum:
        errors.add(path, f"must be from {minimum} to {maximum}, got {int(number)}")
        return None
    return int(number)


def _boolean(errors: _Errors, path: str, value: Any) -> bool | None:
    if not isinstance(value, bool):
        errors.add(path, "must be true or false")
        return None
    return value


def _mapping(errors: _Errors, path: str, value: Any, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.add(path, "must be a mapping")
        return {}
    for key in value:
        if key not in allowed:
            errors.add(f"{path}.{key}", f"unknown field (expected one of {', '.join(sorted(allowed))})")
    return value


def _version_ref(errors: _Errors, path: str, value: Any, *, required: bool) -> str | None:
    if value is None or value == "":
        if required:
            errors.add(path, "required: a model version label (adder-v2) or id")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        errors.add(path, "must be a model version label (adder-v2) or id")
        return None
    return str(value)


def _parse_slo(errors: _Errors, path: str, raw: Any) -> Slo | None:
    if isinstance(raw, str):
        match = _SLO_RE.match(raw)
        if not match:
            errors.add(path, "write an SLO as 'metric <= number' or 'metric >= number' (ttft_p99_ms <= 800)")
            return None
        name, op, number_text = match.groups()
        try:
            threshold = float(number_text[:-1]) / 100 if number_text.endswith("%") else float(number_text)
        except ValueError:
            errors.add(path, f"{number_text!r} is not a number")
            return None
        op = {"<": "<=", ">": ">="}.get(op, op)
    elif isinstance(raw, dict):
        _mapping(errors, path, raw, {"metric", "max", "min"})
        name = raw.get("metric")
        if not isinstance(name, str):
            errors.add(f"{path}.metric", "required: a metric name")
            return None
        if ("max" in raw) == ("min" in raw):
            errors.add(path, "give exactly one of max or min")
            return None
        op = "<=" if "max" in raw else ">="
        value = _number(raw.get("max", raw.get("min")))
        if value is None:
            errors.add(f"{path}.{'max' if op == '<=' else 'min'}", "must be a number")
            return None
        threshold = value
    else:
        errors.add(path, "must be 'metric <= number' or a mapping {metric, max | min}")
        return None
    metric = METRICS.get(name)
    if metric is None:
        errors.add(f"{path}.metric", f"unknown metric {name!r} (known: {', '.join(sorted(METRICS))})")
        return None
    if metric.shape == "percentile" and op != "<=":
        errors.add(path, f"{name} is a latency percentile: only an upper limit (<=) makes sense")
        return None
    if metric.shape == "proportion" and not 0 < threshold < 1:
        errors.add(path, f"{name} is a share: its limit must be between 0 and 1 exclusive, got {threshold:g}")
        return None
    if metric.is_latency and threshold <= 0:
        errors.add(path, f"{name} limit must be positive, got {threshold:g}")
        return None
    return Slo(metric=name, op=op, threshold=threshold)


def _parse_guardrail(errors: _Errors, path: str, raw: Any) -> Guardrail | None:
    if not isinstance(raw, dict):
        errors.add(path, "must be a mapping {metric, margin, relative}")
        return None
    _mapping(errors, path, raw, {"metric", "margin", "relative"})
    name = raw.get("metric")
    metric = METRICS.get(name) if isinstance(name, str) else None
    if metric is None:
        errors.add(f"{path}.metric", f"unknown metric {name!r} (known: {', '.join(sorted(METRICS))})")
        return None
    margin_raw = raw.get("margin")
    relative = raw.get("relative")
    margin: float | None
    if isinstance(margin_raw, str) and margin_raw.strip().endswith("%"):
        try:
            margin = float(margin_raw.strip()[:-1]) / 100
        except ValueError:
            margin = None
        if relative is False:
            errors.add(f"{path}.relative", "a percentage margin is relative")
            return None
        relative = True
    else:
        margin = _number(margin_raw)
    if margin is None or margin < 0:
        errors.add(f"{path}.margin", "required: a non-negative number (0.005) or a percentage ('10%')")
        return None
    if relative is None:
        relative = False
    if not isinstance(relative, bool):
        errors.add(f"{path}.relative", "must be true or false")
        return None
    if metric.shape == "percentile" and not relative:
        # A tail guardrail compares the arms' quantiles as a ratio (experiments.stats.quantiles).
        errors.add(f"{path}.margin", f"{name} is compared as a ratio of the arms' quantiles: give the margin as a percentage ('10%')")
        return None
    if metric.shape == "gmean" and not relative:
        errors.add(f"{path}.margin", f"{name} is compared as a ratio of geometric means: give the margin as a percentage ('10%')")
        return None
    if relative and metric.direction == "higher_is_better" and margin >= 1:
        errors.add(f"{path}.margin", f"{name} is better higher: a relative margin must be below 100 %")
        return None
    if metric.shape == "proportion" and not relative and margin >= 1:
        errors.add(f"{path}.margin", f"{name} is a share: an absolute margin must be below 1")
        return None
    return Guardrail(metric=metric.name, margin=margin, relative=relative)


def _parse_step(errors: _Errors, path: str, raw: Any, *, default_shadow: float) -> Step | None:
    if not isinstance(raw, dict):
        errors.add(path, "must be a mapping {weight, min_duration_s, min_candidate_requests, requires_approval}")
        return None
    _mapping(errors, path, raw, _STEP_KEYS)
    if "weight" not in raw:
        errors.add(f"{path}.weight", "required: the candidate's share of users, 0 to 1 or '10%'")
        return None
    weight = _fraction(errors, f"{path}.weight", raw["weight"], allow_zero=True)
    shadow = default_shadow
    if "shadow_rate" in raw:
        shadow = _fraction(errors, f"{path}.shadow_rate", raw["shadow_rate"], allow_zero=True) or 0.0
    duration = _integer(
        errors, f"{path}.min_duration_s", raw.get("min_duration_s", DEFAULT_STEP_DURATION_S), minimum=0, maximum=MAX_DURATION_S
    )
    requests = _integer(
        errors, f"{path}.min_candidate_requests", raw.get("min_candidate_requests", DEFAULT_STEP_REQUESTS),
        minimum=0, maximum=10**9,
    )  # fmt: skip
    approval = _boolean(errors, f"{path}.requires_approval", raw.get("requires_approval", False))
    if weight is None or duration is None or requests is None or approval is None:
        return None
    return Step(weight, shadow, duration, requests, approval)

