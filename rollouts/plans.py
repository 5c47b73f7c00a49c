"""The rollout plan: one schema and one validator for the API, the CLI (through the API) and the UI form.

A plan arrives as JSON or YAML text, or as an already parsed mapping. `plan_normalise` checks its shape
and fills the defaults, and returns a `Plan` whose `to_dict()` is what a rollout stores: every default
written out, every strategy compiled to the same list of steps. Facts that need the database (do the
versions exist, is an engine ready, is the alias free) are checked by `rollouts.services.plan_validate`.

Errors are collected, not raised one at a time, so a form can show each beside its field:
`PlanInvalid.errors` maps a field path such as ``steps[2].weight`` to its reasons.

Strategies, compiled to steps (a step is a candidate weight and a shadow rate held until its minimum
duration and minimum candidate requests are met with no breach, optionally after an approval):

- ``canary``: the steps as written; weights strictly increase; promotion after the last step.
- ``shadow``: one step at weight 0 mirroring ``shadow.rate`` of the traffic; promotion needs an approval
  unless ``promotion_requires_approval`` is false.
- ``ab``: one step at ``ab.weight``; ends when the primary metric's sequential test decides (promote on
  a win, roll back on a loss) or at ``ab.horizon_s`` (the baseline stays).
- ``blue_green``: a warm-up step at weight 0 with ``blue_green.shadow_rate`` mirrored, then weight 1.0
  for ``rollback_window_s`` (rollback is one switch back), then promotion.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import yaml

from config.errors import DomainError
from experiments.metrics import HIGHER, LOWER, METRICS

STRATEGIES = ("canary", "shadow", "ab", "blue_green")
MAX_STEPS = 20
MAX_DURATION_S = 30 * 24 * 3600
DEFAULT_ALPHA = 0.05
DEFAULT_ENGINE_GRACE_S = 30
DEFAULT_STEP_DURATION_S = 60
DEFAULT_STEP_REQUESTS = 50
DEFAULT_AB_HORIZON_S = 7 * 24 * 3600
# A guardrail written by no one still guards against a broken candidate: errors at most one point worse.
DEFAULT_GUARDRAILS: tuple[dict[str, Any], ...] = ({"metric": "error_rate", "margin": 0.01, "relative": False},)

_TOP_LEVEL = {
    "name", "description", "alias", "baseline", "candidate", "strategy", "steps", "shadow", "ab", "blue_green",
    "slos", "guardrails", "primary_metric", "alpha", "tuning_n", "allow_self_approval",
    "promotion_requires_approval", "engine_grace_s", "eval_gate", "failover_to_candidate",
}  # fmt: skip
_STEP_KEYS = {"weight", "shadow_rate", "min_duration_s", "min_candidate_requests", "requires_approval"}
_SLO_RE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|<|>=|>)\s*([-+0-9.eE]+%?)\s*$")
_SLUG_RE = re.compile(r"^[-a-zA-Z0-9_]+$")


class PlanInvalid(DomainError):
    """A plan with one or more errors, each under its field path."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        first_field, reasons = next(iter(errors.items()))
        super().__init__(f"{first_field}: {reasons[0]}", field=first_field)
        self.errors = errors

    def as_dict(self) -> dict[str, object]:
        return {"detail": self.message, "code": self.code, "errors": self.errors}


@dataclass(frozen=True)
class Step:
    weight: float
    shadow_rate: float
    min_duration_s: int
    min_candidate_requests: int
    requires_approval: bool


