"""Celery tasks of the evals app: thin, by id, safe to run twice."""

from __future__ import annotations

import logging

from celery import shared_task

from evals import runner, services
from evals.models import ShadowScoring

log = logging.getLogger(__name__)


@shared_task(name="evals.eval_run_execute")
def eval_run_execute(run_id: int) -> str:
    """One slice of an eval run. Two deliveries of the same message are harmless: the claim is a
    compare-and-set and results are unique per (run, item)."""
    report = runner.eval_run_execute(run_id=run_id)
    log.info("eval run %s: %s (%d items stored)", run_id, report.outcome, report.stored)
    return report.outcome


@shared_task(name="evals.eval_runs_sweep")
def eval_runs_sweep() -> dict[str, int]:
    """Beat: resume runs whose worker died (stale heartbeat), finish orphaned cancels, decide gates."""
    return services.eval_runs_sweep()


@shared_task(name="evals.eval_gate_decide")
def eval_gate_decide(gate_id: int) -> str:
    return services.eval_gate_decide(gate_id=gate_id)


@shared_task(name="evals.score_shadow_pairs")
def score_shadow_pairs() -> int:
    """Beat: score the unscored shadow pairs of every rollout with shadow scoring switched on."""
    scored = 0
    for rollout_id in ShadowScoring.objects.filter(active=True).values_list("rollout_id", flat=True):
        try:
            scored += services.shadow_pairs_score(rollout_id=rollout_id)
        except Exception:
            # One rollout's trouble (a judge engine down) must not starve the others.
            log.exception("shadow scoring of rollout %s failed", rollout_id)
    return scored
