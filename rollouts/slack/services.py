"""Every write of the Slack integration: identities, the messages the platform posts, and the decisions
people make by clicking or typing in Slack (which go through the rollouts services like any other)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from config.errors import Conflict, DomainError, Forbidden, NotFound
from rollouts.actors import Actor
from rollouts.approvals import approval_request_current, approval_status, approval_ttl, approvals_required
from rollouts.models import Rollout, RolloutApproval, RolloutEvent
from rollouts.services import rollout_approve, rollout_reject
from rollouts.slack import blocks, client
from rollouts.slack.client import SlackPermanentError, SlackTransientError
from rollouts.slack.models import SlackIdentity, SlackMessage
from serving.selectors import engine_worker_get, engine_workers_failed_since

logger = logging.getLogger(__name__)

Kind = RolloutEvent.Kind
MAX_ATTEMPTS = 5
# A claim older than this belongs to a task that died mid-post; the next attempt takes it over.
STALE_CLAIM = timedelta(minutes=5)
# Engine failures older than this when first seen are history, not news.
ENGINE_FAILURE_LOOKBACK = timedelta(hours=1)
LINK_CODE_TTL_S = 10 * 60
_LINK_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O or 1/I: people type these codes

MESSAGE_KINDS = {
    Kind.AWAITING_APPROVAL: SlackMessage.Kind.APPROVAL,
    Kind.ROLLED_BACK: SlackMessage.Kind.ROLLED_BACK,
    Kind.PROMOTED: SlackMessage.Kind.PROMOTED,
    Kind.EVAL_GATE_FAILED: SlackMessage.Kind.EVAL_GATE_FAILED,
    Kind.PAUSED: SlackMessage.Kind.PAUSED,
}


# --- identities ----------------------------------------------------------------------------------------


def slack_identity_find(*, team_id: str, slack_user_id: str) -> SlackIdentity | None:
    return (
        SlackIdentity.objects.select_related("user")
        .filter(team_id=team_id, slack_user_id=slack_user_id, user__is_active=True)
        .first()
    )


def slack_link_code_create(*, user: Any) -> str:
    """A one-time code the user types as `/rollout link CODE` in Slack: Slack's signed request then proves
    which Slack user they are, so nobody can claim someone else's Slack account."""
    code = "".join(secrets.choice(_LINK_ALPHABET) for _ in range(8))
    cache.set(f"slack:link:{code}", int(user.pk), timeout=LINK_CODE_TTL_S)
    return code


def slack_identity_link(*, code: str, team_id: str, slack_user_id: str, slack_username: str = "") -> SlackIdentity:
    """Link the Slack user who sent the code to the platform user who asked for it (replacing that user's
    earlier link in the same workspace). The code works once."""
    from django.contrib.auth import get_user_model

    normalised = code.strip().upper().replace("-", "")
    key = f"slack:link:{normalised}"
    user_id = cache.get(key) if normalised.isalnum() and len(normalised) <= 16 else None
    if user_id is None:
        raise DomainError("unknown or expired link code: get a new one on your profile page", field="code")
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        raise NotFound("the account that asked for this code no longer exists", field="code")
    with transaction.atomic():
        taken = SlackIdentity.objects.filter(team_id=team_id, slack_user_id=slack_user_id).exclude(user=user).first()
        if taken is not None:
            raise Conflict(
                f"this Slack user is linked to {taken.user.get_username()} already: unlink it there first",
                field="slack_user_id",
            )
        SlackIdentity.objects.filter(user=user, team_id=team_id).exclude(slack_user_id=slack_user_id).delete()
        try:
            identity, _ = SlackIdentity.objects.update_or_create(
                team_id=team_id, slack_user_id=slack_user_id,
                defaults={"user": user, "slack_username": slack_username[:150]},
            )  # fmt: skip
        except IntegrityError:
            raise Conflict("this Slack user was linked by someone else a moment ago", field="slack_user_id") from None
    cache.delete(key)
    return identity


def slack_identity_unlink(*, user: Any, identity_id: int) -> bool:
    deleted, _ = SlackIdentity.objects.filter(pk=identity_id, user=user).delete()
    return deleted > 0


# --- posting -----------------------------------------------------------------------------------------


def _backoff_s(attempts: int, retry_after_s: float | None = None) -> float:
    return max(retry_after_s or 0.0, min(300.0, 10.0 * 2 ** max(attempts - 1, 0)))