@dataclass(frozen=True)
class Slo:
    """An absolute objective on the candidate arm: ``metric op threshold``."""

    metric: str
    op: str  # "<=" or ">="
    threshold: float

    @property
    def label(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


@dataclass(frozen=True)
class Guardrail:
    """The candidate may be worse than the baseline on `metric` by at most `margin`.

    `relative`: margin is a fraction of the baseline (0.10 = 10 % worse); else in the metric's units.
    """

    metric: str
    margin: float
    relative: bool

    @property
    def label(self) -> str:
        amount = f"{self.margin:.4g}".rstrip(".") if not self.relative else f"{self.margin * 100:.4g}%"
        return f"{self.metric} at most {amount} worse"


@dataclass(frozen=True)
class PrimaryMetric:
    metric: str
    difference: str  # relative | absolute
    min_effect: float | None


@dataclass(frozen=True)
class ShadowQuality:
    """Shadow-pair quality (scored by the evals app): the candidate's mean score must reach `min_mean`."""

    min_mean: float
    # A scorer name or {name, params, label} (the evals app's scorer spec); normalised by plan_validate.
    scorer: Any = "exact_match"


@dataclass(frozen=True)
class Plan:
    alias: str
    baseline: str | None
    candidate: str
    strategy: str
    steps: tuple[Step, ...]
    slos: tuple[Slo, ...]
    guardrails: tuple[Guardrail, ...]
    primary_metric: PrimaryMetric | None
    alpha: float
    tuning_n: int | None
    allow_self_approval: bool
    promotion_requires_approval: bool
    engine_grace_s: int
    shadow_rate: float
    shadow_quality: ShadowQuality | None
    ab_horizon_s: int | None
    eval_gate: dict[str, Any] | None
    name: str = ""
    description: str = ""
    # While every baseline engine is down, may the baseline's users be served by the candidate?
    failover_to_candidate: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The normalised plan, as a rollout stores it and the API returns it."""
        shadow: dict[str, Any] | None = None
        if self.shadow_rate or self.shadow_quality:
            shadow = {"rate": self.shadow_rate}
            if self.shadow_quality is not None:
                shadow["quality"] = asdict(self.shadow_quality)
        return {
            "name": self.name,
            "description": self.description,
            "alias": self.alias,
            "baseline": self.baseline,
            "candidate": self.candidate,
            "strategy": self.strategy,
            "steps": [asdict(step) for step in self.steps],
            "shadow": shadow,
            "ab": {"horizon_s": self.ab_horizon_s} if self.strategy == "ab" else None,
            "slos": [asdict(slo) for slo in self.slos],
            "guardrails": [asdict(g) for g in self.guardrails],
            "primary_metric": asdict(self.primary_metric) if self.primary_metric else None,
            "alpha": self.alpha,
            "tuning_n": self.tuning_n,
            "allow_self_approval": self.allow_self_approval,
            "promotion_requires_approval": self.promotion_requires_approval,
            "engine_grace_s": self.engine_grace_s,
            "failover_to_candidate": self.failover_to_candidate,
            "eval_gate": self.eval_gate,
        }

    def with_baseline(self, baseline: str) -> Plan:
        return replace(self, baseline=baseline)

    def with_eval_gate(self, spec: dict[str, Any] | None) -> Plan:
        return replace(self, eval_gate=spec)

    def with_shadow_scorer(self, scorer: dict[str, Any]) -> Plan:
        assert self.shadow_quality is not None
        return replace(self, shadow_quality=replace(self.shadow_quality, scorer=scorer))

    @property
    def latency_thresholds(self) -> dict[str, list[float]]:
        """Per latency field, the thresholds of the percentile SLOs (they also define goodput)."""
        out: dict[str, list[float]] = {}
        for slo in self.slos:
            metric = METRICS[slo.metric]
            if metric.shape == "percentile":
                out.setdefault(metric.source, [])
                if slo.threshold not in out[metric.source]:
                    out[metric.source].append(slo.threshold)
        return out

    @property
    def metrics_used(self) -> set[str]:
        used = {slo.metric for slo in self.slos} | {g.metric for g in self.guardrails}
        if self.primary_metric is not None:
            used.add(self.primary_metric.metric)
        return used


# --- parsing --------------------------------------------------------------------------------------


def plan_parse(text: str | bytes, *, content_type: str = "") -> dict[str, Any]:
    """JSON or YAML text to a mapping. YAML is a superset of JSON, so YAML parses both; JSON content
    types are parsed as JSON so that their error messages point at JSON positions."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise PlanInvalid({"plan": ["the plan is not UTF-8 text"]}) from None
    if not text.strip():
        raise PlanInvalid({"plan": ["the plan is empty"]})
    if "json" in content_type:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanInvalid({"plan": [f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]}) from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            where = ""
            mark = getattr(exc, "problem_mark", None)
            if mark is not None:
                where = f" at line {mark.line + 1} column {mark.column + 1}"
            problem = getattr(exc, "problem", None) or "syntax error"
            raise PlanInvalid({"plan": [f"not valid YAML: {problem}{where}"]}) from None
    if not isinstance(data, dict):
        raise PlanInvalid({"plan": ["a plan is a mapping of fields (alias, candidate, strategy, ...)"]})
    return data


# --- validation -----------------------------------------------------------------------------------


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
    if metric.shape == "percentile":
        errors.add(
            f"{path}.metric",
            f"{name} is a percentile, which can only be an SLO; guard the mean ({metric.source.removesuffix('_ms')}_mean_ms) instead",
        )
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


_FIELD_ORDER = (
    "plan", "name", "description", "alias", "baseline", "candidate", "strategy", "steps", "shadow", "ab",
    "blue_green", "slos", "guardrails", "primary_metric", "alpha", "tuning_n",
)  # fmt: skip


def _in_field_order(errors: dict[str, list[str]]) -> dict[str, list[str]]:
    """Errors in the order a person reads a plan, so the first one reported is the first one written."""

    def key(path: str) -> tuple[int, list[Any]]:
        head = re.split(r"[.\[]", path, maxsplit=1)[0]
        natural = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]
        return (_FIELD_ORDER.index(head) if head in _FIELD_ORDER else len(_FIELD_ORDER), natural)

    return {path: errors[path] for path in sorted(errors, key=key)}


