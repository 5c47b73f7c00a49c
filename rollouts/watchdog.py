"""The dead-man's switch of the analysis: a live rollout whose analysis has stopped does not keep its
candidate's traffic share unwatched.

A rollout whose last look (`Rollout.last_analysed_at`, written when a look completes) is older than
three analysis intervals (`ROLLOUT_STALE_INTERVALS`), with no look under way (a look keeps its lease while
it runs, up to ROLLOUT_LOOK_MAX_S: a look that builds a window's rollup from a day of records can take
minutes, and the analysis has not stopped then), while its candidate takes traffic (running, or
awaiting an approval) is paused at its current weights, or rolled back when its plan says `on_stale_analysis: rollback` (a
rollout a person paused, or a promotion still baking, is rolled back then too; with the plan's default
they stay as they are: a bake ends only on a look, so it holds its split without one). The
pause is an ordinary transition by the actor `watchdog`, so it is in the audit trail, the page says why,
and its notification goes out through the notification outbox (Slack). `/metrics` shows
`platform_rollouts_stale_analysis` (live rollouts whose analysis is stale), the age of the oldest analysis
(`platform_rollouts_analysis_age_seconds`), the actions taken (`platform_rollouts_stale_actions_total`) and
when the watchdog last looked (`platform_rollouts_watchdog_last_pass_timestamp_seconds`).

When the analysis runs again, the first look that completes on a rollout the watchdog paused lifts the
pause (`rollout_stale_resume`, called by the analysis task): the rollout goes back to the state it was
paused from, in the same step, with the same step window, so it resumes where it left off. A look that
finds a breach on its return rolls back instead. A pause by a person is never lifted this way: the pause
is the watchdog's only while the rollout's latest event is the watchdog's pause.

Who can notice, when the analysis has stopped: beat only schedules, and the analysis runs on the Celery
workers; with the workers down (or beat, or the broker) no Celery code runs at all, so the check cannot be
a beat task. It runs in the web process instead, which serves the pages and the API and is up whenever
anyone can look at a rollout: `config.asgi` starts `WatchdogThread` with the server (one pass every
analysis interval; `ROLLOUT_WATCHDOG=false` turns it off), and `manage.py rollout_watchdog` runs the same
loop as a process of its own for a web app served some other way. Several web processes each run one;
every action is a transition at the version the pass read, so of two watchdogs only one acts. The
notification is delivered by the watchdog itself (the workers that would send it may be the ones that are
down); the outbox's claim keeps a worker from sending it again. A watchdog that has just started gives
each rollout those intervals of its own watching before it acts (after a restart of the whole
platform, beat's first look has not come yet).

Not covered: the web processes down as well as the workers (the gateway keeps routing on the weights it
has, the candidate's included), and the database down (nothing can be written; the gateway serves on
its last-known-good routes).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone
from prometheus_client import Counter, Gauge

from config.errors import Conflict, DomainError
from rollouts.actors import ANALYSIS, WATCHDOG
from rollouts.models import Notification, Rollout, RolloutEvent

logger = logging.getLogger(__name__)

State = Rollout.State
STALE_INTERVALS = 3
# The candidate takes traffic in these states: the watchdog acts on them.
WATCHED_STATES = (State.RUNNING, State.AWAITING_APPROVAL)

stale_rollouts = Gauge(
    "platform_rollouts_stale_analysis",
    "Live rollouts whose last analysis is older than three analysis intervals (at the watchdog's last pass).",
    multiprocess_mode="livemax",
)
analysis_age_seconds = Gauge(
    "platform_rollouts_analysis_age_seconds",
    "Seconds since the last analysis of the live rollout analysed longest ago (at the watchdog's last pass).",
    multiprocess_mode="livemax",
)
stale_actions_total = Counter(
    "platform_rollouts_stale_actions_total",
    "Rollouts the watchdog paused or rolled back because no analysis had run for three intervals.",
    ["action"],
)
watchdog_last_pass = Gauge(
    "platform_rollouts_watchdog_last_pass_timestamp_seconds",
    "When the analysis watchdog last looked at the live rollouts (Unix time).",
    multiprocess_mode="livemax",
)


def stale_intervals() -> int:
    return int(getattr(settings, "ROLLOUT_STALE_INTERVALS", STALE_INTERVALS))


def stale_after_s() -> float:
    """How old a rollout's last look may be before the watchdog acts: three analysis intervals (by default;
    ROLLOUT_STALE_INTERVALS on a machine whose looks are often late)."""
    return stale_intervals() * float(settings.ROLLOUT_ANALYSIS_INTERVAL_S)


def _reference(rollout: Rollout, watching_since: datetime | None, *, paused_by_watchdog: bool = False) -> datetime:
    """Since when the rollout has gone without a look: its last look, or its last transition if that is later
    (a rollout just started or resumed has had no chance of one yet), or when this watchdog started. The
    watchdog's own pause is no look: a rollout it paused is judged from its last look still."""
    if paused_by_watchdog:
        last = rollout.last_analysed_at or rollout.started_at or rollout.updated_at
        return last if watching_since is None else max(last, watching_since)
    times = [t for t in (rollout.last_analysed_at, rollout.updated_at, watching_since) if t is not None]
    return max(times)


