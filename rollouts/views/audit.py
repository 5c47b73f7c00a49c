"""The audit log: every rollout event, filtered by rollout, actor and kind, and exported as CSV."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from accounts.decorators import viewer_required
from rollouts.models import RolloutEvent
from rollouts.views.display import event_view

AUDIT_PAGE = 50


def _audit_events(params: Any) -> tuple[QuerySet[RolloutEvent], dict[str, str]]:
    filters = {key: (params.get(key) or "").strip() for key in ("rollout", "actor", "kind")}
    events = RolloutEvent.objects.select_related("rollout").order_by("-created_at", "-id")
    if filters["rollout"].isdigit():
        events = events.filter(rollout_id=int(filters["rollout"]))
    elif filters["rollout"]:
        events = events.filter(rollout__alias_name=filters["rollout"])
    if filters["actor"]:
        events = events.filter(actor=filters["actor"])
    if filters["kind"]:
        events = events.filter(kind=filters["kind"])
    return events, filters


@viewer_required
@require_GET
def audit_log(request: HttpRequest) -> HttpResponse:
    events, filters = _audit_events(request.GET)
    page = Paginator(events, AUDIT_PAGE).get_page(request.GET.get("page"))
    actors = RolloutEvent.objects.order_by().values_list("actor", flat=True).distinct()
    query = urlencode({key: value for key, value in filters.items() if value})
    return render(request, "rollouts/audit.html", {
        "page": page, "rows": [event_view(e) for e in page.object_list], "filters": filters,
        "kinds": RolloutEvent.Kind.choices, "actors": sorted(set(actors)), "query": query,
    })  # fmt: skip


class _Echo:
    def write(self, value: str) -> str:
        return value


def _csv_rows(events: QuerySet[RolloutEvent]) -> Iterator[list[str]]:
    yield [
        "time",
        "rollout",
        "alias",
        "seq",
        "kind",
        "from_state",
        "to_state",
        "step",
        "actor",
        "via",
        "actor_detail",
        "reason",
        "evidence",
    ]
    for event in events.iterator(chunk_size=500):
        yield [
            event.created_at.isoformat(), str(event.rollout_id), event.rollout.alias_name, str(event.seq), event.kind,
            event.from_state, event.to_state, str(event.step_index + 1 if event.step_index >= 0 else ""), event.actor,
            event.via, event.actor_detail, _csv_safe(event.reason), json.dumps(event.evidence, sort_keys=True),
        ]  # fmt: skip


def _csv_safe(text: str) -> str:
    # A cell starting with = + - @ is a formula to a spreadsheet: reasons are typed by people.
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


@viewer_required
@require_GET
def audit_log_csv(request: HttpRequest) -> StreamingHttpResponse:
    events, _ = _audit_events(request.GET)
    writer = csv.writer(_Echo())
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    response = StreamingHttpResponse(
        (writer.writerow(row) for row in _csv_rows(events)), content_type="text/csv"
    )
    response["Content-Disposition"] = f'attachment; filename="ramp-audit-{stamp}.csv"'
    return response
