"""The rollout's calls into the evals app (eval gates, shadow quality), through its services and selectors.

Names are looked up when called, so the evals app can land (or be swapped for a fake in a unit test)
without this module changing: `evals.services.eval_gate_validate / eval_gate_start / eval_gate_cancel`,
`evals.selectors.eval_gate_result / shadow_quality`."""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Any

from config.errors import DomainError
from serving.models import ModelVersion

logger = logging.getLogger(__name__)


def _evals(module: str, name: str) -> Any | None:
    try:
        return getattr(importlib.import_module(f"evals.{module}"), name, None)
    except ImportError:
        return None


def eval_gate_validate(*, spec: dict[str, Any]) -> dict[str, Any]:
    validate = _evals("services", "eval_gate_validate")
    if validate is None:
        raise DomainError("eval gates are not available: the evals app does not provide them", field="eval_gate")
    normalised = validate(spec=spec)
    return dict(normalised) if normalised is not None else dict(spec)


def eval_gate_start_safely(
    *, rollout_id: int, baseline: ModelVersion, candidate: ModelVersion, spec: dict[str, Any], alpha: float | None = None
) -> None:
    """On commit of the transition into gating. A failure is logged: the analysis asks again.

    `alpha`: the gate's share of the rollout's alpha (the chance of passing a candidate worse than the
    gate's max_drop); it replaces the spec's own alpha. The first start of a rollout's gate fixes it."""
    if alpha is not None:
        spec = {**spec, "alpha": alpha}
    start = _evals("services", "eval_gate_start")
    if start is None:
        logger.error("rollout %s: the evals app has no eval_gate_start", rollout_id)
        return
    try:
        start(rollout_id=rollout_id, baseline=baseline, candidate=candidate, spec=spec)
    except Exception:
        logger.exception("rollout %s: starting the eval gate failed; the analysis will ask again", rollout_id)


def eval_gate_cancel_safely(*, rollout_id: int) -> None:
    cancel = _evals("services", "eval_gate_cancel")
    if cancel is None:
        return
    try:
        cancel(rollout_id=rollout_id)
    except Exception:
        logger.exception("rollout %s: cancelling the eval gate failed", rollout_id)


def eval_gate_result(*, rollout_id: int) -> Any | None:
    """The gate's EvalGateResult (status pending/passed/failed/error, reason, evidence) or None.

    An undecided gate (a suite too small to show non-inferiority at its margin: its reason says how many
    items it would need) is not a pass, and no more data will come: the rollout reads it as failed. The
    evidence keeps evidence["decision"]["decision"] == "undecided" for the pages."""
    result = _evals("selectors", "eval_gate_result")
    found = result(rollout_id=rollout_id) if result is not None else None
    if found is not None and found.status == "undecided":
        return dataclasses.replace(found, status="failed")
    return found


def shadow_quality_available() -> bool:
    return _evals("selectors", "shadow_quality") is not None


def shadow_quality(*, rollout_id: int, alpha: float) -> Any | None:
    """ShadowQuality of the rollout's scored shadow pairs (see evals.selectors.shadow_quality), with
    always-valid one-sided bounds at `alpha` (the quality check's share of the rollout's alpha), or None."""
    quality = _evals("selectors", "shadow_quality")
    return quality(rollout_id=rollout_id, alpha=alpha) if quality is not None else None


def shadow_scorer_normalise(*, spec: Any) -> dict[str, Any]:
    """The evals app's normalised scorer spec, or DomainError naming shadow.quality.scorer[.<param>]."""
    try:
        from evals.scorers import ScorerSpecError, scorer_spec_normalise
    except ImportError:
        raise DomainError("shadow quality needs the evals app's scorers", field="shadow.quality") from None
    try:
        return dict(scorer_spec_normalise(spec))
    except ScorerSpecError as exc:
        suffix = f".{exc.field}" if exc.field else ""
        raise DomainError(exc.message, field=f"shadow.quality.scorer{suffix}") from None


def shadow_scoring_configure(*, rollout_id: int, scorer: dict[str, Any]) -> None:
    """Ask the evals app to score this rollout's shadow pairs (inside the start transaction)."""
    configure = _evals("services", "shadow_scoring_configure")
    if configure is None:
        raise DomainError("shadow quality needs the evals app's shadow scoring", field="shadow.quality")
    configure(rollout_id=rollout_id, scorers=[scorer])


def shadow_scoring_stop_safely(*, rollout_id: int) -> None:
    stop = _evals("services", "shadow_scoring_stop")
    if stop is None:
        return
    try:
        stop(rollout_id=rollout_id)
    except Exception:
        logger.exception("rollout %s: stopping shadow scoring failed", rollout_id)
