"""Shadow mirroring: the gateway hands a served request to Celery; the task replays it against the candidate.

On the gateway side (`ShadowQueue`) the hand-off runs in a thread after the user's response is complete,
and at most `max_pending` hand-offs wait at once: beyond that a mirror is shed and counted, so a slow
broker never holds memory or adds latency. The mirror travels on the `shadow` queue (its own workers, so
a backlog never delays an analysis) and expires unstarted after GATEWAY_SHADOW_EXPIRES_S. Unless the alias
stores prompts, what the broker carries (and Redis may write to disk) is redacted first, in that thread:
the candidate is asked the redacted prompt, and the baseline's answer does not travel at all.

On the worker side (`shadow_pair_mirror`) the pair is stored once per request id: timings, outcomes and
tokens always; the prompt and both answers (redacted) only when the alias stores prompts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from datetime import datetime
from typing import Any

from django.db import IntegrityError
from django.utils import timezone

from serving.gateway import metrics
from serving.gateway.meter import StreamMeter, tpot_ms
from serving.redaction import redact, redact_in_slices

log = logging.getLogger(__name__)

ENDPOINT_PATHS = {"chat.completions": "/v1/chat/completions", "completions": "/v1/completions"}


class ShadowQueue:
    def __init__(self, *, max_pending: int, executor: Executor, enqueue: Callable[[dict[str, Any]], None]) -> None:
        self.max_pending = max_pending
        self.pending = 0
        self._executor = executor
        self._enqueue = enqueue

    def offer(self, payload: dict[str, Any]) -> bool:
        """Hand a mirror to Celery in the background; False (and counted) when shed."""
        if self.pending >= self.max_pending:
            metrics.shadow_shed_total.inc()
            return False
        self.pending += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._enqueue, payload)
        future.add_done_callback(self._done)
        return True

    def _done(self, future: asyncio.Future[None]) -> None:
        self.pending -= 1
        if future.cancelled() or future.exception() is not None:
            metrics.shadow_shed_total.inc()
            log.warning("shadow mirror not enqueued: %r", None if future.cancelled() else future.exception())
        else:
            metrics.shadow_enqueued_total.inc()


def shadow_payload_redact(payload: dict[str, Any]) -> dict[str, Any]:
    """The mirror as the broker may carry it for an alias that does not store prompts: message contents
    and prompts redacted, no session id, no stored texts. The session's keyed hash stays: it is what the
    request's record stores in every case, and the shadow checks group pairs by it."""
    body = dict(payload["body"])
    body.pop("user", None)
    if isinstance(body.get("messages"), list):
        body["messages"] = [_message_redact(m) for m in body["messages"]]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        body["prompt"] = redact_in_slices(prompt)
    elif isinstance(prompt, list):
        body["prompt"] = [redact_in_slices(p) if isinstance(p, str) else p for p in prompt]
    return {**payload, "body": body, "prompt_text": "", "baseline_output": "", "redacted": True}


def _message_redact(message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": redact_in_slices(content)}
    if isinstance(content, list):
        parts = [{**part, "text": redact_in_slices(part["text"])} if isinstance(part, dict) and isinstance(part.get("text"), str)
                 else part for part in content]
        return {**message, "content": parts}
    return message


def shadow_enqueue(payload: dict[str, Any], *, expires_s: float) -> None:
    """Hand a mirror to Celery (in the gateway's shadow thread: redaction and the broker call both block)."""
    from serving.tasks import shadow_mirror

    if not payload.get("store_prompts"):
        payload = shadow_payload_redact(payload)
    shadow_mirror.apply_async(args=[payload], expires=expires_s)


class ShadowRetry(Exception):
    """The candidate could not be reached; try the mirror again later."""


class _Replay:
    """One side's answer to the mirrored request, timed by the worker: outcome, error and the stream's meter."""

    def __init__(self, outcome: str = "ok", error: str = "", meter: StreamMeter | None = None) -> None:
        self.outcome, self.error, self.meter = outcome, error, meter

    def timings(self) -> tuple[float | None, float | None, float | None]:
        """(TTFT, TPOT, E2E) in ms, as the gateway defines them (serving.gateway.meter)."""
        if self.meter is None or self.outcome != "ok":
            return None, None, None
        ttft = _ms(self.meter.first_token_at, self.meter.sent_at)
        e2e = _ms(self.meter.done_at, self.meter.sent_at)
        return ttft, tpot_ms(ttft, e2e, self.meter.completion_tokens), e2e


def _replay(version: Any, payload: dict[str, Any], *, timeout_s: float, collect_text: bool = False) -> _Replay:
    """Ask `version`'s engine the mirrored request, streamed and timed. NotFound (no ready engine) and
    connection failures propagate: the caller decides whether they are worth a retry."""
    import httpx

    from serving.selectors import engine_endpoint_get

    engine = engine_endpoint_get(model_version=version)
    body = dict(payload["body"])
    body["model"] = version.served_model_name
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    url = engine.base_url.rstrip("/") + ENDPOINT_PATHS[payload["endpoint"]]
    replay = _Replay()
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0), trust_env=False) as client:
            replay.meter = StreamMeter(sent_at=time.perf_counter(), collect_text=collect_text)
            with client.stream("POST", url, json=body, headers=engine.headers) as response:
                if response.status_code != 200:
                    replay.outcome = "client_error" if response.status_code < 500 else "engine_error"
                    replay.error = f"HTTP {response.status_code}: {response.read()[:200]!r}"
                else:
                    for chunk in response.iter_raw():
                        replay.meter.feed(chunk, time.perf_counter())
                    replay.meter.finish(time.perf_counter())
                    if replay.meter.error is not None:
                        replay.outcome, replay.error = "engine_error", replay.meter.error
                    elif replay.meter.done_at is None:
                        replay.outcome, replay.error = "engine_error", "stream cut before [DONE]"
    except (httpx.ConnectError, httpx.ConnectTimeout):
        raise
    except httpx.HTTPError as exc:
        replay.outcome, replay.error = "engine_error", f"{type(exc).__name__}: {exc}"
    return replay


