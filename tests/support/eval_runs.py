"""What an eval run resumed after its worker was killed must show, checked the same way wherever a test
kills one (tests/evals, tests/faults)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from evals.models import EvalResult, EvalRun


def stored_results(run: EvalRun) -> dict[str, tuple[Any, ...]]:
    """The results the run has stored so far, by item: (pk, created_at, output)."""
    return {r.item_id: (r.pk, r.created_at, r.output) for r in EvalResult.objects.filter(run=run)}


def assert_resumed_without_redoing(run: EvalRun, stored: dict[str, tuple[Any, ...]], killed_at: datetime) -> None:
    """Every item has exactly one result; those stored before the kill are untouched, the rest came after."""
    run.refresh_from_db()
    results = list(EvalResult.objects.filter(run=run))
    assert run.done == run.total == len(results) == len({r.item_id for r in results})
    assert run.executions >= 2
    for result in results:
        if result.item_id in stored:
            assert (result.pk, result.created_at, result.output) == stored[result.item_id]
        else:
            assert result.created_at >= killed_at
