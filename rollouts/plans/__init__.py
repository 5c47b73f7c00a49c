"""The rollout plan: one schema and one validator for the API, the CLI (through the API) and the UI form.

A plan arrives as JSON or YAML text, or as an already parsed mapping. `plan_normalise` checks its shape
and fills the defaults, and returns a `Plan` whose `to_dict()` is what a rollout stores: every default
written out, every strategy compiled to the same list of steps. Facts that need the database (do the
versions exist, is an engine ready, is the alias free) are checked by `rollouts.services.plan_validate`.

Errors are collected, not raised one at a time, so a form can show each beside its field:
`PlanInvalid.errors` maps a field path such as ``steps[2].weight`` to its reasons.

Strategies, compiled to steps (a step is a candidate weight and a shadow rate held until its minimum
duration and minimum candidate requests are met and its checks are shown safe, optionally after an
approval; minimums have floors, see `normalise._apply_floors`). Promotion then bakes for `bake_s` with a
`holdout` of sessions left on the baseline (`bake_s: 0`: no bake):

- ``canary``: the steps as written; weights strictly increase; promotion after the last step.
- ``shadow``: one step at weight 0 mirroring ``shadow.rate`` of the traffic; promotion needs an approval
  unless ``promotion_requires_approval`` is false.
- ``ab``: one step at ``ab.weight``; ends when the primary metric's sequential test decides (promote on
  a win, roll back on a loss) or at ``ab.horizon_s`` (the baseline stays).
- ``blue_green``: a warm-up step at weight 0 with ``blue_green.shadow_rate`` mirrored, then the switch to
  1 - ``holdout`` for ``rollback_window_s``, compared with the holdout (rollback is one switch back), then
  promotion.

The package: `model` (the dataclasses, limits and defaults), `fields` (field readers and the parsers of one
SLO, guardrail or step), `normalise` (parse, check and fill a whole plan), `schema` (the example and JSON
schema the API documents).
"""

from __future__ import annotations

from rollouts.plans.model import (
    STRATEGIES,
    Guardrail,
    Plan,
    PlanInvalid,
    PrimaryMetric,
    ShadowQuality,
    Slo,
    Step,
)
from rollouts.plans.normalise import plan_from_stored, plan_normalise, plan_parse
from rollouts.plans.schema import PLAN_EXAMPLE, PLAN_JSON_SCHEMA

__all__ = [
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
