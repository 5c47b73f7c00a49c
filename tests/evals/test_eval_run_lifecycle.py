"""The run's bookkeeping without an engine: claims, checkpoints that never duplicate an item, cancel, the
sweeper, and the request retries (against an in-process transport)."""

from __future__ import annotations

import threading
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from evals import runner, services
from evals.models import EvalResult, EvalRun
from evals.services import (
    ItemOutcome,
    eval_run_cancel,
    eval_run_checkpoint,
    eval_run_claim,
    eval_run_create,
    eval_runs_sweep,
)


@pytest.fixture
def run(small_suite, versions) -> EvalRun:  # type: ignore[no-untyped-def]
    return eval_run_create(suite=small_suite, model_version=versions["adder-v1"], scorers=["exact_match"])


def outcome(item_id: int, output: str = "42") -> ItemOutcome:
    return ItemOutcome(item_id=item_id, output=output, scores={"exact_match": {"value": 1.0, "passed": True}})


def _age(run: EvalRun, seconds: float) -> None:
    EvalRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=seconds))


def test_one_worker_holds_a_run_until_its_heartbeat_goes_stale(run: EvalRun) -> None:
    first = eval_run_claim(run_id=run.pk, stale_after_s=60)
    assert first and eval_run_claim(run_id=run.pk, stale_after_s=60) is None
    _age(run, 120)
    second = eval_run_claim(run_id=run.pk, stale_after_s=60)
    assert second and second != first
    items = list(run.suite.items.order_by("position"))
    # The first worker wakes up: its writes are refused and it learns it lost the run.
    assert eval_run_checkpoint(run_id=run.pk, token=first, outcomes=[outcome(items[0].pk)]).held is False
    assert not EvalResult.objects.exists()
    run.refresh_from_db()
    assert run.executions == 2 and run.state == "running" and run.started_at is not None


def test_an_item_stored_twice_keeps_its_first_result(run: EvalRun) -> None:
    items = list(run.suite.items.order_by("position"))
    token = eval_run_claim(run_id=run.pk)
    assert token
    assert eval_run_checkpoint(run_id=run.pk, token=token, outcomes=[outcome(items[0].pk, "42")]).done == 1
    again = eval_run_checkpoint(run_id=run.pk, token=token, outcomes=[outcome(items[0].pk, "41"), outcome(items[1].pk)])
    assert again.done == 2
    assert EvalResult.objects.get(run=run, item=items[0]).output == "42"
    assert EvalResult.objects.filter(run=run).count() == 2


def test_cancel_of_a_claimed_run_is_seen_at_the_next_checkpoint(run: EvalRun) -> None:
    token = eval_run_claim(run_id=run.pk)
    assert token
    assert eval_run_cancel(run=run).state == "running"
    checkpoint = eval_run_checkpoint(run_id=run.pk, token=token, outcomes=[])
    assert checkpoint.held and checkpoint.cancel_requested
    assert services.eval_run_finish(run_id=run.pk, token=token, state=EvalRun.State.CANCELLED, reason="cancelled")
    run.refresh_from_db()
    assert run.state == "cancelled" and run.finished_at is not None and run.claim_token == ""


def test_the_sweeper_resumes_stale_runs_and_finishes_orphaned_cancels(
    small_suite, versions, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    enqueued: list[int] = []
    monkeypatch.setattr(services, "eval_run_enqueue", lambda *, run_id, countdown=None: enqueued.append(run_id))
    dead = eval_run_create(suite=small_suite, model_version=versions["adder-v1"], scorers=["exact_match"])
    alive = eval_run_create(suite=small_suite, model_version=versions["adder-v1"], scorers=["exact_match"])
    doomed = eval_run_create(suite=small_suite, model_version=versions["adder-v1"], scorers=["exact_match"])
    for r in (dead, alive, doomed):
        assert eval_run_claim(run_id=r.pk)
    eval_run_cancel(run=doomed)
    _age(dead, 300)
    _age(doomed, 300)
    counts = eval_runs_sweep(stale_after_s=60)
    assert enqueued == [dead.pk]
    assert counts["resumed"] == 1 and counts["cancelled"] == 1
    assert EvalRun.objects.get(pk=doomed.pk).state == "cancelled"
    assert EvalRun.objects.get(pk=alive.pk).state == "running"


def _client(responses: list[object]) -> tuple[httpx.Client, list[int]]:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        answer = responses[min(len(calls), len(responses)) - 1]
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, httpx.Response)
        return answer

    return httpx.Client(transport=httpx.MockTransport(handler)), calls


ENDPOINT = runner.Endpoint(base_url="http://engine.test", headers={"Authorization": "Bearer k"}, model="m")
OK = httpx.Response(200, json={"choices": [{"text": "85"}], "usage": {"completion_tokens": 2}})


def test_transient_failures_are_retried_then_succeed() -> None:
    client, calls = _client([httpx.Response(503), httpx.Response(429, headers={"retry-after": "0"}),
                             httpx.ConnectError("refused"), OK])
    body, attempts = runner.post_with_retries(client, ENDPOINT, "/v1/completions", {}, retries=4, backoff_s=0,
                                              stop=threading.Event())
    assert body["choices"][0]["text"] == "85" and attempts == 4 and len(calls) == 4


def test_client_errors_are_not_retried() -> None:
    client, calls = _client([httpx.Response(400, text="prompt too long")])
    with pytest.raises(runner.PermanentError, match="HTTP 400: prompt too long"):
        runner.post_with_retries(client, ENDPOINT, "/v1/completions", {}, retries=4, backoff_s=0, stop=threading.Event())
    assert len(calls) == 1


def test_retries_run_out_and_say_whether_the_engine_was_reached() -> None:
    client, calls = _client([httpx.ConnectError("refused")])
    with pytest.raises(runner.TransientError) as caught:
        runner.post_with_retries(client, ENDPOINT, "/v1/completions", {}, retries=2, backoff_s=0, stop=threading.Event())
    assert caught.value.connection and caught.value.attempts == 3 and len(calls) == 3
    client, _ = _client([httpx.Response(502)])
    with pytest.raises(runner.TransientError) as caught:
        runner.post_with_retries(client, ENDPOINT, "/v1/completions", {}, retries=1, backoff_s=0, stop=threading.Event())
    assert not caught.value.connection


def test_static_endpoints_registered_with_v1_are_not_doubled() -> None:
    assert runner.Endpoint(base_url="http://h:1/v1/", headers={}, model="m").url("/v1/completions") == "http://h:1/v1/completions"
    assert ENDPOINT.url("/v1/chat/completions") == "http://engine.test/v1/chat/completions"


def test_a_run_without_a_ready_engine_waits_then_fails(run: EvalRun, monkeypatch: pytest.MonkeyPatch,
                                                        settings) -> None:  # type: ignore[no-untyped-def]
    enqueued: list[tuple[int, float | None]] = []
    monkeypatch.setattr(runner, "eval_run_enqueue", lambda *, run_id, countdown=None: enqueued.append((run_id, countdown)))
    assert runner.RunSlice(run.pk).execute().outcome == "waiting"
    run.refresh_from_db()
    assert run.state == "running" and run.claim_token == "" and "no ready engine" in run.state_reason
    assert enqueued == [(run.pk, runner.ENGINE_WAIT_POLL_S)]
    settings.EVAL_ENGINE_WAIT_S = 0
    assert runner.RunSlice(run.pk).execute().outcome == "finished"
    run.refresh_from_db()
    assert run.state == "failed" and run.state_reason.startswith("no ready engine after 0 s")
