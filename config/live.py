"""Live regions of the web UI: one server-rendered partial for the first page and for its updates.

A region is a partial template wrapped in an element that htmx polls. The wrapper's URL carries a
digest of what the region shows; a poll whose digest still matches gets 204, which htmx leaves alone,
so open disclosures, scroll positions and focus survive until something really changed, and an idle
page costs one small request per interval."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

DIGEST_PARAM = "h"


@dataclass(frozen=True)
class LiveRegion:
    html: SafeString
    digest: str


def live_region(
    request: HttpRequest, *, template: str, context: dict[str, Any], region_id: str, url: str, every_s: float = 2.0,
    label: str = "",
) -> LiveRegion:
    """The wrapped partial, as the full page embeds it and as a poll returns it."""
    inner = render_to_string(template, context, request=request)
    # The CSRF token differs per render; it must not make every poll look like a change.
    digest = hashlib.sha256(_without_csrf(inner).encode()).hexdigest()[:16]
    separator = "&" if "?" in url else "?"
    poll_url = f"{url}{separator}{urlencode({DIGEST_PARAM: digest})}"
    trigger = f"every {every_s:g}s"
    html = format_html(
        '<div id="{}" class="live" hx-get="{}" hx-trigger="{}" hx-swap="outerHTML" data-live-digest="{}"{}>{}</div>',
        region_id, poll_url, trigger, digest,
        format_html(' aria-label="{}"', label) if label else "",
        mark_safe(inner),  # rendered by the template engine, so already escaped
    )  # fmt: skip
    return LiveRegion(html=html, digest=digest)


_CSRF_INPUT = re.compile(r'name="csrfmiddlewaretoken" value="[^"]*"')


def _without_csrf(html: str) -> str:
    return _CSRF_INPUT.sub("", html)


def live_response(request: HttpRequest, region: LiveRegion) -> HttpResponse:
    """204 when the poller already shows this digest (htmx swaps nothing), else the region."""
    if request.GET.get(DIGEST_PARAM) == region.digest:
        return HttpResponse(status=204)
    response = HttpResponse(region.html)
    response["Cache-Control"] = "no-store"
    return response
