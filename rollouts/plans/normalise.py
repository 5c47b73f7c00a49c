"""Plan text to a mapping (`plan_parse`), a mapping to a checked `Plan` with every default filled
(`plan_normalise`), and a stored plan back to its `Plan` (`plan_from_stored`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

import yaml

from experiments.metrics import METRICS
from rollouts.plans.fields import (
    _boolean,
    _Errors,
    _fraction,
    _integer,
    _mapping,
    _number,
    _parse_guardrail,
    _parse_slo,
    _parse_step,
    _version_ref,
)
from rollouts.plans.model import (
    _SLUG_RE,
    _TOP_LEVEL,
    DEFAULT_AB_HORIZON_S,
    DEFAULT_ALPHA,
    DEFAULT_APPROVAL_TTL_S,
    DEFAULT_APPROVALS_REQUIRED,
    DEFAULT_BAKE_S,
    DEFAULT_ENGINE_GRACE_S,
    DEFAULT_GUARDRAILS,
    DEFAULT_HOLDOUT,
    DEFAULT_ON_INCONCLUSIVE,
    MAX_APPROVALS_REQUIRED,
    MAX_DURATION_S,
    MAX_HOLDOUT,
    MAX_STEPS,
    MIN_APPROVAL_TTL_S,
    MIN_STEP_DURATION_S,
    ON_INCONCLUSIVE,
    ON_STALE_ANALYSIS,
    STRATEGIES,
    Guardrail,
    Plan,
    PlanInvalid,
    PrimaryMetric,
    ShadowQuality,
    Slo,
    Step,
)


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



_FIELD_ORDER = (
    "plan", "name", "description", "alias", "baseline", "candidate", "strategy", "steps", "shadow", "ab",
    "blue_green", "slos", "guardrails", "primary_metric", "alpha", "tuning_n", "on_inconclusive", "holdout",
    "bake_s",
)  # fmt: skip


def _in_field_order(errors: dict[str, list[str]]) -> dict[str, list[str]]:
    """Errors in the order a person reads a plan, so the first one reported is the first one written."""

    def key(path: str) -> tuple[int, list[Any]]:
        head = re.split(r"[.\[]", path, maxsplit=1)[0]
        natural = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]
        return (_FIELD_ORDER.index(head) if head in _FIELD_ORDER else len(_FIELD_ORDER), natural)

    return {path: errors[path] for path in sorted(errors, key=key)}


@dataclass(frozen=True)
class _StepSource:
    """Where a step's minimums were written (their field paths) and whether they were written at all: a
    minimum left out is filled with its floor, one written below its floor is an error under its path."""

    duration_path: str | None
    requests_path: str | None
    duration_given: bool
    requests_given: bool


def _step_source(path: str, raw: Any) -> _StepSource:
    given = raw if isinstance(raw, dict) else {}
    return _StepSource(f"{path}.min_duration_s", f"{path}.min_candidate_requests", "min_duration_s" in given,
                       "min_candidate_requests" in given)  # fmt: skip


def _apply_floors(plan: Plan, sources: list[_StepSource], errors: _Errors, *, enforce: bool) -> Plan:
    """Step minimums have floors: at least MIN_STEP_DURATION_S, and at least the fewest candidate requests
    at which the step's checks can be shown safe at the plan's alpha (`analysis.checks.step_min_sample`).
    A minimum left out becomes its default or its floor, whichever is larger; with `enforce`, one written
    below its floor is an error naming the field. (A stored plan is read back without `enforce`: floors
    may have risen since it was validated, and a live rollout must still be readable.)"""
    from experiments.stats import DEFAULT_MIN_UNITS
    from rollouts.analysis.checks import check_alpha_share, step_min_sample

    steps = list(plan.steps)
    for i, (step, source) in enumerate(zip(steps, sources, strict=True)):
        floor = max(step_min_sample(plan, i), DEFAULT_MIN_UNITS)
        requests = step.min_candidate_requests
        if not source.requests_given:
            requests = max(requests, floor)
        elif enforce and requests < floor and source.requests_path is not None:
            errors.add(
                source.requests_path,
                f"at least {floor}: the fewest candidate requests at which this step's checks can be shown safe "
                f"at alpha {check_alpha_share(plan):.3g} per check (leave it out to get the floor)",
            )
        duration = step.min_duration_s
        if not source.duration_given:
            duration = max(duration, MIN_STEP_DURATION_S)
        elif enforce and duration < MIN_STEP_DURATION_S and source.duration_path is not None:
            errors.add(source.duration_path, f"at least {MIN_STEP_DURATION_S} s: no step ends on less than a minute of traffic")
        steps[i] = replace(step, min_candidate_requests=requests, min_duration_s=duration)
    return replace(plan, steps=tuple(steps))


def plan_normalise(data: dict[str, Any], *, enforce_floors: bool = True) -> Plan:
    """Check a plan's shape and fill its defaults; raise `PlanInvalid` listing every error by field.

    `enforce_floors`: a step minimum below its floor is an error (`_apply_floors`); off when a stored plan
    is read back."""
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
    approvals_required = _integer(
        errors, "approvals_required", data.get("approvals_required", DEFAULT_APPROVALS_REQUIRED),
        minimum=1, maximum=MAX_APPROVALS_REQUIRED,
    ) or DEFAULT_APPROVALS_REQUIRED  # fmt: skip
    approval_ttl_s = _integer(
        errors, "approval_ttl_s", data.get("approval_ttl_s", DEFAULT_APPROVAL_TTL_S),
        minimum=MIN_APPROVAL_TTL_S, maximum=MAX_DURATION_S,
    ) or DEFAULT_APPROVAL_TTL_S  # fmt: skip
    grace = _integer(
        errors, "engine_grace_s", data.get("engine_grace_s", DEFAULT_ENGINE_GRACE_S), minimum=0, maximum=3600
    )
    failover = _boolean(errors, "failover_to_candidate", data.get("failover_to_candidate", False)) or False
    gpu_budget = None
    if data.get("gpu_budget") is not None:
        gpu_budget = _integer(errors, "gpu_budget", data["gpu_budget"], minimum=2, maximum=10_000)
    on_stale = data.get("on_stale_analysis", "pause")
    if on_stale not in ON_STALE_ANALYSIS:
        errors.add("on_stale_analysis", f"must be one of {', '.join(ON_STALE_ANALYSIS)} (what happens when the analysis "
                                        "has not run for three intervals)")
        on_stale = "pause"
    on_inconclusive = data.get("on_inconclusive", DEFAULT_ON_INCONCLUSIVE)
    if on_inconclusive not in ON_INCONCLUSIVE:
        errors.add("on_inconclusive", f"must be one of {', '.join(ON_INCONCLUSIVE)} (what a step does when its "
                                      "planned sample is reached with a check still undecided)")  # fmt: skip
        on_inconclusive = DEFAULT_ON_INCONCLUSIVE
    holdout = _fraction(errors, "holdout", data.get("holdout", DEFAULT_HOLDOUT), allow_zero=True)
    if holdout is not None and holdout > MAX_HOLDOUT:
        errors.add("holdout", f"at most {MAX_HOLDOUT:g}: the share of sessions kept on the baseline after promotion")
        holdout = None
    holdout = DEFAULT_HOLDOUT if holdout is None else holdout
    bake_s = _integer(errors, "bake_s", data.get("bake_s", DEFAULT_BAKE_S), minimum=0, maximum=MAX_DURATION_S)
    bake_s = DEFAULT_BAKE_S if bake_s is None else bake_s
    if bake_s and 0 < bake_s < MIN_STEP_DURATION_S:
        errors.add("bake_s", f"0 (no bake) or at least {MIN_STEP_DURATION_S} s")

    # Shadow mirroring (any strategy may add it; the shadow strategy needs it).
    shadow_raw = _mapping(errors, "shadow", data.get("shadow"), {"rate", "quality"})
    shadow_rate = 0.0
    if "rate" in shadow_raw:
        shadow_rate = _fraction(errors, "shadow.rate", shadow_raw["rate"], allow_zero=True) or 0.0
    shadow_quality = None
    if shadow_raw.get("quality") is not None:
        quality_raw = _mapping(errors, "shadow.quality", shadow_raw["quality"], {"min_mean", "max_drop", "scorer"})
        given = {key: quality_raw[key] for key in ("min_mean", "max_drop") if quality_raw.get(key) is not None}
        scorer = quality_raw.get("scorer", "exact_match")
        if len(given) != 1:
            errors.add(
                "shadow.quality.min_mean" if not given else "shadow.quality.max_drop",
                "give one of min_mean (the lowest acceptable mean score) or max_drop (how far below the "
                "baseline's own score the candidate's may be), 0 to 1",
            )
        elif not isinstance(scorer, str | dict) or not scorer:
            errors.add("shadow.quality.scorer", "must be a scorer name or {name, params, label}")
        else:
            key, raw = next(iter(given.items()))
            value = _number(raw)
            if value is None or not 0 <= value <= 1:
                errors.add(f"shadow.quality.{key}", "must be a number from 0 to 1")
            else:
                shadow_quality = ShadowQuality(scorer=scorer, **{key: value})

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
    sources: list[_StepSource] = []
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
                sources.append(_step_source(f"steps[{i}]", raw))
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
                        sources.append(_step_source(f"steps[{i}]", raw))
        else:
            steps.append(Step(0.0, shadow_rate, 300, 100, False))
            sources.append(_StepSource(None, None, True, False))
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
            sources.append(_StepSource("ab.min_duration_s", "ab.min_candidate_requests", "min_duration_s" in ab,
                                       "min_candidate_requests" in ab))  # fmt: skip
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
            # The switch keeps the holdout on the baseline, so its rollback window still compares the two.
            steps.append(Step(round(1.0 - holdout, 6), 0.0, window or 0, 0, bool(approval)))
            sources.append(_StepSource("blue_green.warmup_s", "blue_green.min_shadow_requests", "warmup_s" in bg,
                                       "min_shadow_requests" in bg))
            sources.append(_StepSource("blue_green.rollback_window_s", None, "rollback_window_s" in bg, False))
        if data.get("ab") is not None:
            errors.add("ab", "only for the ab strategy")

    promotion_approval = _boolean(
        errors, "promotion_requires_approval", data.get("promotion_requires_approval", promotion_approval_default)
    )

    if gpu_budget is not None:
        # The baseline gives up replicas before the candidate grows into them, so it keeps at least one
        # until promotion takes the rest; a blue-green switch would need both fleets at once.
        if strategy == "blue_green":
            errors.add("gpu_budget", "a blue-green needs twice the GPUs; under a budget use a canary")
        for i, step in enumerate(steps):
            if step.weight >= 1:
                errors.add(f"steps[{i}].weight", "under a gpu_budget the baseline keeps a replica until promotion: "
                                                 "below 1")
        if bake_s and not holdout:
            errors.add("holdout", "under a gpu_budget a bake keeps a holdout on the baseline: above 0 (or bake_s: 0)")

    eval_gate = data.get("eval_gate")
    if eval_gate is not None and not isinstance(eval_gate, dict):
        errors.add("eval_gate", "must be a mapping (see the evals app's eval gate fields)")
        eval_gate = None

    if errors:
        raise PlanInvalid(_in_field_order(errors.errors))
    assert strategy is not None and grace is not None and promotion_approval is not None
    plan = Plan(
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
        gpu_budget=gpu_budget,
        on_stale_analysis=on_stale,
        on_inconclusive=on_inconclusive,
        holdout=holdout,
        bake_s=bake_s,
        approvals_required=approvals_required,
        approval_ttl_s=approval_ttl_s,
    )
    plan = _apply_floors(plan, sources, errors, enforce=enforce_floors)
    if errors:
        raise PlanInvalid(_in_field_order(errors.errors))
    return plan


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
    """The `Plan` of a stored, normalised plan dict (its step minimums as stored, even under today's floors)."""
    return plan_normalise(_stored_to_input(data), enforce_floors=False)