def plan_normalise(data: dict[str, Any]) -> Plan:
    """Check a plan's shape and fill its defaults; raise `PlanInvalid` listing every error by field."""
    errors = _Errors()
    if not isinstance(data, dict):
        raise PlanInvalid({"plan": ["a plan is a mapping of fields (alias, candidate, strategy, ...)"]})
    for key in data:
        if key not in _TOP_LEVEL:
            errors.add(str(key), f"unknown field (expected one of {', '.join(sorted(_TOP_LEVEL))})")

    alias = data.get("alias")
    if not isinstance(alias, str) or not alias:
        errors.add("alias", "required: the public model name the rollout moves traffic on")
        alias = ""
    elif len(alias) > 64 or not _SLUG_RE.match(alias):
        errors.add("alias", "must be at most 64 letters, digits, '-' or '_'")
    baseline = _version_ref(errors, "baseline", data.get("baseline"), required=False)
    candidate = _version_ref(errors, "candidate", data.get("candidate"), required=True) or ""
    if baseline is not None and baseline == candidate:
        errors.add("candidate", "must differ from the baseline")

    name = data.get("name") or ""
    if not isinstance(name, str) or len(name) > 100:
        errors.add("name", "must be text of at most 100 characters")
        name = ""
    description = data.get("description") or ""
    if not isinstance(description, str) or len(description) > 5000:
        errors.add("description", "must be text of at most 5000 characters")
        description = ""

    strategy = data.get("strategy")
    if strategy not in STRATEGIES:
        errors.add("strategy", f"required: one of {', '.join(STRATEGIES)}")
        strategy = None

    alpha_raw = data.get("alpha", DEFAULT_ALPHA)
    alpha = _number(alpha_raw)
    if alpha is None or not 0 < alpha <= 0.5:
        errors.add("alpha", "must be a number above 0 and at most 0.5 (the chance of a wrong decision)")
        alpha = DEFAULT_ALPHA
    tuning_n = None
    if data.get("tuning_n") is not None:
        tuning_n = _integer(errors, "tuning_n", data["tuning_n"], minimum=10, maximum=10**9)
    allow_self = _boolean(errors, "allow_self_approval", data.get("allow_self_approval", False)) or False
    grace = _integer(
        errors, "engine_grace_s", data.get("engine_grace_s", DEFAULT_ENGINE_GRACE_S), minimum=0, maximum=3600
    )
    failover = _boolean(errors, "failover_to_candidate", data.get("failover_to_candidate", False)) or False

    # Shadow mirroring (any strategy may add it; the shadow strategy needs it).
    shadow_raw = _mapping(errors, "shadow", data.get("shadow"), {"rate", "quality"})
    shadow_rate = 0.0
    if "rate" in shadow_raw:
        shadow_rate = _fraction(errors, "shadow.rate", shadow_raw["rate"], allow_zero=True) or 0.0
    shadow_quality = None
    if shadow_raw.get("quality") is not None:
        quality_raw = _mapping(errors, "shadow.quality", shadow_raw["quality"], {"min_mean", "scorer"})
        min_mean = _number(quality_raw.get("min_mean"))
        scorer = quality_raw.get("scorer", "exact_match")
        if min_mean is None or not 0 <= min_mean <= 1:
            errors.add("shadow.quality.min_mean", "required: the lowest acceptable mean score, 0 to 1")
        elif not isinstance(scorer, str | dict) or not scorer:
            errors.add("shadow.quality.scorer", "must be a scorer name or {name, params, label}")
        else:
            shadow_quality = ShadowQuality(min_mean=min_mean, scorer=scorer)

    slos: list[Slo] = []
    raw_slos = data.get("slos") or []
    if not isinstance(raw_slos, list):
        errors.add("slos", "must be a list")
        raw_slos = []
    for i, raw in enumerate(raw_slos):
        slo = _parse_slo(errors, f"slos[{i}]", raw)
        if slo is not None:
            slos.append(slo)

    guardrails: list[Guardrail] = []
    raw_guardrails = data.get("guardrails")
    if raw_guardrails is None:
        raw_guardrails = [dict(g) for g in DEFAULT_GUARDRAILS]
    if not isinstance(raw_guardrails, list):
        errors.add("guardrails", "must be a list")
        raw_guardrails = []
    for i, raw in enumerate(raw_guardrails):
        guardrail = _parse_guardrail(errors, f"guardrails[{i}]", raw)
        if guardrail is not None:
            guardrails.append(guardrail)

    primary = None
    if data.get("primary_metric") is not None:
        raw = data["primary_metric"]
        if isinstance(raw, str):
            raw = {"metric": raw}
        raw = _mapping(errors, "primary_metric", raw, {"metric", "difference", "min_effect"})
        metric_name = raw.get("metric")
        metric = METRICS.get(metric_name) if isinstance(metric_name, str) else None
        if metric is None:
            errors.add("primary_metric.metric", f"unknown metric {metric_name!r} (known: {', '.join(sorted(METRICS))})")
        elif metric.shape == "percentile":
            errors.add("primary_metric.metric", f"{metric.name} is a percentile; use a mean or a rate")
        else:
            difference = raw.get("difference", "absolute" if metric.shape == "proportion" else "relative")
            if difference not in ("absolute", "relative"):
                errors.add("primary_metric.difference", "must be absolute or relative")
            min_effect = raw.get("min_effect")
            if min_effect is not None and (_number(min_effect) is None or _number(min_effect) == 0):
                errors.add("primary_metric.min_effect", "must be a non-zero number")
                min_effect = None
            primary = PrimaryMetric(metric=metric.name, difference=difference, min_effect=_number(min_effect))

    steps: list[Step] = []
    ab_horizon: int | None = None
    promotion_approval_default = False
    raw_steps = data.get("steps")
    if strategy == "canary":
        if not raw_steps:
            errors.add("steps", "a canary needs at least one step, e.g. [{weight: 0.05}, {weight: 0.5}]")
        elif not isinstance(raw_steps, list):
            errors.add("steps", "must be a list")
        elif len(raw_steps) > MAX_STEPS:
            errors.add("steps", f"at most {MAX_STEPS} steps")
        else:
            previous: float | None = None
            for i, raw in enumerate(raw_steps):
                step = _parse_step(errors, f"steps[{i}]", raw, default_shadow=shadow_rate)
                if step is None:
                    previous = None
                    continue
                if step.weight <= 0:
                    errors.add(f"steps[{i}].weight", "a canary step gives the candidate some traffic: above 0")
                elif previous is not None and step.weight <= previous:
                    errors.add(f"steps[{i}].weight", f"weights must increase (the step before has {previous:g})")
                previous = step.weight
                steps.append(step)
        for key in ("ab", "blue_green"):
            if data.get(key) is not None:
                errors.add(key, f"only for the {key} strategy")
    elif strategy == "shadow":
        promotion_approval_default = True
        if shadow_rate <= 0:
            errors.add("shadow.rate", "required for a shadow rollout: the share of requests mirrored (0.1)")
        if raw_steps:
            if not isinstance(raw_steps, list) or len(raw_steps) > MAX_STEPS:
                errors.add("steps", f"must be a list of at most {MAX_STEPS} steps")
            else:
                for i, raw in enumerate(raw_steps):
                    step = _parse_step(errors, f"steps[{i}]", raw, default_shadow=shadow_rate)
                    if step is not None and step.weight != 0:
                        errors.add(f"steps[{i}].weight", "a shadow rollout sends no users to the candidate: 0")
                    elif step is not None and step.shadow_rate <= 0:
                        errors.add(f"steps[{i}].shadow_rate", "a shadow step mirrors some traffic: above 0")
                    elif step is not None:
                        steps.append(step)
        else:
            steps.append(Step(0.0, shadow_rate, 300, 100, False))
        for key in ("ab", "blue_green"):
            if data.get(key) is not None:
                errors.add(key, f"only for the {key} strategy")
    elif strategy == "ab":
        ab = _mapping(errors, "ab", data.get("ab"), {"weight", "horizon_s", "min_duration_s", "min_candidate_requests"})
        if raw_steps:
            errors.add("steps", "an A/B test has one fixed split: set ab.weight instead of steps")
        weight = _fraction(errors, "ab.weight", ab.get("weight", 0.5), allow_zero=False, allow_one=False)
        ab_horizon = _integer(errors, "ab.horizon_s", ab.get("horizon_s", DEFAULT_AB_HORIZON_S), minimum=60, maximum=MAX_DURATION_S)
        duration = _integer(errors, "ab.min_duration_s", ab.get("min_duration_s", 3600), minimum=0, maximum=MAX_DURATION_S)
        requests = _integer(errors, "ab.min_candidate_requests", ab.get("min_candidate_requests", 1000), minimum=0, maximum=10**9)
        if primary is None and "primary_metric" not in errors.errors and "primary_metric.metric" not in errors.errors:
            errors.add("primary_metric", "required for an A/B test: the metric that decides it")
        if weight is not None and duration is not None and requests is not None:
            steps.append(Step(weight, shadow_rate, duration, requests, False))
        if data.get("blue_green") is not None:
            errors.add("blue_green", "only for the blue_green strategy")
    elif strategy == "blue_green":
        bg = _mapping(
            errors, "blue_green", data.get("blue_green"),
            {"shadow_rate", "warmup_s", "min_shadow_requests", "rollback_window_s", "requires_approval"},
        )  # fmt: skip
        if raw_steps:
            errors.add("steps", "blue-green has fixed steps (warm-up on shadow traffic, then 100 %): set blue_green.*")
        warm_rate = _fraction(errors, "blue_green.shadow_rate", bg.get("shadow_rate", 1.0), allow_zero=False)
        warmup = _integer(errors, "blue_green.warmup_s", bg.get("warmup_s", 300), minimum=0, maximum=MAX_DURATION_S)
        warm_requests = _integer(errors, "blue_green.min_shadow_requests", bg.get("min_shadow_requests", 100), minimum=0, maximum=10**9)
        window = _integer(errors, "blue_green.rollback_window_s", bg.get("rollback_window_s", 300), minimum=0, maximum=MAX_DURATION_S)
        approval = _boolean(errors, "blue_green.requires_approval", bg.get("requires_approval", False))
        if None not in (warm_rate, warmup, warm_requests, window, approval):
            steps.append(Step(0.0, warm_rate or 0.0, warmup or 0, warm_requests or 0, False))
            steps.append(Step(1.0, 0.0, window or 0, 0, bool(approval)))
        if data.get("ab") is not None:
            errors.add("ab", "only for the ab strategy")

    promotion_approval = _boolean(
        errors, "promotion_requires_approval", data.get("promotion_requires_approval", promotion_approval_default)
    )

    eval_gate = data.get("eval_gate")
    if eval_gate is not None and not isinstance(eval_gate, dict):
        errors.add("eval_gate", "must be a mapping (see the evals app's eval gate fields)")
        eval_gate = None

    if errors:
        raise PlanInvalid(_in_field_order(errors.errors))
    assert strategy is not None and grace is not None and promotion_approval is not None
    return Plan(
        alias=alias,
        baseline=baseline,
        candidate=candidate,
        strategy=strategy,
        steps=tuple(steps),
        slos=tuple(slos),
        guardrails=tuple(guardrails),
        primary_metric=primary,
        alpha=alpha,
        tuning_n=tuning_n,
        allow_self_approval=allow_self,
        promotion_requires_approval=promotion_approval,
        engine_grace_s=grace,
        shadow_rate=shadow_rate,
        shadow_quality=shadow_quality,
        ab_horizon_s=ab_horizon,
        eval_gate=eval_gate,
        name=name,
        description=description,
        failover_to_candidate=failover,
    )


