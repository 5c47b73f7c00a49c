"""rolloutctl: create, follow and steer rollouts from a CI pipeline.

Environment: RAMP_TOKEN (or RAMP_TOKEN_FILE), an API token; RAMP_URL, the platform
(default http://127.0.0.1:8000).

Actions (advance, approve, rollback, ...) send the rollout's version as you saw it (--expect-version N,
or read just before) and an Idempotency-Key: a retried command gets the first answer and does nothing
again; a rollout that changed since is refused (error 409, saying what changed).

Exit codes: 0 success (for `wait`: promoted), 1 rolled back, 2 aborted, 3 timed out (`wait`),
4 a usage, configuration or API error (a stale action's 409 included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

import httpx

from rolloutctl import __version__
from rolloutctl.client import (
    DEFAULT_URL,
    ApiError,
    Client,
    ConfigError,
    action_idempotency_key,
    idempotency_key_for,
    token_from_env,
)

EXIT_OK, EXIT_ROLLED_BACK, EXIT_ABORTED, EXIT_TIMEOUT, EXIT_ERROR = 0, 1, 2, 3, 4
TERMINAL_EXIT = {"promoted": EXIT_OK, "rolled_back": EXIT_ROLLED_BACK, "aborted": EXIT_ABORTED}
# Every action sends the rollout's version as the caller saw it (--expect-version, or read just before) and
# an Idempotency-Key, so a retry never acts twice and a stale action is refused saying what changed.
ACTIONS = {
    "start": "start a draft rollout",
    "pause": "freeze a rollout at its current weights",
    "resume": "carry on from where it was paused",
    "advance": "finish the current step now",
    "promote": "make the candidate the alias's baseline now",
    "abort": "stop without a verdict",
    "approve": "approve the step a rollout waits for (each approver counts once)",
    "reject": "refuse the approval a rollout waits for: it rolls back",
    "request-approval": "ask again for an approval whose request expired",
    "rollback": "send every user back to the baseline",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse exits 2 on bad usage, which `wait` uses for "aborted"; keep usage errors apart.
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rolloutctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("RAMP_URL", DEFAULT_URL), help="the platform (RAMP_URL)")
    parser.add_argument("--version", action="version", version=f"rolloutctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create", help="create a rollout from a YAML or JSON plan file")
    create.add_argument("plan", type=Path)
    when = create.add_mutually_exclusive_group()
    when.add_argument("--draft", action="store_true", help="leave it in draft (default: start at once)")
    when.add_argument("--start-when-ready", action="store_true", help="start once both versions have a ready engine (a version with none gets one asked for)")
    create.add_argument("--idempotency-key", help="default: derived from the file (and the CI run)")
    create.add_argument("--output", choices=("text", "id", "json"), default="text")

    validate = commands.add_parser("validate", help="check a plan and show the requests each step needs")
    validate.add_argument("plan", type=Path)

    status = commands.add_parser("status", help="where a rollout stands")
    status.add_argument("rollout_id", type=int)
    status.add_argument("--json", action="store_true")

    listing = commands.add_parser("list", help="rollouts, newest first")
    listing.add_argument("--live", action="store_true")
    listing.add_argument("--alias")

    for action, help_text in ACTIONS.items():
        sub = commands.add_parser(action, help=help_text)
        sub.add_argument("rollout_id", type=int)
        sub.add_argument("--reason", default="")
        sub.add_argument(
            "--expect-version", type=int, metavar="N",
            help="act only if the rollout is still at version N (as `status` showed it); default: read it first",
        )  # fmt: skip
        sub.add_argument(
            "--idempotency-key", metavar="KEY",
            help="a retry with the same key gets the first answer and does nothing again (default: derived from "
            "the CI run, the action, the rollout and --expect-version; outside CI without --expect-version, new "
            "for each command)",
        )  # fmt: skip
        if action in ("approve", "reject"):
            sub.add_argument("--step", type=int, help="the step (1-based) you mean to decide; a stale decision is refused")

    wait = commands.add_parser("wait", help="follow a rollout until it ends: 0 promoted, 1 rolled back, 2 aborted, 3 timeout")
    wait.add_argument("rollout_id", type=int)
    wait.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    wait.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5)")
    return parser


def _pct(value: float) -> str:
    return f"{value * 100:.4g}%"


def status_line(rollout: dict[str, Any]) -> str:
    """One line: state, step, weights, guardrail status."""
    weights = rollout.get("weights") or {}
    parts = [f"rollout {rollout['id']}", rollout["state"]]
    if rollout.get("step_count"):
        index = rollout.get("step_index", -1)
        parts.append(f"step {index + 1}/{rollout['step_count']}" if index >= 0 else f"step -/{rollout['step_count']}")
    parts.append(f"weights {rollout['baseline']} {_pct(weights.get('baseline', 1.0))} / {rollout['candidate']} {_pct(weights.get('candidate', 0.0))}")
    if weights.get("shadow"):
        parts.append(f"shadow {_pct(weights['shadow'])}")
    health = rollout.get("health") or {}
    if health.get("status") and health["status"] != "unknown":
        driver = f" ({health['driver']})" if health.get("driver") else ""
        parts.append(f"guardrails {health['status']}{driver}")
    if rollout.get("pending_approval_step") is not None:
        waiting = f"awaiting approval of step {rollout['pending_approval_step'] + 1}"
        approval = rollout.get("approval") or {}
        if approval.get("expired"):
            waiting += " (request expired: ask again)"
        elif approval.get("approvals_required"):
            waiting += f" ({len(approval.get('approved') or [])} of {approval['approvals_required']} approvals)"
        parts.append(waiting)
    return "  ".join(parts)


def _now() -> str:
    return datetime.now().strftime("%H:%M:%S")


def approval_line(rollout: dict[str, Any]) -> str | None:
    """"approvals: 1 of 2 approvals for step 3 of 4: alice; 1 more from role approver (bob)"."""
    approval = rollout.get("approval")
    if not approval:
        return None
    line = f"approvals: {approval['text']}"
    if approval.get("excluded"):
        line += "; may not approve (four-eyes): " + ", ".join(f"{who} ({why})" for who, why in approval["excluded"].items())
    return line


def _print_status(rollout: dict[str, Any], out: TextIO) -> None:
    print(status_line(rollout), file=out)
    print(f"  version: {rollout['version']} (actions send it as --expect-version; a stale one is refused)", file=out)
    if rollout.get("state_reason"):
        print(f"  reason: {rollout['state_reason']}", file=out)
    stale = rollout.get("analysis_staleness") or {}
    if stale.get("paused_by_watchdog"):
        print(f"  analysis stopped: paused by the watchdog (no look for over {stale['limit_s']:g} s); it resumes "
              "once the analysis runs again", file=out)
    elif stale.get("stale"):
        print(f"  analysis stale: no look for {stale['age_s']:g} s (the limit is {stale['limit_s']:g} s)", file=out)
    elif stale.get("looking") and stale.get("age_s", 0) > stale.get("limit_s", 0):
        print(f"  analysis: a look is running; the last one completed {stale['age_s']:g} s ago (a look that builds "
              "a window's rollup from a day of records can take minutes)", file=out)
    progress = rollout.get("progress") or {}
    bake = progress.get("bake")
    if bake:
        print(f"  baking: {_pct(1.0 - bake['holdout'])} of sessions on {rollout['candidate']}, {_pct(bake['holdout'])} held out "
              f"on {bake['holdout_version']} until {bake['ends_at']}; a breach or a rollback sends everyone back until then",
              file=out)  # fmt: skip
    if progress.get("holding"):
        print("  held by (not yet shown safe):", file=out)
        for check in progress["holding"]:
            if check.get("pairs_needed") is not None:
                need = f"about {check['pairs_needed']} more scored pairs"
            elif check.get("more_n") is not None:
                need = f"about {check['more_n']} more {check.get('more_unit') or 'candidate requests'}"
            else:
                need = "more data (its estimate sits on its limit)"
            print(f"    {check['name']}: {need}", file=out)
    if progress.get("planned_n") and progress.get("candidate_n") is not None and not bake:
        print(f"  planned sample: {progress['candidate_n']}/{progress['planned_n']} candidate requests "
              f"(reached undecided: {progress.get('on_inconclusive', 'pause')})", file=out)  # fmt: skip
    approvals = approval_line(rollout)
    if approvals:
        print(f"  {approvals}", file=out)
    split = rollout.get("alpha_split")
    if split:
        print(f"  error control: {split['text']}", file=out)
        if split.get("bake_alone"):
            print(f"    on the bake alone: {'; '.join(split['bake_alone'])}", file=out)
    latest = rollout.get("latest_analysis")
    if latest:
        print(f"  latest look {latest['at']}: {latest['decision']} — {latest['reason']}", file=out)
        for check in latest.get("checks", []):
            interval = ""
            if check.get("low") is not None and check.get("high") is not None:
                interval = f" [{check['low']:.4g}, {check['high']:.4g}]"
            more = f", about {check['more_n']} more {check.get('more_unit', 'requests')}" if check.get("more_n") else ""
            alpha = f" (alpha {check['alpha']:.3g}{more})" if check.get("alpha") is not None else ""
            holds = "  [holds the step]" if check.get("holds") else ""
            print(f"    {check.get('name', check.get('metric'))}: {check['decision']}{interval}{alpha}{holds}", file=out)
    if rollout.get("actions"):
        print(f"  you may: {', '.join(rollout['actions'])}", file=out)


def _wait(client: Client, rollout_id: int, *, timeout: float, interval: float, out: TextIO) -> int:
    deadline = time.monotonic() + timeout
    last_line = None
    last_seq = 0
    while True:
        try:
            rollout = client.get(rollout_id)
            for event in client.events(rollout_id, after=last_seq):
                last_seq = max(last_seq, int(event["seq"]))
                reason = f": {event['reason']}" if event.get("reason") else ""
                print(f"{_now()}  event {event['kind']} by {event['actor']}{reason}", file=out)
            line = status_line(rollout)
            if line != last_line:
                print(f"{_now()}  {line}", file=out)
                last_line = line
            if rollout["state"] in TERMINAL_EXIT:
                out.flush()
                return TERMINAL_EXIT[rollout["state"]]
        except httpx.TransportError as exc:
            # A CI runner's network blips; keep following until the deadline.
            print(f"{_now()}  cannot reach the platform ({exc.__class__.__name__}); retrying", file=out)
        out.flush()
        if time.monotonic() >= deadline:
            print(f"{_now()}  timed out after {timeout:g} s; the rollout goes on", file=out)
            return EXIT_TIMEOUT
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def run(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None,
        transport: httpx.BaseTransport | None = None) -> int:  # fmt: skip
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(argv)
    try:
        client = Client(url=args.url, token=token_from_env(), transport=transport)
    except ConfigError as exc:
        print(f"rolloutctl: {exc}", file=err)
        return EXIT_ERROR
    try:
        return _dispatch(args, client, out)
    except ApiError as exc:
        print(exc.describe(), file=err)
        return EXIT_ERROR
    except httpx.HTTPError as exc:
        print(f"rolloutctl: cannot reach {args.url}: {exc}", file=err)
        return EXIT_ERROR
    except OSError as exc:
        print(f"rolloutctl: {exc}", file=err)
        return EXIT_ERROR
    finally:
        client.close()


def _dispatch(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    if args.command in ("create", "validate"):
        content = args.plan.read_bytes()
        is_yaml = args.plan.suffix.lower() in (".yaml", ".yml")
        if args.command == "validate":
            result = client.validate(content=content, yaml=is_yaml)
            print(json.dumps(result, indent=2), file=out)
            return EXIT_OK
        start = not args.draft and not args.start_when_ready
        flags = f"start={start},when_ready={args.start_when_ready}"
        key = args.idempotency_key or idempotency_key_for(content, flags=flags)
        rollout, replayed = client.create(
            content=content, yaml=is_yaml, start=start, start_when_ready=args.start_when_ready, idempotency_key=key
        )
        if args.output == "id":
            print(rollout["id"], file=out)
        elif args.output == "json":
            print(json.dumps(rollout, indent=2), file=out)
        else:
            verb = "already created (same Idempotency-Key)" if replayed else "created"
            print(f"rollout {rollout['id']} {verb}", file=out)
            print(status_line(rollout), file=out)
        return EXIT_OK
    if args.command == "status":
        rollout = client.get(args.rollout_id)
        if args.json:
            print(json.dumps(rollout, indent=2), file=out)
        else:
            _print_status(rollout, out)
        return EXIT_OK
    if args.command == "list":
        page = client.list(live=True if args.live else None, alias=args.alias)
        for rollout in page["results"]:
            print(status_line(rollout), file=out)
        return EXIT_OK
    if args.command == "wait":
        return _wait(client, args.rollout_id, timeout=args.timeout, interval=args.interval, out=out)
    return _act(args, client, out)


def _act(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    step_index = args.step - 1 if getattr(args, "step", None) is not None else None
    expected = args.expect_version
    if expected is None:
        expected = int(client.get(args.rollout_id)["version"])
    key = args.idempotency_key or action_idempotency_key(
        action=args.command, rollout_id=args.rollout_id, expected_version=args.expect_version, step=step_index
    )
    rollout, replayed = client.action(
        args.rollout_id, args.command, expected_version=expected, idempotency_key=key, reason=args.reason,
        step_index=step_index,
    )  # fmt: skip
    if replayed:
        print(f"already done (same Idempotency-Key {key}): the first answer was", file=out)
    print(status_line(rollout), file=out)
    approvals = approval_line(rollout)
    if approvals:
        print(f"  {approvals}", file=out)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
