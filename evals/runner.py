"""Executes an eval run against a model version's engine, directly (not through the gateway).

One execution is a time slice: claim the run (compare-and-set), send the items that have no result yet
to the engine from a bounded thread pool, score each answer, store results in batches (each batch renews
the heartbeat and is the checkpoint), and check the cancel flag at every batch. At the end of the slice
the run is finished, or released and re-enqueued (long suites outlive Celery's time limits that way). A
worker that dies leaves a stale heartbeat; the sweeper (beat) re-enqueues the run and the next execution
does only the items without a result.

Retries with exponential backoff and jitter for transient failures only: connection errors, timeouts,
HTTP 429 and 5xx. A transient failure that outlasts its retries on a connection error does not count as
the item's answer: the engine may be restarting, so the slice stops and the run waits for a ready engine
(up to EVAL_ENGINE_WAIT_S). A 4xx, or a 5xx after retries, is that item's error."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from config.errors import NotFound
from evals.models import EvalItem, EvalResult, EvalRun
from evals.scorers import Judge, Score, ScoreInput, Scorer, scorer_build
from evals.services import (
    ItemOutcome,
    eval_run_checkpoint,
    eval_run_claim,
    eval_run_enqueue,
    eval_run_finish,
    eval_run_release,
)
from serving.models import ModelVersion
from serving.selectors import engine_endpoint_get, model_version_get

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
REQUEST_TIMEOUT_S = 60.0
BACKOFF_CAP_S = 10.0
ENGINE_WAIT_POLL_S = 5.0


class TransientError(Exception):
    """Still failing after every retry; `connection` when the engine was not reached at all."""

    def __init__(self, message: str, *, connection: bool, attempts: int) -> None:
        super().__init__(message)
        self.connection = connection
        self.attempts = attempts


class PermanentError(Exception):
    def __init__(self, message: str, *, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class Stopped(Exception):
    """The slice is stopping (cancelled, claim lost); an item in a backoff sleep gives up."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    headers: dict[str, str]  # the engine's key, in the header its flavor takes
    model: str

    def url(self, path: str) -> str:
        # Static endpoints are often registered with their /v1 suffix; vLLM's are the bare host.
        base = self.base_url.rstrip("/")
        return f"{base}{path[3:]}" if base.endswith("/v1") else f"{base}{path}"


def endpoint_for(model_version: ModelVersion) -> Endpoint:
    engine = engine_endpoint_get(model_version=model_version)
    return Endpoint(base_url=engine.base_url, headers=engine.headers, model=model_version.served_model_name)


def post_with_retries(
    client: httpx.Client, endpoint: Endpoint, path: str, body: dict[str, Any], *, retries: int, backoff_s: float,
    stop: threading.Event,
) -> tuple[dict[str, Any], int]:
    """(JSON body, attempts). Raises TransientError after `retries` retries, PermanentError on a 4xx."""
    last = ""
    connection = False
    for attempt in range(1, retries + 2):
        if stop.is_set():
            raise Stopped()
        delay = backoff_s * (2 ** (attempt - 1))
        try:
            response = client.post(endpoint.url(path), json=body, headers=endpoint.headers)
        except httpx.TransportError as exc:
            last, connection = f"{type(exc).__name__}: {exc}", True
        else:
            if response.status_code < 400:
                try:
                    return response.json(), attempt
                except ValueError:
                    raise PermanentError("the engine answered with a body that is not JSON", attempts=attempt) from None
            last, connection = f"HTTP {response.status_code}: {response.text[:200]}", False
            if response.status_code not in RETRY_STATUS:
                raise PermanentError(last, attempts=attempt)
            retry_after = response.headers.get("retry-after", "")
            if response.status_code == 429 and retry_after.isdigit():
                delay = max(delay, float(retry_after))
        if attempt <= retries:
            # Full jitter: runs that failed together must not retry together.
            if stop.wait(min(BACKOFF_CAP_S, delay) * random.uniform(0.5, 1.0)):
                raise Stopped()
    raise TransientError(last, connection=connection, attempts=retries + 1)


def _item_prompt(item: EvalItem) -> str:
    if item.messages:
        users = [m["content"] for m in item.messages if m.get("role") == "user"]
        return users[-1] if users else ""
    return item.prompt


def ask(client: httpx.Client, endpoint: Endpoint, item: EvalItem, *, max_tokens: int, retries: int,
        backoff_s: float, stop: threading.Event) -> tuple[str, dict[str, Any], int, float]:
    """(output text, usage, attempts, latency ms) of one item, greedy (temperature 0)."""
    if item.messages:
        path, body = "/v1/chat/completions", {"model": endpoint.model, "messages": item.messages}
    else:
        path, body = "/v1/completions", {"model": endpoint.model, "prompt": item.prompt}
    body.update(max_tokens=max_tokens, temperature=0)
    started = time.perf_counter()
    payload, attempts = post_with_retries(client, endpoint, path, body, retries=retries, backoff_s=backoff_s, stop=stop)
    latency_ms = (time.perf_counter() - started) * 1000.0
    try:
        choice = payload["choices"][0]
        text = choice["message"]["content"] if item.messages else choice["text"]
    except (KeyError, IndexError, TypeError) as exc:
        raise PermanentError(f"the engine's answer has no text ({exc!r})", attempts=attempts) from exc
    return text or "", payload.get("usage") or {}, attempts, latency_ms