def _stored_to_input(data: dict[str, Any]) -> dict[str, Any]:
    """A stored (normalised) plan back into validator input: the derived fields become their inputs again."""
    out = {key: value for key, value in data.items() if value is not None and key not in ("ab",)}
    strategy = data.get("strategy")
    steps = data.get("steps") or []
    if strategy == "ab" and steps:
        step = steps[0]
        out["ab"] = {
            "weight": step["weight"], "horizon_s": (data.get("ab") or {}).get("horizon_s", DEFAULT_AB_HORIZON_S),
            "min_duration_s": step["min_duration_s"], "min_candidate_requests": step["min_candidate_requests"],
        }  # fmt: skip
        out.pop("steps", None)
    elif strategy == "blue_green" and len(steps) == 2:
        warm, switch = steps
        out["blue_green"] = {
            "shadow_rate": warm["shadow_rate"], "warmup_s": warm["min_duration_s"],
            "min_shadow_requests": warm["min_candidate_requests"], "rollback_window_s": switch["min_duration_s"],
            "requires_approval": switch["requires_approval"],
        }  # fmt: skip
        out.pop("steps", None)
    out["slos"] = [
        {"metric": s["metric"], ("max" if s["op"] == "<=" else "min"): s["threshold"]} for s in data.get("slos") or []
    ]
    return out