def _claim(message_id: int) -> bool:
    """Compare-and-set: only one task posts a message; a claim whose task died is taken over."""
    now = timezone.now()
    claimed = SlackMessage.objects.filter(pk=message_id, status=SlackMessage.Status.PENDING).update(
        status=SlackMessage.Status.POSTING, claimed_at=now, attempts=F("attempts") + 1
    )
    if claimed:
        return True
    return bool(
        SlackMessage.objects.filter(
            pk=message_id, status=SlackMessage.Status.POSTING, claimed_at__lt=now - STALE_CLAIM
        ).update(claimed_at=now, attempts=F("attempts") + 1)
    )


def _deliver(message_id: int, build: Callable[[SlackMessage, bool], tuple[str, list[dict[str, Any]]]]) -> str:
    """Post a message once (whoever claims it). A transient error raises SlackTransientError with the row
    pending again, or failed after MAX_ATTEMPTS; a permanent error marks it failed and returns."""
    if not _claim(message_id):
        return str(SlackMessage.objects.filter(pk=message_id).values_list("status", flat=True).first() or "missing")
    message = SlackMessage.objects.get(pk=message_id)
    how = client.mode()
    try:
        if how == "off":
            raise SlackPermanentError("Slack is not configured (no SLACK_BOT_TOKEN or SLACK_WEBHOOK_URL)")
        text, message_blocks = build(message, how == "bot")
        if how == "bot":
            posted = client.post_message(channel=message.channel, text=text, blocks=message_blocks)
            changes: dict[str, Any] = {"via": "bot", "channel": posted.channel, "ts": posted.ts}
        else:
            client.webhook_send(url=str(settings.SLACK_WEBHOOK_URL), text=text, blocks=message_blocks)
            changes = {"via": "webhook"}
    except SlackTransientError as exc:
        final = message.attempts >= MAX_ATTEMPTS
        SlackMessage.objects.filter(pk=message_id).update(
            status=SlackMessage.Status.FAILED if final else SlackMessage.Status.PENDING, claimed_at=None,
            last_error=exc.message[:500],
            next_attempt_at=timezone.now() + timedelta(seconds=_backoff_s(message.attempts, exc.retry_after_s)),
        )  # fmt: skip
        logger.warning("slack message %s: %s (attempt %s of %s)", message.key, exc.message, message.attempts, MAX_ATTEMPTS)
        raise  # the caller's retry budget ends too; a failed row is never claimed again
    except (SlackPermanentError, NotFound) as exc:
        reason = exc.message
        SlackMessage.objects.filter(pk=message_id).update(
            status=SlackMessage.Status.FAILED, claimed_at=None, last_error=reason[:500]
        )
        logger.error("slack message %s not posted: %s", message.key, reason)
        return SlackMessage.Status.FAILED
    SlackMessage.objects.filter(pk=message_id).update(
        status=SlackMessage.Status.POSTED, claimed_at=None, posted_at=timezone.now(), last_error="", **changes
    )
    return SlackMessage.Status.POSTED


def eval_gate_summary(*, rollout: Rollout) -> str:
    """The eval gate's verdict as the audit trail recorded it."""
    if not rollout.plan.get("eval_gate"):
        return "none in this plan"
    event = (
        RolloutEvent.objects.filter(rollout=rollout, kind__in=(Kind.EVAL_GATE_PASSED, Kind.EVAL_GATE_FAILED))
        .order_by("-seq")
        .first()
    )
    if event is None:
        return "not decided yet"
    verdict = "passed" if event.kind == Kind.EVAL_GATE_PASSED else "failed"
    return f"{verdict}: {event.reason}" if event.reason else verdict


def _approval_outcome(message: SlackMessage) -> blocks.Outcome | None:
    if not message.outcome or message.outcome_at is None:
        return None
    detail = ""
    if message.outcome == "expired":
        detail = "This request can no longer be used. A release manager asks again, and a new message comes with it."
    return blocks.Outcome(verb=message.outcome, who=message.outcome_by, at=message.outcome_at, detail=detail)


def _progress(rollout: Rollout, request_seq: int, message: SlackMessage) -> tuple[str, int]:
    """(who has approved and who is still needed, the version its buttons carry) for an approval message
    whose request is the one the rollout waits on; ("", the message's version) for any other."""
    status = approval_status(rollout=rollout)
    if status is None or status.request.seq != request_seq:
        return "", int(message.rollout_version or 0)
    return status.text, int(rollout.version)


