"""Block Kit messages: what a person reads in Slack. Built from rows and their evidence, no queries.

Each builder returns (text, blocks): `text` is the notification and screen-reader fallback."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.urls import reverse

from rollouts.models import Rollout, RolloutEvent

Blocks = list[dict[str, Any]]

ACTION_APPROVE = "rollout_approve"
ACTION_REJECT = "rollout_reject"
# The link button: Slack sends a click on it too, which is acknowledged and otherwise ignored.
ACTION_OPEN = "rollout_open"

_ICONS = {"safe": ":white_check_mark:", "breach": ":red_circle:", "undecided": ":hourglass_flowing_sand:",
          "win": ":trophy:", "loss": ":red_circle:"}  # fmt: skip
_MAX_SECTION = 2900  # Slack's limit is 3000 characters per section text


def rollout_url(rollout_id: int) -> str:
    return settings.PUBLIC_URL + reverse("rollout-detail", kwargs={"rollout_id": rollout_id})


def _plain(text: str, limit: int = 150) -> dict[str, Any]:
    return {"type": "plain_text", "text": text[:limit], "emoji": True}


def _section(markdown: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": markdown[:_MAX_SECTION]}}


def _context(markdown: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": markdown[:_MAX_SECTION]}]}


def _escape(text: str) -> str:
    # Slack's mrkdwn treats these three as control characters.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _link_button(rollout_id: int) -> dict[str, Any]:
    return {"type": "button", "action_id": ACTION_OPEN, "text": _plain("Open rollout"), "url": rollout_url(rollout_id)}


def _num(value: Any, *, percent: bool = False, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if percent:
        number *= 100
    text = f"{number:+.3g}" if signed else f"{number:.4g}"
    return f"{text}%" if percent else text


def _n(check: dict[str, Any]) -> str:
    n = check.get("n")
    if isinstance(n, list) and len(n) == 2:
        return f"n {n[0]} / {n[1]}"
    return f"n {n}" if n is not None else ""


def check_line(check: dict[str, Any]) -> str:
    """One check of an analysis as a line: its decision, the estimate and its interval."""
    decision = str(check.get("decision") or "undecided")
    icon = _ICONS.get(decision, ":grey_question:")
    kind = check.get("type")
    name = _escape(str(check.get("name") or check.get("metric") or "?"))
    label = {"slo": "SLO", "guardrail": "guardrail", "quality": "quality", "primary": "primary"}.get(str(kind), "check")
    head = f"{icon} {label} *{name}*: {decision}"
    if "effect" not in check and "estimate" not in check:
        reason = check.get("reason")
        return f"{head} ({_escape(str(reason))})" if reason else head
    parts: list[str] = []
    if kind in ("guardrail", "primary"):
        relative = bool(check.get("relative")) or check.get("difference") == "relative"
        parts.append(
            f"effect {_num(check.get('effect'), percent=relative, signed=True)} "
            f"[{_num(check.get('low'), percent=relative, signed=True)}, {_num(check.get('high'), percent=relative, signed=True)}]"
        )
        if check.get("baseline") is not None or check.get("candidate") is not None:
            parts.append(f"baseline {_num(check.get('baseline'))} vs candidate {_num(check.get('candidate'))}")
    else:
        share = "share_limit" in check
        parts.append(
            f"{'share over the limit' if share else 'estimate'} {_num(check.get('estimate'), percent=share)} "
            f"[{_num(check.get('low'), percent=share)}, {_num(check.get('high'), percent=share)}]"
        )
    if check.get("p") is not None:
        parts.append(f"p {_num(check.get('p'))}")
    if _n(check):
        parts.append(_n(check))
    return f"{head} — {', '.join(parts)}"


def srm_line(srm: dict[str, Any] | None) -> str:
    if not srm:
        return ":grey_question: *sample ratio*: not enough requests to check yet"
    counts = srm.get("counts") or []
    expected = srm.get("expected") or []
    split = " / ".join(str(c) for c in counts)
    wanted = " / ".join(_num(e) for e in expected)
    if srm.get("mismatch"):
        return f":warning: *sample ratio mismatch*: p {_num(srm.get('p'))}, arms got {split}, expected about {wanted}"
    return f":white_check_mark: *sample ratio*: ok (p {_num(srm.get('p'))}; {split}, expected about {wanted})"


def _arm_line(name: str, arm: dict[str, Any]) -> str:
    bits = [f"n {arm.get('n', 0)}", f"errors {_num(arm.get('error_rate'), percent=True)}"]
    for key, label in (("ttft_mean_ms", "TTFT"), ("tpot_mean_ms", "TPOT"), ("e2e_mean_ms", "E2E")):
        if arm.get(key) is not None:
            bits.append(f"{label} {_num(arm.get(key))} ms")
    return f"*{name}*: {', '.join(bits)}"


def evidence_parts(evidence: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, Any]]:
    """(checks, srm, arms) of an event's evidence, whether the analysis recorded it (top level) or a
    person's transition did (the latest look, under latest_analysis)."""
    latest = evidence.get("latest_analysis") or {}
    checks = evidence.get("checks") or latest.get("checks") or []
    srm = evidence.get("srm") if "srm" in evidence else latest.get("srm")
    return list(checks), srm, dict(evidence.get("arms") or {})