def plan_from_stored(data: dict[str, Any]) -> Plan:
    """The `Plan` of a stored, normalised plan dict."""
    return plan_normalise(_stored_to_input(data))


# For the OpenAPI schema and the UI: what a plan looks like. The validator above is the authority.
PLAN_EXAMPLE: dict[str, Any] = {
    "name": "adder v2 canary",
    "alias": "adder",
    "baseline": "adder-v1",
    "candidate": "adder-v2",
    "strategy": "canary",
    "steps": [
        {"weight": 0.1, "min_duration_s": 60, "min_candidate_requests": 50},
        {"weight": 0.5, "min_duration_s": 120, "min_candidate_requests": 200, "requires_approval": True},
        {"weight": 1.0, "min_duration_s": 60, "min_candidate_requests": 100},
    ],
    "slos": ["ttft_p99_ms <= 800", "error_rate <= 0.01"],
    "guardrails": [
        {"metric": "tpot_mean_ms", "margin": "10%"},
        {"metric": "cost_per_request", "margin": "5%"},
        {"metric": "error_rate", "margin": 0.005},
    ],
    "alpha": 0.05,
    "allow_self_approval": False,
}

PLAN_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["alias", "candidate", "strategy"],
    "properties": {
        "name": {"type": "string", "maxLength": 100},
        "description": {"type": "string"},
        "alias": {"type": "string", "description": "The public model name whose traffic moves."},
        "baseline": {"type": "string", "description": "Version label or id; defaults to the alias's current baseline."},
        "candidate": {"type": "string", "description": "Version label (adder-v2) or id."},
        "strategy": {"type": "string", "enum": list(STRATEGIES)},
        "steps": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "weight": {"description": "0..1 or '10%'", "oneOf": [{"type": "number"}, {"type": "string"}]},
                    "shadow_rate": {"type": "number"},
                    "min_duration_s": {"type": "integer", "default": DEFAULT_STEP_DURATION_S},
                    "min_candidate_requests": {"type": "integer", "default": DEFAULT_STEP_REQUESTS},
                    "requires_approval": {"type": "boolean", "default": False},
                },
            },
        },
        "shadow": {"type": "object", "properties": {"rate": {"type": "number"}, "quality": {"type": "object"}}},
        "ab": {"type": "object", "description": "weight, horizon_s, min_duration_s, min_candidate_requests"},
        "blue_green": {
            "type": "object",
            "description": "shadow_rate, warmup_s, min_shadow_requests, rollback_window_s, requires_approval",
        },
        "slos": {
            "type": "array",
            "items": {"description": "'ttft_p99_ms <= 800' or {metric, max|min}"},
        },
        "guardrails": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "metric": {"type": "string", "enum": sorted(m for m, d in METRICS.items() if d.shape != "percentile")},
                    "margin": {"description": "0.005 (absolute) or '10%' (relative to the baseline)"},
                    "relative": {"type": "boolean"},
                },
            },
        },
        "primary_metric": {"type": "object", "properties": {"metric": {"type": "string"}, "difference": {"type": "string"}}},
        "alpha": {"type": "number", "default": DEFAULT_ALPHA},
        "tuning_n": {"type": "integer", "nullable": True},
        "allow_self_approval": {"type": "boolean", "default": False},
        "promotion_requires_approval": {"type": "boolean"},
        "engine_grace_s": {"type": "integer", "default": DEFAULT_ENGINE_GRACE_S},
        "failover_to_candidate": {
            "type": "boolean", "default": False,
            "description": "While every baseline engine is down, serve the baseline's users from the candidate "
            "(otherwise they get 503).",
        },
        "eval_gate": {"type": "object", "nullable": True, "description": "Validated and run by the evals app."},
    },
    "example": PLAN_EXAMPLE,
}

__all__ = [
    "HIGHER",
    "LOWER",
    "PLAN_EXAMPLE",
    "PLAN_JSON_SCHEMA",
    "STRATEGIES",
    "Guardrail",
    "Plan",
    "PlanInvalid",
    "PrimaryMetric",
    "ShadowQuality",
    "Slo",
    "Step",
    "plan_from_stored",
    "plan_normalise",
    "plan_parse",
]
