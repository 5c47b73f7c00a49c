"""rolloutctl: create, follow and steer rollouts from a CI pipeline.

Environment: RAMP_TOKEN (or RAMP_TOKEN_FILE), an API token; RAMP_URL, the platform
(default http://127.0.0.1:8000).

Exit codes: 0 success (for `wait`: promoted), 1 rolled back, 2 aborted, 3 timed out (`wait`),
4 a usage, configuration or API error.
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
from rolloutctl.client import DEFAULT_URL, ApiError, Client, ConfigError, idempotency_key_for, token_from_env

EXIT_OK, EXIT_ROLLED_BACK, EXIT_ABORTED, EXIT_TIMEOUT, EXIT_ERROR = 0, 1, 2, 3, 4
TERMINAL_EXIT = {"promoted": EXIT_OK, "rolled_back": EXIT_ROLLED_BACK, "aborted": EXIT_ABORTED}
ACTIONS = ("start", "pause", "resume", "advance", "promote", "abort", "reject")


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

    approve = commands.add_parser("approve", help="approve the step a rollout waits for")
    approve.add_argument("rollout_id", type=int)
    approve.add_argument("--reason", default="")
    approve.add_argument("--step", type=int, help="the step (1-based) you mean to approve; a stale approval is refused")

    rollback = commands.add_parser("rollback", help="send every user back to the baseline")
    rollback.add_argument("rollout_id", type=int)
    rollback.add_argument("--reason", default="")

    for action in ACTIONS:
        sub = commands.add_parser(action, help=f"{action} a rollout")
        sub.add_argument("rollout_id", type=int)
        sub.add_argument("--reason", default="")

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
        parts.append(f"awaiting approval of step {rollout['pending_approval_step'] + 1}")
    return "  ".join(parts)


def _now() -> str:
    return datetime.now().strftime("%H:%M:%S")


def _print_status(rollout: dict[str, Any], out: TextIO) -> None:
    print(status_line(rollout), file=out)
    if rollout.get("state_reason"):
        print(f"  reason: {rollout['state_reason']}", file=out)
    stale = rollout.get("analysis_staleness") or {}
    if stale.get("paused_by_watchdog"):
        print(f"  analysis stopped: paused by the watchdog (no look for over {stale['limit_s']:g} s); it resumes "
              "once the analysis runs again", file=out)
    elif stale.get("stale"):
        print(f"  analysis stale: no look for {stale['age_s']:g} s (the limit is {stale['limit_s']:g} s)", file=out)
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
    split = rollout.get("alpha_split")
    if split:
        print(f"  error control: {split['text']}", file=out)
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
    step_index = None
    if args.command == "approve" and args.step is not None:
        step_index = args.step - 1
    rollout = client.action(args.rollout_id, args.command, reason=args.reason, step_index=step_index)
    print(status_line(rollout), file=out)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
