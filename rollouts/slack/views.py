"""Slack's two endpoints and the account page that links a Slack user. Thin: verify, parse, call a service.

Slack waits three seconds for an answer. A click does its decision here (one short transaction through the
rollouts services) and leaves every call back to Slack (the message update, a reply) to Celery."""

from __future__ import annotations

import logging

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods, require_POST

from rollouts.slack import blocks
from rollouts.slack.interactions import (
    PayloadInvalid,
    click_handle,
    click_parse,
    command_handle,
    command_parse,
)
from rollouts.slack.models import SlackIdentity
from rollouts.slack.services import LINK_CODE_TTL_S, slack_identity_unlink, slack_link_code_create
from rollouts.slack.verification import RequestRefused, SlackNotConfigured, slack_request_verify

logger = logging.getLogger(__name__)


def _refused(request: HttpRequest) -> HttpResponse | None:
    """None when the request is genuinely Slack's, fresh and new; else the response that refuses it."""
    try:
        slack_request_verify(
            body=request.body,
            timestamp=request.headers.get("X-Slack-Request-Timestamp"),
            signature=request.headers.get("X-Slack-Signature"),
        )
    except SlackNotConfigured:
        return JsonResponse({"detail": "Slack is not configured: SLACK_SIGNING_SECRET is not set", "code": "unavailable"},
                            status=503)  # fmt: skip
    except RequestRefused as exc:
        logger.warning("refused a Slack request from %s: %s", request.META.get("REMOTE_ADDR"), exc.reason)
        return JsonResponse({"detail": f"not a valid Slack request: {exc.reason}", "code": "unauthorized"}, status=401)
    return None


def _invalid(exc: PayloadInvalid) -> JsonResponse:
    return JsonResponse({"detail": exc.reason, "code": "invalid"}, status=400)


def _reply_later(response_url: str, text: str) -> None:
    from rollouts.slack.tasks import slack_respond

    def send() -> None:
        try:
            slack_respond.delay(response_url, text)
        except Exception:  # the broker is down; the person still gets no change, only no explanation
            logger.exception("could not enqueue a Slack reply")

    transaction.on_commit(send)


@csrf_exempt
@require_POST
def slack_interactions(request: HttpRequest) -> HttpResponse:
    refused = _refused(request)
    if refused is not None:
        return refused
    try:
        click = click_parse(request.body)
    except PayloadInvalid as exc:
        return _invalid(exc)
    if click.action_id == blocks.ACTION_OPEN:
        return HttpResponse(status=200)  # the link button: the browser opens the page, nothing to do here
    reply = click_handle(click)
    # Slack ignores the body of a click's answer; a reply goes through response_url. A successful click
    # needs none: the message itself changes to say who decided.
    if not reply.ok and click.response_url:
        _reply_later(click.response_url, reply.text)
    return JsonResponse({"response_type": "ephemeral", "replace_original": False, "text": reply.text})


@csrf_exempt
@require_POST
def slack_commands(request: HttpRequest) -> HttpResponse:
    refused = _refused(request)
    if refused is not None:
        return refused
    try:
        command = command_parse(request.body)
    except PayloadInvalid as exc:
        return _invalid(exc)
    # A slash command's answer body is shown to the person who typed it, and only to them.
    return JsonResponse({"response_type": "ephemeral", "text": command_handle(command)})


@login_required
@require_http_methods(["GET", "POST"])
def slack_account(request: HttpRequest) -> HttpResponse:
    """The Slack part of a person's profile: their links, a code to link from Slack, and unlinking."""
    code = None
    if request.method == "POST":
        action = request.POST.get("action")
        if action == "code":
            code = slack_link_code_create(user=request.user)
        elif action == "unlink":
            raw = request.POST.get("identity", "")
            if raw.isdigit() and slack_identity_unlink(user=request.user, identity_id=int(raw)):
                messages.success(request, "Slack user unlinked.")
            else:
                messages.error(request, "identity: no such Slack link on your account.")
            return redirect("slack-account")
        else:
            messages.error(request, "action: expected code or unlink.")
            return redirect("slack-account")
    identities = SlackIdentity.objects.filter(user=request.user).order_by("team_id")  # type: ignore[misc]
    return render(
        request,
        "slack/account.html",
        {"identities": identities, "code": code, "code_minutes": LINK_CODE_TTL_S // 60},
        status=200,
    )
