"""What a normalised plan holds: its parts as frozen dataclasses, the limits and defaults, and the error
that lists a plan's mistakes by field."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from config.errors import DomainError
from experiments.metrics import METRICS

STRATEGIES = ("canary", "shadow", "ab", "blue_green")
MAX_STEPS = 20
MAX_DURATION_S = 30 * 24 * 3600
DEFAULT_ALPHA = 0.05
DEFAULT_ENGINE_GRACE_S = 30
DEFAULT_STEP_DURATION_S = 60
DEFAULT_STEP_REQUESTS = 50
DEFAULT_AB_HORIZON_S = 7 * 24 * 3600
# What the watchdog does with a live rollout whose analysis stopped (rollouts.watchdog).
ON_STALE_ANALYSIS = ("pause", "rollback")
# What a step does when its planned sample is reached and a check is still undecided (rollouts.analysis.policy).
ON_INCONCLUSIVE = ("pause", "advance", "rollback")
DEFAULT_ON_INCONCLUSIVE = "pause"
# After promotion this share of sessions stays on the baseline for `bake_s`, compared with the same checks.
DEFAULT_HOLDOUT = 0.05
MAX_HOLDOUT = 0.5
DEFAULT_BAKE_S = 600
# No step ends sooner than this, whatever its plan says (rollouts.analysis.policy's floors).
MIN_STEP_DURATION_S = 60
DEFAULT_APPROVALS_REQUIRED = 1
MAX_APPROVALS_REQUIRED = 20
# An approval request older than this cannot be used: someone asks again (a new request, a new message).
DEFAULT_APPROVAL_TTL_S = 24 * 3600
MIN_APPROVAL_TTL_S = 60
# A guardrail written by no one still guards against a broken candidate: errors at most one point worse.
DEFAULT_GUARDRAILS: tuple[dict[str, Any], ...] = ({"metric": "error_rate", "margin": 0.01, "relative": False},)

_TOP_LEVEL = {
    "name", "description", "alias", "baseline", "candidate", "strategy", "steps", "shadow", "ab", "blue_green",
    "slos", "guardrails", "primary_metric", "alpha", "tuning_n", "allow_self_approval",
    "promotion_requires_approval", "engine_grace_s", "eval_gate", "failover_to_candidate", "gpu_budget",
    "on_stale_analysis",
    "on_inconclusive", "holdout", "bake_s",
    "approvals_required", "approval_ttl_s",
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
    """Shadow-pair quality (scored by the evals app against the baseline's answers to the same requests):
    either an absolute floor `min_mean` for the candidate's mean score, or a non-inferiority margin
    `max_drop` below what the baseline scores against itself (1 for a reference-based scorer, 0.5 for a
    pairwise judge: a tie). Exactly one of the two."""

    min_mean: float | None = None
    # A scorer name or {name, params, label} (the evals app's scorer spec); normalised by plan_validate.
    scorer: Any = "exact_match"
    max_drop: float | None = None

    @property
    def label(self) -> str:
        if self.max_drop is not None:
            return f"shadow quality within {self.max_drop:g} of the baseline"
        return f"shadow quality >= {self.min_mean:g}"

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"scorer": self.scorer}
        if self.max_drop is not None:
            body["max_drop"] = self.max_drop
        else:
            body["min_mean"] = self.min_mean
        return body


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
    # Replicas of the baseline and the candidate together (serving.engines.capacity); None: no budget.
    gpu_budget: int | None = None
    # When no analysis has run for three intervals: pause at the current weights, or roll back.
    on_stale_analysis: str = "pause"
    # The planned sample of a step reached with a check still undecided: pause (a person decides), advance
    # or rollback.
    on_inconclusive: str = DEFAULT_ON_INCONCLUSIVE
    # Share of sessions kept on the baseline after promotion, for `bake_s` seconds (0 for either: no bake).
    holdout: float = DEFAULT_HOLDOUT
    bake_s: int = DEFAULT_BAKE_S
    # How many different approvers a step (or the promotion) that needs an approval waits for, and how
    # long one request stays usable.
    approvals_required: int = DEFAULT_APPROVALS_REQUIRED
    approval_ttl_s: int = DEFAULT_APPROVAL_TTL_S
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bakes(self) -> bool:
        """Whether promotion is followed by a bake (the candidate watched against a holdout of the baseline)."""
        return self.bake_s > 0

    def to_dict(self) -> dict[str, Any]:
        """The normalised plan, as a rollout stores it and the API returns it."""
        shadow: dict[str, Any] | None = None
        if self.shadow_rate or self.shadow_quality:
            shadow = {"rate": self.shadow_rate}
            if self.shadow_quality is not None:
                shadow["quality"] = self.shadow_quality.as_dict()
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
            "gpu_budget": self.gpu_budget,
            "approvals_required": self.approvals_required,
            "approval_ttl_s": self.approval_ttl_s,
            "eval_gate": self.eval_gate,
            "on_stale_analysis": self.on_stale_analysis,
            "on_inconclusive": self.on_inconclusive,
            "holdout": self.holdout,
            "bake_s": self.bake_s,
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

