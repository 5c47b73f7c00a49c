"""rolloutctl against a live server: the way a CI job creates a rollout and gates on it."""

from __future__ import annotations

import io
import re
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from django.db import connection
from django.utils import timezone

from rolloutctl.cli import EXIT_ABORTED, EXIT_ERROR, EXIT_OK, EXIT_ROLLED_BACK, EXIT_TIMEOUT, run
from rollouts.analysis import rollout_analyse
from rollouts.models import Rollout
from rollouts.services import rollout_abort, rollout_create, rollout_rollback
from tests.rollouts.helpers import both_arms, canary_plan, step_back, version
from tests.support.processes import VENV_BIN

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def env(live_server: Any, owner: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    version("adder-v1")
    version("adder-v2")
    monkeypatch.setenv("RAMP_URL", live_server.url)
    monkeypatch.setenv("RAMP_TOKEN", owner.token)
    for name in ("RAMP_IDEMPOTENCY_SCOPE", "GITHUB_RUN_ID", "GITHUB_RUN_ATTEMPT", "CI_PIPELINE_ID", "BUILD_ID"):
        monkeypatch.delenv(name, raising=False)
    return live_server


def ctl(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    path = tmp_path / "canary.yaml"
    path.write_text(yaml.safe_dump(canary_plan(guardrails=[{"metric": "tpot_gmean_ms", "margin": "10%"}], steps=[
        {"weight": 0.1, "min_duration_s": 60},
        {"weight": 0.5, "min_duration_s": 60},
    ])))  # fmt: skip
    return path


def test_create_starts_the_rollout_and_a_retry_replays_it(env: Any, plan_file: Path) -> None:
    code, out, err = ctl("create", str(plan_file))
    assert code == EXIT_OK, err
    rollout = Rollout.objects.get()
    assert out.splitlines()[0] == f"rollout {rollout.pk} created"
    assert f"rollout {rollout.pk}  running  step 1/2  weights adder-v1 90% / adder-v2 10%" in out
    # The CI step retried: same file, same derived Idempotency-Key, same rollout.
    code, out, _ = ctl("create", str(plan_file), "--output", "id")
    assert (code, out.strip()) == (EXIT_OK, str(rollout.pk))
    assert Rollout.objects.count() == 1


def test_a_bad_plan_exits_4_naming_the_field(env: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"alias": "adder", "candidate": "adder-v2", "strategy": "canary", "steps": [{"weight": 0.5}, {"weight": 0.1}]}')
    code, _, err = ctl("create", str(bad))
    assert code == EXIT_ERROR
    assert "error 400: steps[1].weight: weights must increase" in err
    assert not Rollout.objects.exists()


def test_status_approve_and_rollback(env: Any, approver: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = tmp_path / "approve.yaml"
    plan.write_text(yaml.safe_dump(canary_plan(steps=[{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}])))
    code, out, _ = ctl("create", str(plan), "--output", "id")
    rollout_id = out.strip()
    assert ctl("advance", rollout_id)[0] == EXIT_OK

    code, out, _ = ctl("status", rollout_id)
    assert code == EXIT_OK and "awaiting_approval" in out and "awaiting approval of step 2" in out
    # The alpha split, and the guardrails' checks on the bake alone by name (the plan bakes against a holdout).
    assert "error control: alpha 0.05 split equally over 2 checks" in out
    assert "    on the bake alone: tpot_mean_ms at most 10% worse (bake alone); error_rate at most 0.01 worse (bake alone)" in out
    code, _, err = ctl("approve", rollout_id)
    assert code == EXIT_ERROR and "error 403" in err  # a release manager is not an approver

    monkeypatch.setenv("RAMP_TOKEN", approver.token)
    code, out, err = ctl("approve", rollout_id, "--step", "2", "--reason", "dashboards look fine")
    assert code == EXIT_OK, err
    assert "running  step 2/2" in out
    event = Rollout.objects.get(pk=rollout_id).events.order_by("seq").last()
    assert event is not None and (event.actor, event.via, event.reason) == ("approver", "cli", "dashboards look fine")

    code, out, _ = ctl("rollback", rollout_id, "--reason", "smoke test failed")
    assert code == EXIT_OK and "rolled_back" in out


def _drive(rollout_id: int, stop: threading.Event) -> None:
    """The analysis loop, compressed: each pass adds traffic to the current step and looks at it."""
    try:
        while not stop.is_set():
            rollout = Rollout.objects.select_related("baseline", "candidate").get(pk=rollout_id)
            if rollout.is_terminal:
                return
            if rollout.state == Rollout.State.BAKING:
                # The bake's ten minutes, compressed too: its traffic at 95 %, its clock moved back.
                Rollout.objects.filter(pk=rollout_id).update(
                    bake_started_at=timezone.now() - timedelta(seconds=rollout.bake_s + 1))
                both_arms(rollout, total=300, weight=1.0 - rollout.holdout)
            elif rollout.current_step is not None:
                step_back(rollout, 61)
                both_arms(rollout, total=300, weight=float(rollout.current_step["weight"]))
            rollout_analyse(rollout_id=rollout_id)
            time.sleep(0.3)
    finally:
        connection.close()


def test_wait_follows_the_rollout_and_exits_0_on_promotion(env: Any, plan_file: Path) -> None:
    code, out, _ = ctl("create", str(plan_file), "--output", "id")
    rollout_id = int(out)
    stop = threading.Event()
    driver = threading.Thread(target=_drive, args=(rollout_id, stop))
    driver.start()
    try:
        code, out, _ = ctl("wait", str(rollout_id), "--interval", "0.2", "--timeout", "120")
    finally:
        stop.set()
        driver.join(timeout=30)
    assert code == EXIT_OK, out
    assert "event step_started by analysis" in out and "event promoted by analysis" in out
    assert "baking" in out and "event baked by analysis" in out
    progress = [line for line in out.splitlines() if "  rollout " in line]
    assert any("step 2/2" in line and "adder-v2 50%" in line for line in progress)
    assert "promoted" in progress[-1]


def test_wait_exit_codes_for_rollback_abort_and_timeout(env: Any, owner: Any) -> None:
    rolled = rollout_create(plan=canary_plan(), actor=owner.user, start=True).rollout
    rollout_rollback(rollout=rolled, actor=owner.user, reason="bad")
    code, out, _ = ctl("wait", str(rolled.pk), "--interval", "0.1")
    assert code == EXIT_ROLLED_BACK and "rolled_back" in out

    aborted = rollout_create(plan=canary_plan(), actor=owner.user).rollout
    rollout_abort(rollout=aborted, actor=owner.user)
    assert ctl("wait", str(aborted.pk), "--interval", "0.1")[0] == EXIT_ABORTED

    draft = rollout_create(plan=canary_plan(), actor=owner.user).rollout
    code, out, _ = ctl("wait", str(draft.pk), "--interval", "0.1", "--timeout", "0.5")
    assert code == EXIT_TIMEOUT and "timed out" in out


def test_no_token_is_a_configuration_error(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAMP_TOKEN")
    code, _, err = ctl("status", "1")
    assert code == EXIT_ERROR and "RAMP_TOKEN is not set" in err


def test_the_installed_console_script_talks_to_the_server(env: Any, owner: Any) -> None:
    rollout = rollout_create(plan=canary_plan(), actor=owner.user).rollout
    result = subprocess.run(
        [str(VENV_BIN / "rolloutctl"), "status", str(rollout.pk)],
        capture_output=True, text=True, timeout=60, env={"RAMP_URL": env.url, "RAMP_TOKEN": owner.token, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"rollout {rollout.pk}  draft  step -/2" in result.stdout


def test_create_start_when_ready_asks_for_an_engine_of_a_version_without_one(env: Any, tmp_path: Path) -> None:
    from serving.models import EngineWorker

    lacking = version("adder-v3", ready=False)
    plan = tmp_path / "later.yaml"
    plan.write_text(yaml.safe_dump(canary_plan(candidate="adder-v3", steps=[
        {"weight": 0.1, "min_duration_s": 300, "min_candidate_requests": 1100}])))  # fmt: skip
    code, _, err = ctl("create", str(plan), "--start-when-ready")
    assert code == EXIT_OK, err
    rollout = Rollout.objects.get()
    assert rollout.state == "draft" and rollout.start_when_ready
    (worker,) = EngineWorker.objects.filter(model_version=lacking)
    assert (worker.driver, worker.desired_state) == ("local", "running")
    assert rollout.events.get(kind="created").evidence["engines_requested"][0]["worker"] == worker.pk


def test_status_says_when_the_watchdog_paused_the_rollout(env: Any, owner: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from rollouts.watchdog import rollouts_watchdog_pass, stale_after_s

    rollout = rollout_create(plan=canary_plan(steps=[
        {"weight": 0.1, "min_duration_s": 300, "min_candidate_requests": 1100}]), actor=owner.user, start=True).rollout  # fmt: skip
    assert rollouts_watchdog_pass(now=timezone.now() + timedelta(seconds=stale_after_s() + 1)).paused == [rollout.pk]
    code, out, _ = ctl("status", str(rollout.pk))
    assert code == EXIT_OK
    assert "analysis stopped: paused by the watchdog (no look for over 30 s); it resumes once the analysis runs again" in out


class _LosesTheFirstAnswer(httpx.BaseTransport):
    """A network that delivers the first action POST to the server and then times out before its answer
    arrives (what a CI runner sees when a load balancer drops a slow response)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.posts: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST":
            self.posts.append((request.url.path, request.headers.get("Idempotency-Key", "")))
            if len(self.posts) == 1:
                response.read()
                raise httpx.ReadTimeout("the answer was lost", request=request)
        return response


def test_a_retried_advance_is_a_no_op_returning_the_first_answer(env: Any, owner: Any, tmp_path: Path) -> None:
    plan = tmp_path / "three.yaml"
    plan.write_text(yaml.safe_dump(canary_plan(steps=[{"weight": 0.1}, {"weight": 0.25}, {"weight": 0.5}])))
    rollout_id = ctl("create", str(plan), "--output", "id")[1].strip()

    # The answer to the first try is lost on the way back: rolloutctl tries again with the same key and
    # the platform answers with the first answer instead of advancing a second time.
    network = _LosesTheFirstAnswer()
    out, err = io.StringIO(), io.StringIO()
    code = run(["advance", rollout_id], out=out, err=err, transport=network)
    assert code == EXIT_OK, err.getvalue()
    assert [path for path, _ in network.posts] == [f"/api/v1/rollouts/{rollout_id}/advance"] * 2
    assert network.posts[0][1] == network.posts[1][1] and network.posts[0][1].startswith("rolloutctl-")
    assert "already done (same Idempotency-Key" in out.getvalue() and "step 2/3" in out.getvalue()
    assert Rollout.objects.get(pk=rollout_id).step_index == 1

    # A CI step retried after a timeout runs the whole command again: with the run's scope the key is the
    # same, so the second run is a no-op that prints the first answer.
    version = Rollout.objects.get(pk=rollout_id).version
    env_scope = {"RAMP_IDEMPOTENCY_SCOPE": "pipeline-81"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env_scope.items():
            patch.setenv(name, value)
        first = ctl("advance", rollout_id, "--expect-version", str(version))
        again = ctl("advance", rollout_id, "--expect-version", str(version))
    assert first[0] == EXIT_OK and "step 3/3" in first[1] and "already done" not in first[1]
    assert again[0] == EXIT_OK and "already done (same Idempotency-Key" in again[1] and "step 3/3" in again[1]
    after = Rollout.objects.get(pk=rollout_id)
    assert (after.step_index, after.version) == (2, version + 1)


def test_a_stale_expect_version_is_refused_saying_what_changed(env: Any, owner: Any, tmp_path: Path) -> None:
    plan = tmp_path / "two.yaml"
    plan.write_text(yaml.safe_dump(canary_plan()))
    rollout_id = ctl("create", str(plan), "--output", "id")[1].strip()
    code, out, _ = ctl("status", rollout_id)
    seen = int(re.search(r"version: (\d+)", out).group(1))  # type: ignore[union-attr]
    from rollouts.actors import ANALYSIS
    from rollouts.services import rollout_pause

    rollout_pause(rollout=int(rollout_id), actor=ANALYSIS, reason="every baseline engine is down")
    code, _, err = ctl("advance", rollout_id, "--expect-version", str(seen))
    assert code == EXIT_ERROR
    assert err.startswith(
        f"error 409: rollout {rollout_id} changed since it was read: expected version {seen}, found {seen + 1}: "
        "it moved from step 1 of 2 to paused at step 1 of 2 since you looked: paused by analysis (every baseline "
        "engine is down)"
    ), err
    assert Rollout.objects.get(pk=rollout_id).state == "paused"


def test_status_and_approve_show_who_approved_and_who_is_still_needed(
    env: Any, approver: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from accounts.roles import Role
    from accounts.services import api_token_create, user_create

    second = user_create(username="second", password="second-password-1", roles=[Role.APPROVER])
    plan = tmp_path / "two.yaml"
    plan.write_text(yaml.safe_dump(canary_plan(
        steps=[{"weight": 0.1}, {"weight": 0.5, "requires_approval": True}], approvals_required=2)))  # fmt: skip
    rollout_id = ctl("create", str(plan), "--output", "id")[1].strip()
    assert ctl("advance", rollout_id)[0] == EXIT_OK
    code, out, _ = ctl("status", rollout_id)
    assert "awaiting approval of step 2 (0 of 2 approvals)" in out
    assert "  approvals: 0 of 2 approvals for step 2 of 2; 2 more from role approver (approver, second); may not " \
           "approve (four-eyes): owner (created the rollout)" in out  # fmt: skip

    monkeypatch.setenv("RAMP_TOKEN", approver.token)
    code, out, err = ctl("approve", rollout_id, "--step", "2")
    assert code == EXIT_OK, err
    assert "awaiting approval of step 2 (1 of 2 approvals)" in out
    assert "approvals: 1 of 2 approvals for step 2 of 2: approver; 1 more from role approver (second)" in out
    code, _, err = ctl("approve", rollout_id, "--step", "2")
    assert code == EXIT_ERROR and "each approver counts once" in err

    monkeypatch.setenv("RAMP_TOKEN", api_token_create(user=second, name="ci").raw)
    code, out, err = ctl("approve", rollout_id, "--step", "2")
    assert code == EXIT_OK and "running  step 2/2" in out, err
