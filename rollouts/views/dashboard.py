"""The dashboard: every live rollout, pending approvals first, and recent promotions and rollbacks."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET

from accounts.decorators import viewer_required
from config.live import LiveRegion, live_region, live_response
from rollouts import selectors
from rollouts.approvals import approval_status
from rollouts.views.display import POLL_S, State, rollout_summary


def _dashboard_context() -> dict[str, Any]:
    everything = list(selectors.rollout_list(live=True))
    # Pending approvals first, the longest waiting at the top; then the rest, newest first.
    pending = sorted(
        (r for r in everything if r.state == State.AWAITING_APPROVAL), key=lambda r: r.updated_at
    )
    live = pending + [r for r in everything if r.state != State.AWAITING_APPROVAL]
    # The latest stored look of each: the page never recomputes one.
    looks = selectors.rollout_latest_analyses(rollout_ids=[r.pk for r in live])
    rows = [rollout_summary(r, looks.get(r.pk)) for r in live]
    recent = [
        rollout_summary(r) for r in selectors.rollout_list(state=f"{State.PROMOTED},{State.ROLLED_BACK}")[:10]
    ]
    pending_rows = [row for row in rows if row["rollout"].state == State.AWAITING_APPROVAL]
    for row in pending_rows:
        row["approval"] = approval_status(rollout=row["rollout"])
    return {
        "rows": rows,
        "pending": pending_rows,
        "recent": recent,
    }


def _dashboard_region(request: HttpRequest) -> LiveRegion:
    return live_region(
        request, template="rollouts/_dashboard.html", context=_dashboard_context(), region_id="dashboard-live",
        url=reverse("dashboard-live"), every_s=POLL_S, label="Live rollouts",
    )  # fmt: skip


@viewer_required
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "rollouts/dashboard.html", {"live": _dashboard_region(request)})


@viewer_required
@require_GET
def dashboard_live(request: HttpRequest) -> HttpResponse:
    return live_response(request, _dashboard_region(request))