def _build_event_message(message: SlackMessage, interactive: bool) -> tuple[str, list[dict[str, Any]]]:
    if message.event_id is None:
        raise SlackPermanentError(f"slack message {message.key} is about no rollout event")
    event = RolloutEvent.objects.select_related("rollout", "rollout__baseline", "rollout__candidate").get(pk=message.event_id)
    rollout = event.rollout
    if message.kind == SlackMessage.Kind.APPROVAL:
        progress, version = _progress(rollout, int(event.seq), message)
        outcome = _approval_outcome(message)
        if outcome is not None and outcome.verb == "approved":
            progress = ""  # the outcome names everyone who approved
        return blocks.approval_message(
            rollout=rollout, event=event, step_index=int(message.step_index or 0),
            version=version or int(message.rollout_version or event.seq), eval_gate=eval_gate_summary(rollout=rollout),
            outcome=outcome, interactive=interactive, progress=progress,
        )  # fmt: skip
    return blocks.event_message(rollout=rollout, event=event)


def slack_event_post(*, event_id: int) -> str:
    """The Slack dispatcher of the rollouts notification hook: post the event (once), and close the
    approval messages the event settles. Raises SlackTransientError to be retried."""
    if client.mode() == "off":
        return "off"
    event = RolloutEvent.objects.select_related("rollout").filter(pk=event_id).first()
    if event is None:
        logger.info("rollout event %s is gone; nothing posted to Slack", event_id)
        return "missing"
    if event.kind == Kind.APPROVAL_ADDED:
        # Not a message of its own: the open approval message shows who has approved and who is still needed.
        return f"{approval_messages_progress(rollout_id=int(event.rollout_id))} updated"
    kind = MESSAGE_KINDS.get(event.kind)  # type: ignore[call-overload]
    if kind is None:
        return "not notable"
    message, _ = SlackMessage.objects.get_or_create(
        key=f"event:{event.pk}",
        defaults={
            "kind": kind, "rollout": event.rollout, "event": event, "channel": client.channel_for(alias=event.rollout.alias_name),
            "step_index": event.step_index + 1 if kind == SlackMessage.Kind.APPROVAL else None,
            "rollout_version": event.seq,
        },
    )  # fmt: skip
    status = _deliver(message.pk, _build_event_message)
    approval_messages_close(rollout_id=int(event.rollout_id))
    return status


def slack_event_dispatch(event: RolloutEvent) -> None:
    """The callable registered with rollouts.notifications (it passes the event row)."""
    slack_event_post(event_id=int(event.pk))


# --- approval messages: showing the decision ---------------------------------------------------------


def _who(identity: SlackIdentity) -> str:
    """How a Slack user is named in the audit trail and in messages: a mention, and the platform user."""
    return f"<@{identity.slack_user_id}> ({identity.user.get_username()})"


def _named(event: RolloutEvent) -> str:
    if event.via == "slack" and event.actor_detail:
        return f"<@{event.actor_detail.rsplit('/', 1)[-1]}> ({event.actor})"
    return event.actor if event.via == "system" else f"{event.actor} (via {event.via})"


def _request_seq(message: SlackMessage) -> int | None:
    if message.event_id is None:
        return None
    return RolloutEvent.objects.filter(pk=message.event_id).values_list("seq", flat=True).first()


def _approvers_named(rollout: Rollout, step_index: int, request_seq: int) -> tuple[str, datetime] | None:
    """Everyone who approved the request, named as the audit trail has them, and the last approval's time;
    None unless the request gathered every approval it needed (or is from before requests were numbered)."""
    rows = list(
        RolloutApproval.objects.select_related("approved_by")
        .filter(rollout=rollout, step_index=step_index, request_seq__in=(request_seq, 0))
        .order_by("created_at", "id")
    )  # fmt: skip
    people = list(dict.fromkeys(row.approved_by_id for row in rows))
    if not rows or (all(row.request_seq for row in rows) and len(people) < approvals_required(rollout)):
        return None
    names = []
    for row in rows:
        event = (
            RolloutEvent.objects.filter(
                rollout=rollout, actor_user=row.approved_by, seq__gt=request_seq,
                kind__in=(Kind.APPROVAL_ADDED, Kind.APPROVED, Kind.PROMOTED),
            )
            .order_by("seq")
            .first()
        )  # fmt: skip
        names.append(_named(event) if event is not None else row.approved_by.get_username())
    return ", ".join(dict.fromkeys(names)), rows[-1].created_at


