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
from concurrent.futures import Executor
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
    and prompts redacted, no session id, no stored texts."""
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


def shadow_pair_mirror(*, payload: dict[str, Any], final_attempt: bool, timeout_s: float = 120.0) -> bool:
    """Replay a served request against a ready candidate engine and store the pair. Safe to run twice:
    a pair that exists already is left alone. Returns whether a pair was stored by this call."""
    import httpx

    from config.errors import NotFound
    from serving.models import ModelVersion, ShadowPair
    from serving.selectors import engine_base_url

    request_id = str(payload["request_id"])
    store = bool(payload.get("store_prompts"))
    if ShadowPair.objects.filter(request_id=request_id).exists():
        return False
    candidate = ModelVersion.objects.filter(pk=int(payload.get("candidate_version_id") or 0)).first()
    if candidate is None:
        log.warning("shadow mirror %s: candidate version %s is gone; skipped", request_id, payload.get("candidate_version_id"))
        return False

    outcome, error = "ok", ""
    meter: StreamMeter | None = None
    try:
        base_url, api_key = engine_base_url(model_version=candidate)
    except NotFound as exc:
        if not final_attempt:
            raise ShadowRetry(str(exc)) from exc
        outcome, error = "no_engine", str(exc)
    else:
        body = dict(payload["body"])
        body["model"] = candidate.served_model_name
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        url = base_url.rstrip("/") + ENDPOINT_PATHS[payload["endpoint"]]
        try:
            with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0), trust_env=False) as client:
                sent = time.perf_counter()
                meter = StreamMeter(sent_at=sent, collect_text=store)
                with client.stream("POST", url, json=body, headers=headers) as response:
                    if response.status_code != 200:
                        outcome = "client_error" if response.status_code < 500 else "engine_error"
                        error = f"HTTP {response.status_code}: {response.read()[:200]!r}"
                    else:
                        for chunk in response.iter_raw():
                            meter.feed(chunk, time.perf_counter())
                        meter.finish(time.perf_counter())
                        if meter.error is not None:
                            outcome, error = "engine_error", meter.error
                        elif meter.done_at is None:
                            outcome, error = "engine_error", "stream cut before [DONE]"
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if not final_attempt:
                raise ShadowRetry(str(exc)) from exc
            outcome, error, meter = "engine_error", f"connect: {exc}", None
        except httpx.HTTPError as exc:
            outcome, error = "engine_error", f"{type(exc).__name__}: {exc}"

    fields: dict[str, Any] = {
        "created_at": _when(payload.get("created_at")),
        "alias": str(payload.get("alias", ""))[:64],
        "rollout_id": payload.get("rollout_id"),
        "baseline_version_id": payload.get("baseline_version_id"),
        "candidate_version": candidate,
        "texts_stored": store,
        "prompt_text": redact(str(payload.get("prompt_text", ""))) if store else "",
        "baseline_output": redact(str(payload.get("baseline_output", ""))) if store else "",
        "baseline_ttft_ms": payload.get("baseline_ttft_ms"),
        "baseline_e2e_ms": payload.get("baseline_e2e_ms"),
        "baseline_completion_tokens": payload.get("baseline_completion_tokens"),
        "candidate_outcome": outcome,
        "candidate_error": error[:300],
    }
    if meter is not None:
        ttft = _ms(meter.first_token_at, meter.sent_at)
        e2e = _ms(meter.done_at, meter.sent_at)
        tokens = meter.completion_tokens
        fields.update(
            candidate_output=redact(meter.text) if store else "",
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
