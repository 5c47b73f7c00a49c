"""What Slack sends, parsed strictly (a button click, a slash command), and what the person is told.

Parsing happens only after the request's signature was verified; anything malformed is refused
before any lookup or write."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.http import QueryDict

from accounts.selectors import user_roles
from config.errors import DomainError, NotFound
from rollouts.approvals import approval_status
from rollouts.models import Rollout
from rollouts.selectors import (
    rollout_get,
    rollout_health,
    rollout_latest_analysis,
    rollout_list,
    rollout_weights,
)
from rollouts.services import ACTION_ROLES, action_allowed
from rollouts.slack import blocks
from rollouts.slack.models import SlackIdentity
from rollouts.slack.services import slack_act, slack_decide, slack_identity_find, slack_identity_link

_ID = re.compile(r"^[A-Z0-9][A-Z0-9_-]{0,31}$", re.IGNORECASE)


class PayloadInvalid(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def link_url() -> str:
    return f"{settings.PUBLIC_URL}/account/slack"


def unknown_user_text() -> str:
    return (
        ":wave: Your Slack user is not linked to a platform account, so nothing was done. "
        f"Link it at {link_url()} (it gives you a `/rollout link CODE` to type here)."
    )


def _slack_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise PayloadInvalid(f"{field}: expected a Slack id")
    return value


# --- button clicks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Click:
    team_id: str
    user_id: str
    username: str
    action_id: str
    rollout_id: int = 0
    step_index: int = 0
    version: int = 0
    response_url: str = ""
    channel: str = ""
    ts: str = ""


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PayloadInvalid(f"{field}: expected a whole number >= 0")
    return value


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def click_parse(body: bytes) -> Click:
    """A block_actions payload (form field `payload`, JSON) on one of our buttons."""
    try:
        form = QueryDict(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise PayloadInvalid("body: not UTF-8") from None
    raw = form.get("payload")
    if not raw:
        raise PayloadInvalid("payload: missing")
    try:
        payload = json.loads(raw)
    except ValueError:
        raise PayloadInvalid("payload: not JSON") from None
    if not isinstance(payload, dict):
        raise PayloadInvalid("payload: expected an object")
    if payload.get("type") != "block_actions":
        raise PayloadInvalid(f"payload.type: expected block_actions, got {str(payload.get('type'))[:40]!r}")
    user, team = _obj(payload.get("user")), _obj(payload.get("team"))
    team_id = _slack_id(team.get("id") or user.get("team_id"), "team.id")
    user_id = _slack_id(user.get("id"), "user.id")
    username = str(user.get("username") or user.get("name") or "")[:150]
    actions = payload.get("actions")
    if not isinstance(actions, list) or not actions or not isinstance(actions[0], dict):
        raise PayloadInvalid("actions: expected one action")
    action = actions[0]
    action_id = action.get("action_id")
    response_url = payload.get("response_url")
    response_url = response_url if isinstance(response_url, str) and response_url.startswith(("https://", "http://")) else ""
    container = _obj(payload.get("container"))
    channel = str(container.get("channel_id") or "")[:80]
    ts = str(container.get("message_ts") or "")[:32]
    common: dict[str, Any] = {"team_id": team_id, "user_id": user_id, "username": username, "response_url": response_url[:500],
                              "channel": channel, "ts": ts}  # fmt: skip
    if action_id == blocks.ACTION_OPEN:
        return Click(action_id=action_id, **common)
    if action_id not in (blocks.ACTION_APPROVE, blocks.ACTION_REJECT):
        raise PayloadInvalid(f"actions[0].action_id: unknown action {str(action_id)[:40]!r}")
    try:
        value = json.loads(action.get("value") or "")
    except (TypeError, ValueError):
        raise PayloadInvalid("actions[0].value: not JSON") from None
    if not isinstance(value, dict):
        raise PayloadInvalid("actions[0].value: expected an object")
    return Click(
        action_id=action_id, rollout_id=_int(value.get("rollout"), "value.rollout"),
        step_index=_int(value.get("step"), "value.step"), version=_int(value.get("version"), "value.version"), **common,
    )  # fmt: skip


@dataclass(frozen=True)
class Reply:
    ok: bool
    text: str


def click_handle(click: Click) -> Reply:
    identity = slack_identity_find(team_id=click.team_id, slack_user_id=click.user_id)
    if identity is None:
        return Reply(ok=False, text=unknown_user_text())
    action = "approve" if click.action_id == blocks.ACTION_APPROVE else "reject"
    decided = slack_decide(
        identity=identity, action=action, rollout_id=click.rollout_id, step_index=click.step_index,
        version=click.version, channel=click.channel, ts=click.ts, response_url=click.response_url,
    )  # fmt: skip
    return Reply(ok=decided.ok, text=decided.text)


# --- slash commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    team_id: str
    user_id: str
    username: str
    text: str


def command_parse(body: bytes) -> Command:
    try:
        form = QueryDict(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise PayloadInvalid("body: not UTF-8") from None
    return Command(
        team_id=_slack_id(form.get("team_id"), "team_id"),
        user_id=_slack_id(form.get("user_id"), "user_id"),
        username=str(form.get("user_name") or "")[:150],
        text=str(form.get("text") or "").strip()[:1000],
    )


def usage_text(problem: str = "") -> str:
    lines = [f":warning: {problem}", ""] if problem else []
    lines += [
        "*/rollout* commands:",
        "• `/rollout status [alias]` — live rollouts, or the latest rollout of one alias",
        "• `/rollout approve <id>@<version> [note]` — approve the step the rollout waits for, as `status` showed it",
        "• `/rollout reject <id>@<version> [note]` — refuse that approval (the rollout rolls back)",
        "• `/rollout pause <id>[@<version>] [note]` — freeze the rollout at its current weights",
        "• `/rollout rollback <id>[@<version>] [note]` — send every user back to the baseline",
        f"• `/rollout link <code>` — link your Slack user to your platform account (get a code at {link_url()})",
    ]
    return "\n".join(lines)


def _status_line(rollout: Rollout) -> str:
    weights = rollout_weights(rollout=rollout)
    health = rollout_health(analysis=rollout_latest_analysis(rollout=rollout))
    step = f"step {rollout.step_index + 1} of {len(rollout.steps)}" if rollout.step_index >= 0 else "not started"
    approval = approval_status(rollout=rollout)
    driver = f" ({health['driver']})" if health.get("driver") else ""
    return (
        f"*#{rollout.pk} {rollout.alias_name}*: {rollout.baseline.label} → {rollout.candidate.label} "
        f"({blocks.strategy_label(rollout)}) — *{rollout.state.replace('_', ' ')}*, {step}, candidate at "
        f"{weights['candidate']:.0%}, health {health['status']}{driver}"
        + (f"\n    _{rollout.state_reason}_" if rollout.state_reason else "")
        + (f"\n    approvals: {approval.text}" if approval is not None else "")
        + f"\n    version {rollout.version} · <{blocks.rollout_url(int(rollout.pk))}|open rollout #{rollout.pk}>"
    )


def _status(alias: str | None) -> str:
    if alias:
        latest = rollout_list(alias=alias).first()
        if latest is None:
            return f"No rollout of the alias `{alias}`."
        return _status_line(latest)
    live = list(rollout_list(live=True)[:10])
    if not live:
        return "No live rollouts."
    return "\n".join(_status_line(r) for r in live)


def _rollout_ref(arg: str) -> tuple[int, int | None] | None:
    """"12" or "#12" -> (12, None); "12@7" -> (12, 7): the rollout and the version its caller saw."""
    ident, _, version = arg.lstrip("#").partition("@")
    if not ident.isdigit() or len(ident) >= 12 or (version and (not version.isdigit() or len(version) >= 12)):
        return None
    return int(ident), int(version) if version else None


def command_handle(command: Command) -> str:
    words = command.text.split()
    verb = words[0].lower() if words else "help"
    if verb in ("help", "?"):
        return usage_text()
    if verb == "link":
        if len(words) != 2:
            return usage_text("`/rollout link` needs the code from your profile page.")
        try:
            linked = slack_identity_link(
                code=words[1], team_id=command.team_id, slack_user_id=command.user_id, slack_username=command.username
            )
        except DomainError as exc:
            return f":no_entry: Not linked: {exc.message}."
        return f":link: Linked: <@{linked.slack_user_id}> acts as *{linked.user.get_username()}* on the platform."
    if verb not in ("status", "approve", "reject", "pause", "rollback"):
        return usage_text(f"Unknown command `{verb[:30]}`.")
    identity = slack_identity_find(team_id=command.team_id, slack_user_id=command.user_id)
    if identity is None:
        return unknown_user_text()
    if verb == "status":
        if len(words) > 2:
            return usage_text("`/rollout status` takes at most one alias.")
        if not user_roles(user=identity.user):
            return ":no_entry: Your platform account has no role, so it cannot see rollouts."
        return _status(words[1] if len(words) == 2 else None)
    ref = _rollout_ref(words[1]) if len(words) >= 2 else None
    if ref is None:
        return usage_text(f"`/rollout {verb}` needs a rollout id, e.g. `/rollout {verb} 12` (or `12@7`: at version 7).")
    note = " ".join(words[2:])[:500]
    return _act(identity, verb, ref[0], ref[1], note)


def _act(identity: SlackIdentity, verb: str, rollout_id: int, version: int | None, note: str) -> str:
    try:
        rollout = rollout_get(rollout_id=rollout_id)
    except NotFound:
        return f":grey_question: No rollout {rollout_id}. Nothing changed."
    if verb in ("approve", "reject"):
        if not action_allowed(user=identity.user, action=verb):
            roles = " or ".join(role.value for role in ACTION_ROLES[verb])
            return f":no_entry: You cannot {verb} this: {verb} needs the role {roles}. Nothing changed."
        if version is None:
            # A decision names what it decides on: show it, and the exact command that decides on it.
            return (
                f":information_source: Nothing changed yet. {_status_line(rollout)}\n"
                f"To {verb} what you see, type `/rollout {verb} {rollout_id}@{rollout.version}"
                + (f" {note}" if note else "") + "` (the @version makes sure nobody changed it meanwhile)."
            )
        return slack_decide(identity=identity, action=verb, rollout_id=rollout_id, version=version, note=note).text
    return slack_act(identity=identity, action=verb, rollout_id=rollout_id, version=version, note=note).text