def _decision_of(rollout: Rollout, message: SlackMessage) -> tuple[str, str, datetime] | None:
    """(verb, who, when) if the request an approval message asks about is settled, else None (still open,
    or paused while waiting: it comes back to the same request). Settled: approved by everyone it needed,
    expired (or replaced by a newer request), or the wait ended another way (rejected, rolled back, ...)."""
    step_index = int(message.step_index or 0)
    request_seq = _request_seq(message) or 0
    current = approval_request_current(rollout=rollout)
    if current is not None and current.seq == request_seq:
        return ("expired", "", current.expires_at) if timezone.now() >= current.expires_at else None
    approved = _approvers_named(rollout, step_index, request_seq)
    if approved is not None:
        return "approved", approved[0], approved[1]
    if current is not None and current.step_index == step_index:
        # Asked again: this request had expired.
        asked = RolloutEvent.objects.filter(rollout=rollout, seq=request_seq).values_list("created_at", flat=True).first()
        return "expired", "", (asked or current.requested_at) + approval_ttl(rollout)
    last = RolloutEvent.objects.filter(rollout=rollout).order_by("-seq").first()
    if last is None:
        return None
    return str(last.kind).replace("_", " "), _named(last), last.created_at


def approval_outcome_record(*, message: SlackMessage, verb: str, who: str, at: datetime) -> bool:
    """Write the decision onto the message row (once) and have a task show it. True when newly recorded."""
    recorded = SlackMessage.objects.filter(pk=message.pk, outcome="").update(
        outcome=verb, outcome_by=who[:300], outcome_at=at, outcome_shown=False
    )
    if recorded:
        message_id = int(message.pk)
        transaction.on_commit(lambda: _enqueue_refresh(message_id))
    return bool(recorded)


def _enqueue_refresh(message_id: int) -> None:
    from rollouts.slack.tasks import slack_message_refresh as slack_message_refresh_task

    try:
        slack_message_refresh_task.delay(message_id)
    except Exception:  # the broker is down: the message keeps its buttons, and a click says what happened
        logger.exception("could not enqueue the update of slack message %s", message_id)


def approval_messages_close(*, rollout_id: int) -> int:
    """Approval messages of the rollout whose question is settled (decided anywhere: the UI, the API, a
    rollback) get the decision in place of their buttons."""
    rollout = Rollout.objects.filter(pk=rollout_id).first()
    if rollout is None:
        return 0
    closed = 0
    for message in SlackMessage.objects.filter(rollout=rollout, kind=SlackMessage.Kind.APPROVAL, outcome=""):
        decided = _decision_of(rollout, message)
        if decided is not None and approval_outcome_record(message=message, verb=decided[0], who=decided[1], at=decided[2]):
            closed += 1
    return closed


def slack_message_refresh(*, message_id: int) -> str:
    """Show the recorded decision on an approval message: chat.update with the bot token, else the click's
    response_url. Raises SlackTransientError to be retried."""
    message = SlackMessage.objects.filter(pk=message_id).first()
    if message is None:
        logger.info("slack message %s is gone", message_id)
        return "missing"
    if message.kind != SlackMessage.Kind.APPROVAL or (message.outcome and message.outcome_shown):
        return "nothing to show"
    # No outcome yet: the open request's progress (who has approved, who is still needed).
    if message.event_id is None:
        return "no event"
    text, message_blocks = _build_event_message(message, True)
    try:
        if message.ts and message.via == "bot" and client.mode() == "bot":
            client.update_message(channel=message.channel, ts=message.ts, text=text, blocks=message_blocks)
        elif message.response_url:
            client.webhook_send(url=message.response_url, text=text, blocks=message_blocks, replace_original=True)
        else:
            return "cannot update (no ts and no response_url)"
    except SlackPermanentError as exc:
        SlackMessage.objects.filter(pk=message_id).update(last_error=exc.message[:500])
        logger.error("slack message %s not updated: %s", message.key, exc.message)
        return "failed"
    SlackMessage.objects.filter(pk=message_id).update(outcome_shown=bool(message.outcome), last_error="")
    return "updated"