def _baseline_replay(version: Any, payload: dict[str, Any], *, timeout_s: float) -> _Replay:
    """The baseline's side, never retried: without it the pair still counts for quality and errors, only
    not for the paired latency comparison."""
    import httpx

    from config.errors import NotFound

    if version is None:
        return _Replay("no_engine", "the baseline version is gone")
    try:
        return _replay(version, payload, timeout_s=timeout_s)
    except NotFound as exc:
        return _Replay("no_engine", str(exc))
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        return _Replay("engine_error", f"connect: {exc}")


def shadow_pair_mirror(*, payload: dict[str, Any], final_attempt: bool, timeout_s: float = 120.0) -> bool:
    """Replay a served request against a ready candidate engine and store the pair. Safe to run twice:
    a pair that exists already is left alone. Returns whether a pair was stored by this call.

    The baseline is asked the same request at the same moment, from this worker, through the same code:
    the gateway's timing of the user's request (kept as baseline_ttft_ms / baseline_e2e_ms) comes from
    another process, another moment and another load, so only the two replays' timings are compared
    request by request (baseline_replay_*)."""
    import httpx

    from config.errors import NotFound
    from serving.models import ModelVersion, ShadowPair
    from serving.selectors import engine_endpoint_get

    request_id = str(payload["request_id"])
    store = bool(payload.get("store_prompts"))
    if ShadowPair.objects.filter(request_id=request_id).exists():
        return False
    candidate = ModelVersion.objects.filter(pk=int(payload.get("candidate_version_id") or 0)).first()
    if candidate is None:
        log.warning("shadow mirror %s: candidate version %s is gone; skipped", request_id, payload.get("candidate_version_id"))
        return False
    baseline = ModelVersion.objects.filter(pk=int(payload.get("baseline_version_id") or 0)).first()
    try:
        engine_endpoint_get(model_version=candidate)
    except NotFound as exc:
        # Nothing is asked of either side until the candidate has an engine to answer.
        if not final_attempt:
            raise ShadowRetry(str(exc)) from exc

    # Both sides in flight together, each in its own thread, so both meet the same load on the machine.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow-baseline") as pool:
        baseline_side = pool.submit(_baseline_replay, baseline, payload, timeout_s=timeout_s)
        try:
            cand = _replay(candidate, payload, timeout_s=timeout_s, collect_text=store)
        except NotFound as exc:
            if not final_attempt:
                raise ShadowRetry(str(exc)) from exc
            cand = _Replay("no_engine", str(exc))
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if not final_attempt:
                raise ShadowRetry(str(exc)) from exc
            cand = _Replay("engine_error", f"connect: {exc}")
        base = baseline_side.result()

    fields: dict[str, Any] = {
        "created_at": _when(payload.get("created_at")),
        "alias": str(payload.get("alias", ""))[:64],
        "rollout_id": payload.get("rollout_id"),
        "session_hash": str(payload.get("session_hash") or "")[:32],
        "baseline_version_id": payload.get("baseline_version_id"),
        "candidate_version": candidate,
        "texts_stored": store,
        "prompt_text": redact(str(payload.get("prompt_text", ""))) if store else "",
        "baseline_output": redact(str(payload.get("baseline_output", ""))) if store else "",
        "baseline_ttft_ms": payload.get("baseline_ttft_ms"),
        "baseline_e2e_ms": payload.get("baseline_e2e_ms"),
        "baseline_completion_tokens": payload.get("baseline_completion_tokens"),
        "candidate_outcome": cand.outcome,
        "candidate_error": cand.error[:300],
        "baseline_replay_outcome": base.outcome,
    }
    replay_ttft, replay_tpot, replay_e2e = base.timings()
    fields.update(baseline_replay_ttft_ms=replay_ttft, baseline_replay_tpot_ms=replay_tpot,
                  baseline_replay_e2e_ms=replay_e2e)
    if cand.meter is not None and cand.outcome != "no_engine":
        ttft = _ms(cand.meter.first_token_at, cand.meter.sent_at)
        e2e = _ms(cand.meter.done_at, cand.meter.sent_at)
        tokens = cand.meter.completion_tokens
        fields.update(
            candidate_output=redact(cand.meter.text) if store else "",
            candidate_ttft_ms=ttft,
            candidate_e2e_ms=e2e,
            candidate_tpot_ms=tpot_ms(ttft, e2e, tokens),
            candidate_completion_tokens=tokens,
        )
    try:
        _, created = ShadowPair.objects.get_or_create(request_id=request_id, defaults=fields)
    except IntegrityError:
        # A concurrent run of the same mirror stored it first.
        return False
    return created


def _ms(at: float | None, since: float) -> float | None:
    return None if at is None else (at - since) * 1000.0


def _when(value: Any) -> datetime:
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    return timezone.now()