def _evidence_blocks(evidence: dict[str, Any]) -> Blocks:
    checks, srm, arms = evidence_parts(evidence)
    lines = [check_line(c) for c in checks] or ["_no checks yet_"]
    blocks: Blocks = [_section("*Guardrails and SLOs*\n" + "\n".join(lines)), _section(srm_line(srm))]
    if arms:
        blocks.append(_context("  ·  ".join(_arm_line(name, arm) for name, arm in sorted(arms.items()))))
    return blocks


_STRATEGIES = {"canary": "canary", "shadow": "shadow", "ab": "A/B", "blue_green": "blue-green"}


def strategy_label(rollout: Rollout) -> str:
    return _STRATEGIES.get(rollout.strategy, rollout.strategy)


def _versions(rollout: Rollout) -> str:
    return f"*{_escape(rollout.baseline.label)}* → *{_escape(rollout.candidate.label)}*"


def step_description(rollout: Rollout, step_index: int) -> str:
    steps = rollout.steps
    if step_index >= len(steps):
        return f"the promotion of {rollout.candidate.label} (it takes all the traffic of {rollout.alias_name})"
    weight = float(steps[step_index].get("weight", 0.0))
    now = rollout.current_step
    current = f" (now {float(now['weight']):.0%})" if now is not None else ""
    return f"step {step_index + 1} of {len(steps)}: candidate weight {weight:.0%}{current}"


def approval_value(*, rollout_id: int, step_index: int, version: int) -> str:
    """What a button carries: enough to find the rollout and tell a stale click from a live one."""
    return json.dumps({"rollout": rollout_id, "step": step_index, "version": version}, separators=(",", ":"))


@dataclass(frozen=True)
class Outcome:
    """A decision on an approval message, shown in place of its buttons."""

    verb: str  # "approved", "rejected", or why the question closed ("rolled back", "paused", ...)
    who: str  # "<@U123> (alice)" or "alice (ui)"
    at: datetime
    detail: str = ""


def approval_message(
    *, rollout: Rollout, event: RolloutEvent | None, step_index: int, version: int, eval_gate: str,
    outcome: Outcome | None = None, interactive: bool = True, progress: str = "",
) -> tuple[str, Blocks]:  # fmt: skip
    """The approval request: the rollout, the step, the evidence, who has approved and who is still
    needed (`progress`), Approve / Reject and a link. With an `outcome`, the same message with the buttons
    replaced by who decided and when. Not `interactive` (notify-only, an incoming webhook): a link to
    approve in the web UI instead of buttons."""
    what = step_description(rollout, step_index)
    title = f"Approval needed: {rollout.alias_name} rollout #{rollout.pk}"
    text = f"{title}: {what}"
    blocks: Blocks = [
        {"type": "header", "text": _plain(title)},
        _section(
            f"{_versions(rollout)} ({strategy_label(rollout)}) on alias `{_escape(rollout.alias_name)}`\n"
            f"*Waiting for:* {_escape(what)}"
            + (f"\n*Why:* {_escape(event.reason)}" if event is not None and event.reason else "")
        ),
    ]
    blocks += _evidence_blocks(event.evidence if event is not None else {})
    blocks.append(_section(f"*Eval gate*: {_escape(eval_gate)}"))
    if progress:
        blocks.append(_section(f":busts_in_silhouette: *Approvals:* {_escape(progress)}"))
    if outcome is None and not interactive:
        blocks.append(_section(f"Approve or reject it in the web UI: <{rollout_url(int(rollout.pk))}|rollout #{rollout.pk}>"))
        blocks.append({"type": "actions", "elements": [_link_button(int(rollout.pk))]})
    elif outcome is None:
        value = approval_value(rollout_id=int(rollout.pk), step_index=step_index, version=version)
        blocks.append({
            "type": "actions",
            "block_id": f"approval-{rollout.pk}-{step_index}",
            "elements": [
                {"type": "button", "action_id": ACTION_APPROVE, "style": "primary", "text": _plain("Approve"), "value": value},
                {
                    "type": "button", "action_id": ACTION_REJECT, "style": "danger", "text": _plain("Reject"), "value": value,
                    "confirm": {
                        "title": _plain("Reject this step?"),
                        "text": _plain(f"Rollout #{rollout.pk} rolls back to {rollout.baseline.label}.", 300),
                        "confirm": _plain("Reject and roll back"),
                        "deny": _plain("Cancel"),
                    },
                },
                _link_button(int(rollout.pk)),
            ],
        })  # fmt: skip
    else:
        icon = {"approved": ":white_check_mark:", "rejected": ":x:", "expired": ":hourglass:"}.get(
            outcome.verb, ":information_source:"
        )
        when = outcome.at.strftime("%Y-%m-%d %H:%M:%S UTC")
        line = f"{icon} *{outcome.verb.capitalize()}* by {outcome.who} at {when}" if outcome.who else (
            f"{icon} *{outcome.verb.capitalize()}* at {when}"
        )  # fmt: skip
        if outcome.detail:
            line += f"\n{_escape(outcome.detail)}"
        blocks.append(_section(line))
        blocks.append({"type": "actions", "elements": [_link_button(int(rollout.pk))]})
        text = f"{title}: {outcome.verb}" + (f" by {outcome.who}" if outcome.who else "")
    blocks.append(_context(f"rollout #{rollout.pk} · version {version} · <{rollout_url(int(rollout.pk))}|{rollout_url(int(rollout.pk))}>"))
    return text, blocks


