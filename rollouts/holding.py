"""What holds a step, in words: one wording for the look's reason, the rollout page, the API and the Slack
and CLI views built from them. No imports from the rest of the app, so the analysis and the selectors can
both use it."""

from __future__ import annotations

from typing import Any


def check_need_text(check: dict[str, Any]) -> str:
    """What a check not yet shown safe still needs."""
    if check.get("pairs_needed") is not None:
        return f"about {check['pairs_needed']} more scored pairs"
    if check.get("more_n") is not None:
        return f"about {check['more_n']} more {check.get('more_unit') or 'candidate requests'}"
    return "more data (its estimate sits on its limit)"


def holding_lines(holding: list[dict[str, Any]]) -> list[str]:
    """One line per check holding the step: its name and what it still needs."""
    return [f"{check['name']}: {check_need_text(check)}" for check in holding]
