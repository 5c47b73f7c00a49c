"""Celery tasks of rollouts: thin, take ids, safe to run twice."""

from __future__ import annotations

import logging

from celery import shared_task

from rollouts.models import Rollout

logger = logging.getLogger(__name__)


@shared_task(name="rollouts.tasks.analyse_live_rollouts", ignore_result=True)
def analyse_live_rollouts() -> int:
    """Beat, every ROLLOUT_ANALYSIS_INTERVAL_S: fan out one analysis per live rollout, start the drafts that
    wait for their engines, resolve recent outcome events, and re-send notifications left pending."""
    from experiments.services import outcome_events_resolve
    from rollouts.notifications import notifications_pending
    from rollouts.services import rollout_start_when_ready

    try:
        outcome_events_resolve()
    except Exception:  # outcome joins are best effort; the analysis must run regardless
        logger.exception("resolving outcome events failed")
    for draft in Rollout.objects.select_related("baseline", "candidate").filter(
        state=Rollout.State.DRAFT, start_when_ready=True
    ):
        rollout_start_when_ready(rollout=draft)
    ids = list(Rollout.objects.filter(state__in=Rollout.ANALYSED_STATES).values_list("pk", flat=True))
    for rollout_id in ids:
        analyse_rollout.delay(rollout_id)
    for event_id in notifications_pending():
        notify_event.delay(event_id)
    return len(ids)


# A look older than one interval is stale; expiring it keeps a backed-up queue from replaying old looks.
@shared_task(name="rollouts.tasks.analyse_rollout", ignore_result=True, expires=60)
def analyse_rollout(rollout_id: int) -> str:
    """One look; a look that completes on a rollout the watchdog paused (no analysis had run for three
    intervals) lifts that pause: the analysis runs again (rollouts.watchdog)."""
    from rollouts.analysis import rollout_analyse
    from rollouts.watchdog import rollout_stale_resume

    analysis = rollout_analyse(rollout_id=rollout_id)
    if analysis is None:
        return "skipped"
    outcome = f"{analysis.decision}{'' if analysis.applied or analysis.decision == 'hold' else ' (not applied)'}"
    if not analysis.applied and rollout_stale_resume(rollout_id=rollout_id, seen_version=analysis.rollout_version):
        outcome += "; resumed after the stale-analysis pause"
    return outcome


@shared_task(
    name="rollouts.tasks.notify_event",
    bind=True,
    ignore_result=True,
    max_retries=5,
    default_retry_delay=10,
)
def notify_event(self, event_id: int) -> str:  # type: ignore[no-untyped-def]
    from rollouts.notifications import DeliveryFailed, notification_deliver

    try:
        status = notification_deliver(event_id=event_id)
    except DeliveryFailed as exc:
        raise self.retry(exc=exc, countdown=min(300, 10 * 2**self.request.retries)) from exc
    if status == "missing":
        logger.info("no notification for rollout event %s; ignored", event_id)
    return status


@shared_task(name="rollouts.tasks.retention_apply", ignore_result=True)
def retention_apply() -> str:
    """Beat, hourly: records and shadow pairs past RECORD_RETENTION_DAYS that no live rollout holds go, and
    looks of ended rollouts are compacted (rollouts.retention). Safe to run twice."""
    from rollouts.retention import retention_apply as apply

    report = apply()
    return (
        f"{report.records_deleted} records and {len(report.partitions_dropped)} partitions dropped, "
        f"{report.shadow_pairs_deleted} shadow pairs, {report.analyses_deleted} looks compacted"
    )



@shared_task(name="rollouts.tasks.retired_engines_stop", ignore_result=True)
def retired_engines_stop() -> str:
    """Beat, every 15 s: stop the engines of versions that rollouts ended ENGINE_IDLE_STOP_S ago retired (a
    rolled-back candidate, a promoted rollout's old baseline), when nothing uses them (rollouts.engines)."""
    from rollouts.engines import retired_engines_stop as stop

    released = stop()
    stopped = sum(len(r.stopped) for r in released)
    return f"{stopped} engines asked to stop ({len(released)} ended rollouts looked at)"
