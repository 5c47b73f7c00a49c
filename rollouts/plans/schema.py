"""What a plan looks like, for the OpenAPI schema and the UI. The validator (`normalise`) is the authority."""

from __future__ import annotations

from typing import Any

from experiments.metrics import METRICS
from rollouts.plans.model import (
    DEFAULT_ALPHA,
    DEFAULT_APPROVAL_TTL_S,
    DEFAULT_APPROVALS_REQUIRED,
    DEFAULT_BAKE_S,
    DEFAULT_ENGINE_GRACE_S,
    DEFAULT_HOLDOUT,
    DEFAULT_ON_INCONCLUSIVE,
    DEFAULT_STEP_DURATION_S,
    DEFAULT_STEP_REQUESTS,
    MAX_APPROVALS_REQUIRED,
    MIN_APPROVAL_TTL_S,
    MIN_STEP_DURATION_S,
    ON_INCONCLUSIVE,
    STRATEGIES,
)

PLAN_EXAMPLE: dict[str, Any] = {
    "name": "adder v2 canary",
    "alias": "adder",
    "baseline": "adder-v1",
    "candidate": "adder-v2",
    "strategy": "canary",
    "steps": [
        {"weight": 0.1, "min_duration_s": 60},
        {"weight": 0.5, "min_duration_s": 120, "requires_approval": True},
        {"weight": 1.0, "min_duration_s": 60},
    ],
    "slos": ["ttft_p99_ms <= 800", "error_rate <= 0.01"],
    "guardrails": [
        {"metric": "tpot_gmean_ms", "margin": "10%"},
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
                    "min_duration_s": {"type": "integer", "default": DEFAULT_STEP_DURATION_S, "minimum": MIN_STEP_DURATION_S},
                    "min_candidate_requests": {
                        "type": "integer",
                        "description": f"Left out: {DEFAULT_STEP_REQUESTS} or the step's floor, whichever is larger "
                        "(the fewest candidate requests at which its checks can be shown safe at the plan's alpha); "
                        "a value below the floor is refused.",
                    },
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
                    "metric": {"type": "string", "enum": sorted(METRICS)},
                    "margin": {"description": "0.005 (absolute) or '10%' (relative to the baseline; a percentile's "
                                              "margin is always relative: its p90 at most 10 % over the baseline's)"},
                    "relative": {"type": "boolean"},
                },
            },
        },
        "primary_metric": {"type": "object", "properties": {"metric": {"type": "string"}, "difference": {"type": "string"}}},
        "alpha": {"type": "number", "default": DEFAULT_ALPHA},
        "tuning_n": {"type": "integer", "nullable": True},
        "allow_self_approval": {
            "type": "boolean", "default": False,
            "description": "Four-eyes: unless true, neither the rollout's creator nor the person who asked for "
            "the approval (moved the rollout to wait for it, or asked again) may approve it.",
        },
        "approvals_required": {
            "type": "integer", "default": DEFAULT_APPROVALS_REQUIRED, "minimum": 1, "maximum": MAX_APPROVALS_REQUIRED,
            "description": "How many different people with the approver role must approve a step (or the "
            "promotion) that needs an approval; each counts once. One rejection ends the wait (rolls back).",
        },
        "approval_ttl_s": {
            "type": "integer", "default": DEFAULT_APPROVAL_TTL_S, "minimum": MIN_APPROVAL_TTL_S,
            "description": "Seconds an approval request can be used; after that it must be asked again "
            "(a new request, a new notification; approvals of the expired one no longer count).",
        },
        "promotion_requires_approval": {"type": "boolean"},
        "engine_grace_s": {"type": "integer", "default": DEFAULT_ENGINE_GRACE_S},
        "failover_to_candidate": {
            "type": "boolean", "default": False,
            "description": "While every baseline engine is down, serve the baseline's users from the candidate "
            "(otherwise they get 503).",
        },
        "gpu_budget": {
            "type": "integer", "nullable": True, "minimum": 2,
            "description": "Replicas of the baseline and the candidate together: each step gives the candidate "
            "the replicas its weight needs (at least one), taken from the baseline first, and moves traffic once "
            "they are ready; a rollback gives them back.",
        },
        "eval_gate": {"type": "object", "nullable": True, "description": "Validated and run by the evals app."},
        "on_stale_analysis": {
            "type": "string", "enum": ["pause", "rollback"], "default": "pause",
            "description": "When no analysis has run for three intervals (workers or beat down): pause at the "
            "current weights until it runs again, or roll back.",
        },
        "on_inconclusive": {
            "type": "string", "enum": list(ON_INCONCLUSIVE), "default": DEFAULT_ON_INCONCLUSIVE,
            "description": "What a step does when its planned sample is reached with a check still undecided: "
            "pause (a person decides), advance, or rollback.",
        },
        "holdout": {
            "description": "Share of sessions kept on the baseline while the promotion bakes (0 to 0.5, or '5%').",
            "default": DEFAULT_HOLDOUT, "oneOf": [{"type": "number"}, {"type": "string"}],
        },
        "bake_s": {
            "type": "integer", "default": DEFAULT_BAKE_S,
            "description": "Seconds after promotion during which the candidate is compared with the holdout on the same "
            "checks; a breach, or a person, may roll it back until then. 0: no bake.",
        },
    },
    "example": PLAN_EXAMPLE,
}