def judge_call(client: httpx.Client, endpoint: Endpoint, *, retries: int, backoff_s: float,
               stop: threading.Event) -> Callable[[list[dict[str, str]], int], str]:
    def call(messages: list[dict[str, str]], max_tokens: int) -> str:
        body = {"model": endpoint.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        payload, _ = post_with_retries(client, endpoint, "/v1/chat/completions", body, retries=retries,
                                       backoff_s=backoff_s, stop=stop)
        try:
            return str(payload["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            return ""

    return call


def bound_scorers(specs: list[dict[str, Any]], *, client: httpx.Client, retries: int, backoff_s: float,
                  stop: threading.Event) -> dict[str, Scorer]:
    """Scorers by label, judges bound to a ready engine of their judge model (NotFound if none is ready)."""
    scorers: dict[str, Scorer] = {}
    for spec in specs:
        scorer = scorer_build(spec)
        if isinstance(scorer, Judge):
            endpoint = endpoint_for(model_version_get(ref=scorer.judge_model))
            scorer = scorer.bind(judge_call(client, endpoint, retries=retries, backoff_s=backoff_s, stop=stop))
        scorers[spec["label"]] = scorer
    return scorers


def score_all(scorers: dict[str, Scorer], case: ScoreInput) -> dict[str, dict[str, Any]]:
    return {label: scorer(case).as_dict() for label, scorer in scorers.items()}


@dataclass
class SliceReport:
    outcome: str  # finished | cancelled | released | waiting | lost | skipped
    stored: int = 0


class RunSlice:
    """One execution of a run, for at most `budget_s` seconds."""

    def __init__(self, run_id: int, *, budget_s: float | None = None) -> None:
        self.run_id = run_id
        self.budget_s = settings.EVAL_SLICE_S if budget_s is None else budget_s
        self.retries = settings.EVAL_REQUEST_RETRIES
        self.backoff_s = settings.EVAL_RETRY_BACKOFF_S
        self.flush_items = settings.EVAL_FLUSH_ITEMS
        self.flush_s = settings.EVAL_FLUSH_S
        self.stop = threading.Event()

    def execute(self) -> SliceReport:
        token = eval_run_claim(run_id=self.run_id)
        if token is None:
            return SliceReport("skipped")
        run = EvalRun.objects.select_related("model_version", "suite").get(pk=self.run_id)
        if run.cancel_requested:
            eval_run_finish(run_id=run.pk, token=token, state=EvalRun.State.CANCELLED, reason="cancelled")
            return SliceReport("cancelled")
        pending = list(
            EvalItem.objects.filter(suite_id=run.suite_id)
            .exclude(pk__in=EvalResult.objects.filter(run_id=run.pk).values("item_id"))
            .order_by("position")
        )
        if not pending:
            eval_run_finish(run_id=run.pk, token=token, state=EvalRun.State.SUCCEEDED)
            return SliceReport("finished")
        # Engines are reached directly on the internal network, never through an HTTP proxy.
        with httpx.Client(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0), trust_env=False,
                          limits=httpx.Limits(max_connections=run.concurrency * 2)) as client:
            try:
                endpoint = endpoint_for(run.model_version)
                scorers = bound_scorers(run.scorers, client=client, retries=self.retries, backoff_s=self.backoff_s,
                                        stop=self.stop)
            except NotFound as exc:
                return self._wait_for_engine(run, token, str(exc))
            return self._work(run, token, pending, client, endpoint, scorers)

    def _wait_for_engine(self, run: EvalRun, token: str, why: str) -> SliceReport:
        # How long it has waited: since its last progress (a checkpoint with items renews heartbeat_at
        # only when it also stores; waiting releases keep state_reason starting with "waiting").
        waited_since = run.started_at or run.created_at
        last_done = EvalResult.objects.filter(run_id=run.pk).order_by("-created_at").values_list("created_at", flat=True).first()
        if last_done and last_done > waited_since:
            waited_since = last_done
        if timezone.now() - waited_since > timedelta(seconds=settings.EVAL_ENGINE_WAIT_S):
            eval_run_finish(run_id=run.pk, token=token, state=EvalRun.State.FAILED,
                            reason=f"no ready engine after {settings.EVAL_ENGINE_WAIT_S:g} s: {why}")
            return SliceReport("finished")
        if eval_run_release(run_id=run.pk, token=token, reason=f"waiting: {why}"):
            eval_run_enqueue(run_id=run.pk, countdown=ENGINE_WAIT_POLL_S)
        return SliceReport("waiting")

    def _one(self, client: httpx.Client, endpoint: Endpoint, item: EvalItem, scorers: dict[str, Scorer],
             max_tokens: int) -> ItemOutcome:
        try:
            output, usage, attempts, latency_ms = ask(client, endpoint, item, max_tokens=max_tokens,
                                                      retries=self.retries, backoff_s=self.backoff_s, stop=self.stop)
        except (PermanentError, TransientError) as exc:
            if isinstance(exc, TransientError) and exc.connection:
                raise
            # The engine answered this item with an error: a wrong answer on every scorer, and the reason.
            failed = Score(value=0.0, passed=False, error="no answer").as_dict()
            return ItemOutcome(item_id=item.pk, output="", scores={label: failed for label in scorers},
                               error=str(exc), attempts=exc.attempts)
        case = ScoreInput(output=output, reference=item.reference, prompt=_item_prompt(item), metadata=item.metadata)
        return ItemOutcome(
            item_id=item.pk, output=output, scores=score_all(scorers, case), latency_ms=latency_ms,
            prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
            attempts=attempts,
        )

    def _work(self, run: EvalRun, token: str, pending: list[EvalItem], client: httpx.Client, endpoint: Endpoint,
              scorers: dict[str, Scorer]) -> SliceReport:
        deadline = time.monotonic() + self.budget_s
        queue = iter(pending)
        in_flight: set[Future[ItemOutcome]] = set()
        buffer: list[ItemOutcome] = []
        stored = 0
        last_flush = time.monotonic()
        stop_reason = ""  # cancelled | lost | engine | budget
        engine_problem = ""
        exhausted = False
        with ThreadPoolExecutor(max_workers=run.concurrency, thread_name_prefix=f"eval-run-{run.pk}") as pool:
            try:
                while True:
                    while not stop_reason and not exhausted and len(in_flight) < run.concurrency:
                        if time.monotonic() >= deadline:
                            stop_reason = "budget"
                            break
                        item = next(queue, None)
                        if item is None:
                            exhausted = True
                            break
                        in_flight.add(pool.submit(self._one, client, endpoint, item, scorers, run.max_tokens))
                    if not in_flight:
                        break
                    finished, in_flight = wait(in_flight, timeout=self.flush_s, return_when=FIRST_COMPLETED)
                    for future in finished:
                        try:
                            buffer.append(future.result())
                        except Stopped:
                            pass
                        except TransientError as exc:
                            # Not recorded: the item is done again once an engine answers.
                            engine_problem = str(exc)
                            stop_reason = stop_reason or "engine"
                            self.stop.set()
                    due = len(buffer) >= self.flush_items or time.monotonic() - last_flush >= self.flush_s
                    if due:
                        checkpoint = eval_run_checkpoint(run_id=run.pk, token=token, outcomes=buffer,
                                                         reason=f"{stored + len(buffer)} items this slice")
                        last_flush = time.monotonic()
                        if not checkpoint.held:
                            stop_reason = "lost"
                            self.stop.set()
                            buffer = []
                            break
                        stored += len(buffer)
                        buffer = []
                        if checkpoint.cancel_requested and stop_reason != "cancelled":
                            stop_reason = "cancelled"
                            self.stop.set()
            finally:
                self.stop.set()
        if stop_reason == "lost":
            log.warning("eval run %s: another worker holds it now; this one stops", run.pk)
            return SliceReport("lost", stored)
        checkpoint = eval_run_checkpoint(run_id=run.pk, token=token, outcomes=buffer)
        if not checkpoint.held:
            return SliceReport("lost", stored)
        stored += len(buffer)
        if stop_reason == "cancelled" or checkpoint.cancel_requested:
            eval_run_finish(run_id=run.pk, token=token, state=EvalRun.State.CANCELLED, reason="cancelled")
            return SliceReport("cancelled", stored)
        if stop_reason == "engine":
            return self._wait_for_engine(EvalRun.objects.get(pk=run.pk), token, f"engine unreachable: {engine_problem}")
        if stop_reason == "budget" or checkpoint.done < run.total:
            if eval_run_release(run_id=run.pk, token=token, reason=f"{checkpoint.done}/{run.total} done; continuing"):
                eval_run_enqueue(run_id=run.pk)
            return SliceReport("released", stored)
        failed = EvalRun.objects.filter(pk=run.pk).values_list("failed_items", flat=True).first() or 0
        reason = f"{failed} of {run.total} items failed on the engine" if failed else ""
        eval_run_finish(run_id=run.pk, token=token, state=EvalRun.State.SUCCEEDED, reason=reason)
        return SliceReport("finished", stored)


def eval_run_execute(*, run_id: int) -> SliceReport:
    """Run one slice of an eval run (the Celery task's body)."""
    try:
        return RunSlice(run_id).execute()
    finally:
        # Worker threads opened no connections, but a long slice may have outlived CONN_MAX_AGE.
        close_old_connections()