def rollout_stale_paused(*, rollout: Rollout) -> bool:
    """Paused by the watchdog and not touched since (its latest event is the watchdog's pause)."""
    if rollout.state != State.PAUSED:
        return False
    return RolloutEvent.objects.filter(
        rollout_id=rollout.pk, seq=rollout.version, kind=RolloutEvent.Kind.PAUSED, actor=WATCHDOG.name
    ).exists()


@dataclass(frozen=True)
class Staleness:
    """How long a live rollout has gone without a look, for its page, the API and `rolloutctl status`."""

    last_analysed_at: datetime | None
    age_s: float
    limit_s: float
    stale: bool
    paused_by_watchdog: bool
    looking: bool = False  # a look holds the rollout's lease now (`look_running`)

    def as_dict(self) -> dict[str, Any]:
        return {
            "last_analysed_at": self.last_analysed_at.isoformat() if self.last_analysed_at else None,
            "age_s": round(self.age_s, 1), "limit_s": self.limit_s, "stale": self.stale,
            "paused_by_watchdog": self.paused_by_watchdog, "looking": self.looking,
        }  # fmt: skip


def look_running(rollout: Rollout, now: datetime) -> bool:
    """A look holds the rollout's lease: the analysis is alive, however long since a look last completed. A
    running look renews its lease (`rollouts.analysis.apply.LeaseKept`), up to ROLLOUT_LOOK_MAX_S; one whose
    worker died stops renewing it, and the lease runs out within `rollouts.analysis.look.LEASE_S`."""
    return rollout.analysis_lease_until is not None and rollout.analysis_lease_until > now


def rollout_staleness(*, rollout: Rollout, now: datetime | None = None) -> Staleness | None:
    """None for a rollout the analysis does not look at (a draft, an ended one)."""
    if rollout.state not in Rollout.ANALYSED_STATES:
        return None
    now = now or timezone.now()
    by_watchdog = rollout_stale_paused(rollout=rollout)
    age = max(0.0, (now - _reference(rollout, None, paused_by_watchdog=by_watchdog)).total_seconds())
    limit = stale_after_s()
    looking = look_running(rollout, now)
    return Staleness(
        last_analysed_at=rollout.last_analysed_at, age_s=age, limit_s=limit,
        stale=by_watchdog or (age > limit and not looking), paused_by_watchdog=by_watchdog, looking=looking,
    )  # fmt: skip


@dataclass
class WatchdogReport:
    stale: list[int] = field(default_factory=list)
    paused: list[int] = field(default_factory=list)
    rolled_back: list[int] = field(default_factory=list)
    oldest_age_s: float = 0.0


def _action_for(rollout: Rollout) -> str | None:
    on_stale = (rollout.plan or {}).get("on_stale_analysis") or "pause"
    if rollout.state in WATCHED_STATES:
        return on_stale
    if rollout.state in (State.PAUSED, State.BAKING) and on_stale == "rollback":
        return "rollback"
    # Gating (no candidate traffic yet), already paused, or baking: a bake ends only on a look, so without
    # looks it holds its split as a pause would (and it cannot be paused).
    return None


def _act(rollout: Rollout, action: str, age_s: float, limit_s: float) -> Rollout | None:
    from rollouts.services import rollout_pause, rollout_rollback

    weight = float((rollout.current_step or {}).get("weight", 0.0))
    last = rollout.last_analysed_at.isoformat(timespec="seconds") if rollout.last_analysed_at else "never"
    why = (
        f"no analysis for {age_s:.0f} s (the limit is {stale_intervals()} intervals, {limit_s:g} s; last look: {last}): "
        "the Celery workers, beat or the broker may be down"
    )
    evidence = {"stale_analysis": {"last_analysed_at": last if rollout.last_analysed_at else None,
                                   "age_s": round(age_s, 1), "limit_s": limit_s, "action": action}}
    try:
        if action == "rollback":
            return rollout_rollback(rollout=rollout.pk, actor=WATCHDOG, evidence=evidence, expected_version=rollout.version,
                                    reason=f"{why}; rolled back (the plan's on_stale_analysis)")
        return rollout_pause(rollout=rollout.pk, actor=WATCHDOG, evidence=evidence, expected_version=rollout.version,
                             reason=f"{why}; paused at {weight:.0%} until the analysis runs again")
    except (Conflict, DomainError) as exc:
        # A look, a person or another watchdog got there first: the rollout is no longer what was read.
        logger.info("watchdog: rollout %s not %s: %s", rollout.pk, action, exc)
        return None


