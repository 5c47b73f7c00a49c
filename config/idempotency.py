"""Idempotency-Key for create POSTs: a retried CI step never creates two objects.

How a resource uses it: its model keeps the key and a fingerprint of the request that created it,
with a unique constraint on (owner, key), e.g.

    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    idempotency_fingerprint = models.CharField(max_length=64, blank=True)
    UniqueConstraint(fields=("created_by", "idempotency_key"), condition=Q(idempotency_key__isnull=False), ...)

and its create service calls `idempotent_create`. The same key with the same request returns the first
object (`replayed=True`; the API answers 200 with `Idempotent-Replayed: true` instead of 201); the same key
with a different request is refused with 422. Two concurrent requests with one key: the unique constraint
lets one insert win and the other replays it. Keys are honoured for `IDEMPOTENCY_TTL` (24 h, as Stripe
does); after that the key may be reused for a new object.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

from django.db import IntegrityError, transaction
from rest_framework.request import Request

from config.errors import DomainError

HEADER = "Idempotency-Key"
IDEMPOTENCY_TTL = timedelta(hours=24)
MAX_KEY_LENGTH = 255

T = TypeVar("T")


class IdempotencyKeyReused(DomainError):
    """The key was first used for a different request (IETF draft-ietf-httpapi-idempotency-key: 422)."""

    status_code = 422
    code = "idempotency_key_reused"


def idempotency_key_from(request: Request) -> str | None:
    """The request's Idempotency-Key, checked: 1 to 255 printable ASCII characters, or None when absent."""
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    key = raw.strip()
    if not key:
        raise DomainError("Idempotency-Key must not be empty", field=HEADER)
    if len(key) > MAX_KEY_LENGTH:
        raise DomainError(f"Idempotency-Key must be at most {MAX_KEY_LENGTH} characters", field=HEADER)
    if not all(32 < ord(ch) < 127 for ch in key):
        raise DomainError("Idempotency-Key must be printable ASCII without spaces", field=HEADER)
    return key


def request_fingerprint(payload: Any) -> str:
    """sha256 of the request's canonical JSON: key order and whitespace do not change it."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class IdempotentResult(Generic[T]):
    obj: T
    replayed: bool


def idempotent_create(
    *,
    key: str | None,
    fingerprint: str,
    find: Callable[[], T | None],
    fingerprint_of: Callable[[T], str],
    create: Callable[[], T],
) -> IdempotentResult[T]:
    """Replay the object created earlier with `key`, or create it.

    `find()` returns the live object holding `key` (within the TTL) or None; `create()` makes a new one
    that stores `key` and `fingerprint`. An IntegrityError from `create()` is taken as a concurrent
    request with the same key having won (the caller's unique constraint): that object is replayed.
    Other unique constraints of the caller must be checked before, or they read as a replay miss."""
    if key is None:
        return IdempotentResult(create(), replayed=False)
    existing = find()
    if existing is None:
        try:
            with transaction.atomic():
                return IdempotentResult(create(), replayed=False)
        except IntegrityError:
            existing = find()
            if existing is None:
                raise
    if fingerprint_of(existing) != fingerprint:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was already used for a different request; use a new key", field=HEADER
        )
    return IdempotentResult(existing, replayed=True)