def approval_messages_progress(*, rollout_id: int) -> int:
    """An approval was added: the open approval messages of the rollout show who has approved so far and
    who is still needed (and their buttons carry the new version). Raises SlackTransientError to be retried."""
    updated = 0
    for message_id in SlackMessage.objects.filter(
        rollout_id=rollout_id, kind=SlackMessage.Kind.APPROVAL, outcome="", status=SlackMessage.Status.POSTED
    ).values_list("pk", flat=True):
        if slack_message_refresh(message_id=int(message_id)) == "updated":
            updated += 1
    return updated


def approval_messages_expire() -> int:
    """Beat: approval messages whose request expired say so in place of their buttons (a click on one would
    be told the same). Returns how many were closed."""
    closed = 0
    open_rollouts = (
        SlackMessage.objects.filter(kind=SlackMessage.Kind.APPROVAL, outcome="", rollout__isnull=False)
        .values_list("rollout_id", flat=True)
        .distinct()
    )
    for rollout_id in list(open_rollouts[:500]):
        closed += approval_messages_close(rollout_id=int(rollout_id))
    return closed


def slack_respond(*, response_url: str, text: str) -> None:
    """An ephemeral reply (only the person who clicked sees it) through the click's response_url."""
    client.webhook_send(url=response_url, text=text, response_type="ephemeral", replace_original=False)


# --- decisions from Slack ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Decided:
    ok: bool
    text: str  # what the person is told


def _actor(identity: SlackIdentity) -> Actor:
    return Actor.of(identity.user, via="slack", detail=f"{identity.team_id}/{identity.slack_user_id}")


def _refusal(exc: DomainError, action: str) -> str:
    if isinstance(exc, Forbidden):
        return f":no_entry: You cannot {action} this: {exc.message}. Nothing changed."
    if isinstance(exc, NotFound):
        return f":grey_question: {exc.message}. Nothing changed."
    return f":information_source: Nothing changed: {exc.message}."


def _settled_text(rollout_id: int, step_index: int, message: SlackMessage | None) -> str | None:
    rollout = Rollout.objects.filter(pk=rollout_id).first()
    if rollout is None or message is None:
        return None
    decided = _decision_of(rollout, message)
    what = blocks.step_description(rollout, step_index)
    if decided is not None and decided[0] == "expired":
        return (
            f":hourglass: This approval request for {what} expired at {decided[2]:%Y-%m-%d %H:%M:%S} UTC, so it can no "
            f"longer be used. Nothing changed. A release manager asks again (`rolloutctl request-approval {rollout_id}` "
            "or the rollout's page), and a new message comes with it."
        )
    if decided is not None:
        verb, who, at = decided
        by = f" by {who}" if who else ""
        return f":information_source: Already decided: {what} was {verb}{by} at {at:%Y-%m-%d %H:%M:%S} UTC. Nothing changed."
    return None


def _approval_message_for(*, rollout_id: int, step_index: int | None, channel: str, ts: str, response_url: str) -> SlackMessage | None:
    """The approval message a click came from (by its channel and ts), else the latest one for the step."""
    messages = SlackMessage.objects.filter(rollout_id=rollout_id, kind=SlackMessage.Kind.APPROVAL)
    found = messages.filter(channel=channel, ts=ts).first() if channel and ts else None
    if found is None and step_index is not None:
        found = messages.filter(step_index=step_index).order_by("-id").first()
    if found is not None and response_url and not found.response_url:
        SlackMessage.objects.filter(pk=found.pk).update(response_url=response_url[:500])
        found.response_url = response_url[:500]
    return found


