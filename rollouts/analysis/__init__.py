"""The analysis loop: one look at a live rollout, a decision, and its application.

Each look (Celery beat, every ROLLOUT_ANALYSIS_INTERVAL_S) takes a lease on the rollout (compare-and-set,
so two workers do not analyse one rollout at once), reads per-arm sufficient statistics of the current
step's window from SQL aggregates (`experiments.analysis`), tests them with `experiments.stats`, and
decides:

- roll back at once on a breach decided with confidence (an SLO of the candidate, a guardrail against
  the baseline, the shadow quality floor, an A/B loss), or when the candidate has had no ready engine
  for the plan's grace period;
- pause when every baseline engine has been down for the grace period;
- advance when the step's minimum duration and candidate requests are met, every check that can gather
  evidence at the step's split is shown safe, and there is no sample ratio mismatch (the next step, an
  approval, or promotion after the last step); when the step's planned sample is reached with a check still
  undecided, apply the plan's `on_inconclusive` (pause, advance or roll back);
- while a promotion bakes, roll back on a breach against the holdout (of a check's pooled evidence, or of
  a guardrail on the bake's evidence alone), and promote for good when the bake ends;
- promote an A/B test whose primary metric wins, roll back one that loses or reaches its horizon;
- otherwise hold.

The decision is applied through the rollout's services with the version the look read
(`expected_version`): if anything changed the rollout meanwhile (a person, another look), the service
refuses with a Conflict and the look is recorded as not applied. So a look that dies half-way, or two at
once, never apply a decision twice. The look is stored as a compact `RolloutAnalysis` row.

Error control: the checks share the plan's alpha by Bonferroni over checks (`rollouts.plans.alpha`; each
check's evidence is one confidence sequence across the steps, and a guardrail's check on the bake alone
takes half of its guardrail's breach side, no share of its own), so the chance that a candidate within every margin is rolled back at any look of any step
or of the bake is at most alpha.

The package: `look` (the record of a look), `checks` (statistics and checks), `policy` (the decision),
`apply` (the lease, the application and the stored row).
"""

from __future__ import annotations

from rollouts.analysis.apply import analysis_interval_s, rollout_analyse, rollout_evidence
from rollouts.analysis.checks import tuning_n_for_step
from rollouts.analysis.look import ROUTE_SETTLE, Look
from rollouts.analysis.policy import rollout_look

__all__ = [
    "ROUTE_SETTLE",
    "Look",
    "analysis_interval_s",
    "rollout_analyse",
    "rollout_evidence",
    "rollout_look",
    "tuning_n_for_step",
]
