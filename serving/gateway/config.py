"""The gateway's settings, read once at start (README, "Gateway")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class GatewayConfig:
    max_body_bytes: int = 4 * 1024 * 1024
    route_poll_s: float = 0.25
    record_buffer: int = 20000
    record_batch: int = 500
    record_flush_s: float = 0.5
    shadow_max_pending: int = 64
    shadow_expires_s: float = 300.0
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 600.0
    # Until an engine's first event of the answer (non-streamed requests are asked as streams too); an alias may
    # set its own (Alias.ttfb_timeout_s).
    ttfb_timeout_s: float = 30.0
    # Tries of one request in all (replicas of its arm, then the other arm where the plan allows).
    max_attempts: int = 3
    eject_after: int = 3
    eject_base_s: float = 5.0
    eject_max_s: float = 300.0
    # Without a session, prompts that open alike go to the same replica.
    prefix_affinity: bool = True
    # A replica whose engine has this many requests waiting takes no more (0: no bound).
    max_queued_per_replica: int = 0
    queue_poll_s: float = 1.0
    # Where the last route table read from the database is kept, to start and serve without it (None: nowhere).
    routes_cache: Path | None = None
    # Admission limits shared through Redis when set; per process otherwise.
    limits_redis_url: str = ""
    startup_timeout_s: float = 30.0
    # With a route cache, how long start-up tries the database before it serves from the cache.
    startup_database_wait_s: float = 3.0
    secret: bytes = b""

    @classmethod
    def from_settings(cls) -> GatewayConfig:
        from django.conf import settings

        from serving.hashing import session_key

        return cls(
            max_body_bytes=settings.GATEWAY_MAX_BODY_BYTES,
            route_poll_s=settings.GATEWAY_ROUTE_POLL_S,
            record_buffer=settings.GATEWAY_RECORD_BUFFER,
            record_batch=settings.GATEWAY_RECORD_BATCH,
            record_flush_s=settings.GATEWAY_RECORD_FLUSH_S,
            shadow_max_pending=settings.GATEWAY_SHADOW_MAX_PENDING,
            shadow_expires_s=settings.GATEWAY_SHADOW_EXPIRES_S,
            connect_timeout_s=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT_S,
            read_timeout_s=settings.GATEWAY_UPSTREAM_READ_TIMEOUT_S,
            ttfb_timeout_s=settings.GATEWAY_TTFB_TIMEOUT_S,
            max_attempts=settings.GATEWAY_MAX_ATTEMPTS,
            eject_after=settings.GATEWAY_EJECT_AFTER,
            eject_base_s=settings.GATEWAY_EJECT_BASE_S,
            eject_max_s=settings.GATEWAY_EJECT_MAX_S,
            prefix_affinity=settings.GATEWAY_PREFIX_AFFINITY,
            max_queued_per_replica=settings.GATEWAY_MAX_QUEUED_PER_REPLICA,
            queue_poll_s=settings.GATEWAY_QUEUE_POLL_S,
            routes_cache=settings.GATEWAY_ROUTES_CACHE,
            limits_redis_url=settings.GATEWAY_LIMITS_REDIS_URL,
            secret=session_key(settings.SECRET_KEY),
        )
