"""The project's Celery app, for a worker that a fault test kills or races at a chosen point.

`celery -A tests.faults.paused_celery worker` runs the real app and the real tasks. With FAULTS_PAUSE_AT
(comma-separated: `analysis`, `eval`, `shadow`) and FAULTS_PAUSE_DIR set, each worker process stops at
that point of the task, writes `<point>.<pid>` into the folder, and waits until `<point>.go` appears
there. The test then kills the worker, or lets it go at the moment it chooses.

- analysis: the look has claimed the rollout's lease, read it and decided, and is about to apply it;
- eval: a run has stored at least FAULTS_EVAL_MIN_STORED items (default 10) and works on;
- shadow: a mirror task was taken from the queue and not acknowledged, before it replays anything.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.signals import worker_process_init

from config.celery import app

__all__ = ["app"]

PAUSE_AT = {point for point in os.environ.get("FAULTS_PAUSE_AT", "").split(",") if point}
PAUSE_DIR = Path(os.environ.get("FAULTS_PAUSE_DIR", "/nonexistent"))


def pause(point: str) -> None:
    (PAUSE_DIR / f"{point}.{os.getpid()}").write_text(str(time.time()))
    go = PAUSE_DIR / f"{point}.go"
    while not go.exists():
        time.sleep(0.02)


def _before(point: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        pause(point)
        return original(*args, **kwargs)

    return wrapper


def _after(point: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        pause(point)
        return result

    return wrapper


@worker_process_init.connect
def _install(**_: Any) -> None:
    # In each pool process, after Django is set up: the functions are looked up by module attribute at
    # call time, so replacing the attribute is enough.
    if "analysis" in PAUSE_AT:
        from rollouts.analysis import apply as analysis_apply

        # After the look, before its transaction: on SQLite a transaction holds the database's write lock.
        analysis_apply.rollout_look = _after("analysis", analysis_apply.rollout_look)
    if "shadow" in PAUSE_AT:
        from serving import tasks

        tasks.shadow_pair_mirror = _before("shadow", tasks.shadow_pair_mirror)
    if "eval" in PAUSE_AT:
        from evals import runner

        original = runner.eval_run_checkpoint
        # A count of stored items, not of checkpoints: a checkpoint is due every EVAL_FLUSH_S as well as
        # every EVAL_FLUSH_ITEMS, so on a slow machine two checkpoints may hold only a handful of items.
        least = int(os.environ.get("FAULTS_EVAL_MIN_STORED", "10"))

        @functools.wraps(original)
        def checkpoint(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if kwargs.get("outcomes") and result.held and result.done >= least:
                pause("eval")
            return result

        runner.eval_run_checkpoint = checkpoint