def slack_decide(
    *, identity: SlackIdentity, action: str, rollout_id: int, step_index: int | None = None, version: int | None = None,
    note: str = "", channel: str = "", ts: str = "", response_url: str = "",
) -> Decided:  # fmt: skip
    """Approve or reject (a button, or `/rollout approve ID@VERSION`) as the linked user, through the rollouts
    services: their role, four-eyes, expiry and version checks apply unchanged (a button carries the version
    its message showed). The audit event names the Slack user."""
    actor = _actor(identity)
    who = _who(identity)
    verbs = {"approve": "approved", "reject": "rejected"}
    reason = f"{verbs[action]} in Slack by {who}" + (f": {note}" if note else "")
    message = _approval_message_for(
        rollout_id=rollout_id, step_index=step_index, channel=channel, ts=ts, response_url=response_url
    )
    service = rollout_approve if action == "approve" else rollout_reject
    try:
        with transaction.atomic():
            rollout = service(
                rollout=rollout_id, actor=actor, reason=reason, step_index=step_index, expected_version=version or None
            )
            waiting = rollout.state == Rollout.State.AWAITING_APPROVAL
            if message is not None and not waiting:
                names = who
                if action == "approve":
                    settled = _decision_of(rollout, message)
                    names = settled[1] if settled is not None and settled[0] == "approved" else who
                approval_outcome_record(message=message, verb=verbs[action], who=names, at=timezone.now())
            if not waiting:
                approval_messages_close(rollout_id=rollout_id)  # a typed command names no message: find them
    except DomainError as exc:
        settled_text = None
        if isinstance(exc, Conflict) and step_index is not None:
            settled_text = _settled_text(rollout_id, step_index, message)
            approval_messages_close(rollout_id=rollout_id)
        return Decided(ok=False, text=settled_text or _refusal(exc, action))
    if action == "approve":
        status = approval_status(rollout=rollout)
        if status is not None:
            return Decided(ok=True, text=f":white_check_mark: Your approval is recorded: {status.text}.")
        now = (
            f"step {rollout.step_index + 1} is live (candidate at {float(rollout.current_step['weight']):.0%})"
            if rollout.state == Rollout.State.RUNNING and rollout.current_step else f"the rollout is {rollout.state}"
        )  # fmt: skip
        return Decided(ok=True, text=f":white_check_mark: Approved rollout #{rollout_id}: {now}.")
    return Decided(ok=True, text=f":x: Rejected: rollout #{rollout_id} rolled back to {rollout.baseline.label}.")


def slack_act(
    *, identity: SlackIdentity, action: str, rollout_id: int, version: int | None = None, note: str = ""
) -> Decided:
    """`/rollout pause|rollback <id>[@version]` as the linked user, through the rollouts services. These stop
    harm, so they act on the rollout as it is unless the command names the version it saw."""
    from rollouts.services import rollout_pause, rollout_rollback

    who = _who(identity)
    past = {"pause": "paused", "rollback": "rolled back"}[action]
    reason = f"{past} in Slack by {who}" + (f": {note}" if note else "")
    service = rollout_pause if action == "pause" else rollout_rollback
    try:
        rollout = service(rollout=rollout_id, actor=_actor(identity), reason=reason, expected_version=version)
    except DomainError as exc:
        return Decided(ok=False, text=_refusal(exc, "pause" if action == "pause" else "roll back"))
    return Decided(ok=True, text=f":white_check_mark: Rollout #{rollout.pk} {past} ({rollout.alias_name}).")


# --- engine crash loops ------------------------------------------------------------------------------


def _build_engine_message(message: SlackMessage, interactive: bool) -> tuple[str, list[dict[str, Any]]]:
    worker = engine_worker_get(worker_id=int(message.engine_worker_id or 0))
    return blocks.engine_failed_message(worker=worker)


def slack_engine_failures_notify(*, now: datetime | None = None) -> int:
    """Beat: one message per failure episode of an engine (a worker entering FAILED at a given time); a
    worker that is retried and fails again is a new episode. Returns how many were posted."""
    if client.mode() == "off":
        return 0
    now = now or timezone.now()
    for worker in engine_workers_failed_since(since=now - ENGINE_FAILURE_LOOKBACK):
        changed = worker.state_changed_at or now
        SlackMessage.objects.get_or_create(
            key=f"engine:{worker.pk}:{changed.isoformat()}",
            defaults={"kind": SlackMessage.Kind.ENGINE_FAILED, "engine_worker_id": worker.pk,
                      "channel": client.channel_for(alias=None)},
        )  # fmt: skip
    due = SlackMessage.objects.filter(
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now),
        kind=SlackMessage.Kind.ENGINE_FAILED, status=SlackMessage.Status.PENDING,
        created_at__gte=now - ENGINE_FAILURE_LOOKBACK,
    ).order_by("id")  # fmt: skip
    posted = 0
    for message_id in list(due.values_list("pk", flat=True)[:50]):
        try:
            if _deliver(message_id, _build_engine_message) == SlackMessage.Status.POSTED:
                posted += 1
        except SlackTransientError:
            continue  # pending again with a backoff; a later beat retries it
    return posted
