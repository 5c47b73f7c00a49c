"""Celery queues: background work of each kind on a queue of its own (DESIGN.md, "Background work is
isolated"), so a backlog of one never delays another. Above all, a backlog of shadow mirrors or eval runs
never delays the analyses that roll a bad candidate back.

| queue | tasks | workers (`make run` Procfile, docker-compose) |
| --- | --- | --- |
| `analysis` | rollout analyses (`rollouts.tasks.analyse_*`) | `worker` |
| `notifications` | Slack messages, event notifications | `worker` |
| `celery` (default) | anything not routed (`config.ping`, ...) | `worker` |
| `evals` | eval runs, their sweep and gates, shadow scoring | `evals` |
| `shadow` | shadow mirrors (`serving.shadow_mirror`) | `shadow` (threads: they wait on engines) |
"""

from __future__ import annotations

ANALYSIS = "analysis"
NOTIFICATIONS = "notifications"
DEFAULT = "celery"
EVALS = "evals"
SHADOW = "shadow"

# Task name patterns (Celery's glob routes) and their queue.
_ROUTES: tuple[tuple[str, str], ...] = (
    ("serving.shadow_mirror", SHADOW),
    ("rollouts.tasks.analyse_*", ANALYSIS),
    ("rollouts.tasks.notify_*", NOTIFICATIONS),
    ("rollouts.slack.*", NOTIFICATIONS),
    ("evals.*", EVALS),
)

# What each kind of worker consumes.
WORKER_QUEUES = {
    "worker": (ANALYSIS, NOTIFICATIONS, DEFAULT),
    "evals": (EVALS,),
    "shadow": (SHADOW,),
}


def task_routes(suffix: str = "") -> dict[str, dict[str, str]]:
    """CELERY_TASK_ROUTES; `suffix` names a private set of queues (each test process has its own)."""
    return {pattern: {"queue": queue + suffix} for pattern, queue in _ROUTES}


def all_queues(suffix: str = "") -> list[str]:
    return [queue + suffix for queues in WORKER_QUEUES.values() for queue in queues]