def _deliver(rollout: Rollout) -> None:
    """Send the notification of the watchdog's own event now: the workers that would send it may be down."""
    from rollouts.notifications import notification_deliver

    event = RolloutEvent.objects.filter(rollout_id=rollout.pk, seq=rollout.version).first()
    if event is None or not Notification.objects.filter(event=event).exists():
        return
    try:
        notification_deliver(event_id=event.pk)
    except Exception:  # left pending in the outbox: the sweep (or a retry) sends it later
        logger.exception("watchdog: the notification of rollout event %s is not sent yet", event.pk)


def rollouts_watchdog_pass(*, now: datetime | None = None, watching_since: datetime | None = None) -> WatchdogReport:
    """One look at every live rollout: pause (or roll back) those whose analysis has stopped. Safe to run in
    several processes at once."""
    now = now or timezone.now()
    limit = stale_after_s()
    report = WatchdogReport()
    live = Rollout.objects.select_related("baseline", "candidate").filter(state__in=Rollout.ANALYSED_STATES)
    for rollout in live:
        by_watchdog = rollout.state == State.PAUSED and rollout_stale_paused(rollout=rollout)
        since_look = (now - _reference(rollout, None, paused_by_watchdog=by_watchdog)).total_seconds()
        report.oldest_age_s = max(report.oldest_age_s, since_look)
        if by_watchdog:
            report.stale.append(rollout.pk)  # it waits for the analysis: nothing more to do
            continue
        age = (now - _reference(rollout, watching_since)).total_seconds()
        if since_look <= limit or look_running(rollout, now):
            continue
        report.stale.append(rollout.pk)
        action = _action_for(rollout)
        if action is None or age <= limit:
            continue
        done = _act(rollout, action, since_look, limit)
        if done is None:
            continue
        (report.rolled_back if action == "rollback" else report.paused).append(rollout.pk)
        stale_actions_total.labels(action=action).inc()
        logger.warning("watchdog: rollout %s %s: no analysis for %.0f s", rollout.pk,
                       "rolled back" if action == "rollback" else "paused", since_look)
        _deliver(done)
    stale_rollouts.set(len(report.stale))
    analysis_age_seconds.set(round(report.oldest_age_s, 1))
    watchdog_last_pass.set(time.time())
    return report


def rollout_stale_resume(*, rollout_id: int, seen_version: int) -> Rollout | None:
    """After a look completed: lift the watchdog's pause, if the rollout is still as that look saw it (the
    analysis runs again). The rollout returns to the state it was paused from, in the same step."""
    from rollouts.services import rollout_resume

    rollout = Rollout.objects.filter(pk=rollout_id).first()
    if rollout is None or rollout.version != seen_version or not rollout_stale_paused(rollout=rollout):
        return None
    paused_at = RolloutEvent.objects.filter(rollout_id=rollout.pk, seq=rollout.version).values_list(
        "created_at", flat=True).first()
    gap = f" after {(timezone.now() - paused_at).total_seconds():.0f} s paused" if paused_at else ""
    try:
        return rollout_resume(
            rollout=rollout.pk, actor=ANALYSIS, expected_version=seen_version,
            reason=f"the analysis runs again{gap}: resumed where the watchdog paused it",
        )  # fmt: skip
    except (Conflict, DomainError) as exc:
        logger.info("rollout %s not resumed after the stale pause: %s", rollout_id, exc)
        return None


# --- the loop, in the web process ------------------------------------------------------------------------


def watchdog_loop(stop: threading.Event, *, interval_s: float | None = None) -> None:
    """Every analysis interval until `stop` is set; a failed pass (the database restarting) is logged and the
    next one tries again."""
    interval = interval_s if interval_s is not None else float(settings.ROLLOUT_ANALYSIS_INTERVAL_S)
    since = timezone.now()
    try:
        while not stop.wait(interval):
            close_old_connections()
            try:
                rollouts_watchdog_pass(watching_since=since)
            except Exception:
                logger.exception("watchdog: the pass failed; trying again in %.1f s", interval)
                close_old_connections()
    finally:
        connection.close()


class WatchdogThread:
    """The watchdog as a daemon thread of the web server, started and stopped by its lifespan."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    async def startup(self) -> None:
        if not settings.ROLLOUT_WATCHDOG or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=watchdog_loop, args=(self._stop,), name="rollout-watchdog", daemon=True)
        self._thread.start()
        logger.info("rollout watchdog started: a rollout with no analysis for %g s is acted on", stale_after_s())

    async def shutdown(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