def _actor(event: RolloutEvent) -> str:
    if event.via == "system":
        if event.actor == "watchdog":
            return "the platform's watchdog (no analysis ran)"
        return "the platform's analysis" if event.actor == "analysis" else "the platform"
    return f"{_escape(event.actor)} (via {event.via})"


def breached_checks(evidence: dict[str, Any]) -> list[dict[str, Any]]:
    checks, _, _ = evidence_parts(evidence)
    return [c for c in checks if c.get("decision") in ("breach", "loss")]


def event_message(*, rollout: Rollout, event: RolloutEvent) -> tuple[str, Blocks]:
    """A rollback, promotion, failed eval gate or pause, with its reason and the numbers behind it."""
    alias = rollout.alias_name
    titles: dict[str, tuple[str, str]] = {
        RolloutEvent.Kind.ROLLED_BACK: (":rotating_light:", f"Rolled back: {alias} rollout #{rollout.pk}"),
        RolloutEvent.Kind.PROMOTED: (":tada:", f"Promoted: {alias} now serves {rollout.candidate.label}"),
        RolloutEvent.Kind.EVAL_GATE_FAILED: (":x:", f"Eval gate failed: {alias} rollout #{rollout.pk}"),
        RolloutEvent.Kind.PAUSED: (":double_vertical_bar:", f"Paused: {alias} rollout #{rollout.pk}"),
    }
    icon, title = titles.get(event.kind, (":information_source:", f"{alias} rollout #{rollout.pk}: {event.kind}"))
    reason = event.reason or "no reason given"
    body = f"{_versions(rollout)} ({strategy_label(rollout)})\n*Reason:* {_escape(reason)}\n*By:* {_actor(event)}"
    if event.kind == RolloutEvent.Kind.ROLLED_BACK:
        body += f"\nEvery user of `{_escape(alias)}` is back on {_escape(rollout.baseline.label)}."
    blocks: Blocks = [{"type": "header", "text": _plain(f"{icon} {title}")}, _section(body)]
    breaches = breached_checks(event.evidence or {})
    if breaches:
        blocks.append(_section("*Breached*\n" + "\n".join(check_line(c) for c in breaches)))
    gate = (event.evidence or {}).get("eval_gate")
    if isinstance(gate, dict) and gate.get("reason"):
        blocks.append(_section(f"*Eval gate*: {_escape(str(gate.get('status', '')))} — {_escape(str(gate['reason']))}"))
    blocks.append({"type": "actions", "elements": [_link_button(int(rollout.pk))]})
    blocks.append(_context(f"rollout #{rollout.pk} · {event.created_at:%Y-%m-%d %H:%M:%S} UTC"))
    text = f"{title} — {reason}"
    for check in breaches:
        text += f"; {check.get('metric') or check.get('name')}: baseline {_num(check.get('baseline'))}, candidate {_num(check.get('candidate'))}"
    return text[:3000], blocks


def engine_failed_message(*, worker: Any) -> tuple[str, Blocks]:
    """An engine the agent gave up on: which, where, why, and its last log lines."""
    label = worker.model_version.label
    title = f":boom: Engine failed: {label} (engine #{worker.pk} on {worker.host_name})"
    reason = worker.state_reason or "the engine kept crashing"
    body = (
        f"*{_escape(label)}* engine #{worker.pk} on `{_escape(worker.host_name)}` gave up after "
        f"{worker.restarts} restarts ({worker.consecutive_failures} failures in a row).\n*Reason:* {_escape(reason)}"
    )
    blocks: Blocks = [{"type": "header", "text": _plain(title)}, _section(body)]
    tail = (worker.log_tail or "").strip()
    if tail:
        lines = tail.splitlines()[-12:]
        blocks.append(_section("*Last log lines*\n```" + "\n".join(lines)[-2500:].replace("```", "'''") + "```"))
    blocks.append(_context(f"Set the worker's desired state to running again to retry · {settings.PUBLIC_URL}/admin/"))
    return f"Engine failed: {label} (engine #{worker.pk} on {worker.host_name}): {reason}"[:3000], blocks
