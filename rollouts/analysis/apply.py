"""One look, applied: claim the rollout's lease, look (`policy.rollout_look`), apply the decision through the
rollout's services with the version the look read, and store the look as a `RolloutAnalysis` row."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection, transaction

from config.errors import Conflict, DomainError
from rollouts.actors import ANALYSIS
from rollouts.analysis.look import LEASE_S, D, Look
from rollouts.analysis.policy import rollout_look
from rollouts.models import Rollout, RolloutAnalysis
from rollouts.services import (
    rollout_advance,
    rollout_analysis_claim,
    rollout_analysis_release,
    rollout_analysis_renew,
    rollout_eval_gate_decided,
    rollout_pause,
    rollout_promote,
    rollout_rollback,
)

logger = logging.getLogger(__name__)


def _apply(rollout: Rollout, look: Look) -> bool:
    """Apply the look's decision if the rollout is still at the version it read. True when applied."""
    version = rollout.version
    evidence = look.evidence()
    common: dict[str, Any] = {"rollout": rollout.pk, "actor": ANALYSIS, "reason": look.reason, "expected_version": version}
    if look.decision == D.HOLD:
        return False
    if look.decision == D.ROLLBACK:
        rollout_rollback(**common, evidence=evidence)
    elif look.decision == D.PROMOTE and rollout.state == Rollout.State.BAKING:
        rollout_promote(**common, evidence=evidence)  # the bake passed
    elif look.decision in (D.ADVANCE, D.AWAIT_APPROVAL) or (look.decision == D.PROMOTE and rollout.strategy != "ab"):
        rollout_advance(**common, evidence=evidence)
    elif look.decision == D.PROMOTE:
        rollout_promote(**common, evidence=evidence)
    elif look.decision == D.PAUSE:
        rollout_pause(**common, evidence=evidence)
    elif look.decision in (D.GATE_PASSED, D.GATE_FAILED):
        rollout_eval_gate_decided(
            rollout=rollout.pk, passed=look.decision == D.GATE_PASSED, reason=look.reason, evidence=evidence,
            expected_version=version,
        )  # fmt: skip
    return True


class LeaseKept:
    """While a look runs, a thread of its own (with its own database connection) renews the look's lease
    every third of `lease_s`, for at most ROLLOUT_LOOK_MAX_S. A long look (one that builds a window's
    rollup from a day of records: minutes at 100 million records a day) then keeps other workers from
    starting the same look beside it, and the watchdog, which reads a held lease as a look under way, from
    pausing the rollout as if its analysis had stopped. A worker that dies stops renewing: the lease runs
    out within `lease_s`. A look inside a caller's transaction renews nothing (no other connection sees its
    lease). `held_until`: the lease's end as last written, what the look lets go of."""

    def __init__(self, rollout_id: int, held_until: datetime, *, lease_s: float) -> None:
        self.rollout_id, self.held_until, self.lease_s = rollout_id, held_until, lease_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LeaseKept:
        if not connection.in_atomic_block:
            self._thread = threading.Thread(target=self._run, name=f"lease-{self.rollout_id}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        deadline = time.monotonic() + float(settings.ROLLOUT_LOOK_MAX_S)
        try:
            while not self._stop.wait(self.lease_s / 3):
                if time.monotonic() >= deadline:
                    logger.warning("rollout %s: a look running for over %g s no longer renews its lease",
                                   self.rollout_id, settings.ROLLOUT_LOOK_MAX_S)  # fmt: skip
                    return
                try:
                    until = rollout_analysis_renew(rollout_id=self.rollout_id, held_until=self.held_until,
                                                   lease_s=self.lease_s)  # fmt: skip
                except DatabaseError:  # (the database restarting, SQLite's lock): the next renewal tries again
                    logger.warning("rollout %s: the look's lease was not renewed", self.rollout_id, exc_info=True)
                    continue
                if until is None:
                    logger.warning("rollout %s: a running look lost its lease", self.rollout_id)
                    return
                self.held_until = until
        finally:
            connection.close()  # this thread's own connection


def rollout_analyse(*, rollout_id: int, now: datetime | None = None) -> RolloutAnalysis | None:
    """One look at one rollout: measure, decide, apply (at most once), record. None when skipped
    (another worker holds the lease, the rollout is gone or not live). The lease is renewed while the
    look runs (`LeaseKept`)."""
    held_until = rollout_analysis_claim(rollout_id=rollout_id, lease_s=LEASE_S)
    if held_until is None:
        return None
    kept = LeaseKept(rollout_id, held_until, lease_s=LEASE_S)
    done = _Done()
    try:
        with kept:
            return _analyse(rollout_id, now, done)
    finally:
        # After the renewals have stopped: the lease is let go at the end this look last gave it.
        rollout_analysis_release(rollout_id=rollout_id, readiness=done.readiness, analysed=done.completed,
                                 held_until=kept.held_until)  # fmt: skip


@dataclass
class _Done:
    """What a look leaves for the release of its lease."""

    readiness: dict[str, Any] | None = None
    completed: bool = False  # only a look that completes counts as one (rollouts.watchdog reads last_analysed_at)


def _analyse(rollout_id: int, now: datetime | None, done: _Done) -> RolloutAnalysis | None:
    rollout = Rollout.objects.select_related("baseline", "candidate").filter(pk=rollout_id).first()
    if rollout is None or rollout.state not in Rollout.ANALYSED_STATES:
        return None
    look, done.readiness = rollout_look(rollout=rollout, now=now)
    with transaction.atomic():
        try:
            applied = _apply(rollout, look)
        except Conflict as exc:
            # Another look or a person got there first: this decision was made on stale data.
            applied = False
            look.reason = f"{look.reason} (not applied: {exc.message})"[:500]
        except DomainError as exc:
            applied = False
            look.reason = f"{look.reason} (not applied: {exc.message})"[:500]
        stored = RolloutAnalysis.objects.create(
            rollout_id=rollout.pk,
            rollout_version=rollout.version,
            state=rollout.state,
            step_index=rollout.step_index,
            window_start=look.window_start,
            decision=look.decision,
            reason=look.reason[:500],
            applied=applied,
            arms=look.arms,
            checks=look.checks,
            srm=look.srm,
            comparisons=look.comparisons,
        )
        done.completed = True
        return stored


def rollout_evidence(*, rollout_id: int) -> dict[str, Any]:
    """What a person's transition records as its evidence: the latest look, its arms over the window it read
    and its checks, as the rollout's page showed them. Read, never recomputed: folding the step's records
    inside a person's request would cost up to a cold look (seconds on a busy rollout) and keep a second
    rollup window beside the looks' own. Empty before the first look."""
    latest = RolloutAnalysis.objects.filter(rollout_id=rollout_id).order_by("-created_at", "-id").first()
    if latest is None:
        return {}
    evidence: dict[str, Any] = {
        "arms": latest.arms or {},
        "latest_analysis": {
            "at": latest.created_at.isoformat(), "step_index": latest.step_index, "decision": latest.decision,
            "reason": latest.reason, "checks": latest.checks, "srm": latest.srm,
        },
    }  # fmt: skip
    if latest.window_start is not None:
        evidence["window_start"] = latest.window_start.isoformat()
    return evidence


def analysis_interval_s() -> float:
    return float(settings.ROLLOUT_ANALYSIS_INTERVAL_S)

