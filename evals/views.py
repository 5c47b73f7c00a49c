"""Pages of evals: suites (with JSONL upload, every bad line shown by number), runs with live progress,
paired comparisons with per-tag tables, and a model version's eval history (a partial the serving page
loads). Writes go through `evals.services`, reads through `evals.selectors`."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts.decorators import manager_required, viewer_required
from accounts.roles import Role
from accounts.selectors import user_roles
from config.errors import DomainError, NotFound
from config.live import LiveRegion, live_region, live_response
from evals import selectors, services
from evals.jsonl import MAX_BYTES
from evals.models import EvalRun, EvalSuite
from evals.scorers import SCORERS
from serving.selectors import model_version_get, model_version_list

POLL_S = 2.0
RUN_STATUS = {
    "queued": "amber",
    "running": "amber",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "grey",
}
ITEMS_SHOWN = 50


class SuiteUploadForm(forms.Form):
    name = forms.CharField(
        label="Suite name",
        max_length=64,
        required=False,
        help_text="An existing name makes its next version.",
    )
    description = forms.CharField(
        label="Description", required=False, widget=forms.Textarea(attrs={"rows": 2})
    )
    file = forms.FileField(
        label="JSONL file", required=False,
        help_text='One JSON object per line: {"id", "prompt" or "messages", "reference", "tags"}.',
    )  # fmt: skip


class RunStartForm(forms.Form):
    model_version = forms.ChoiceField(label="Model version")
    scorer = forms.ChoiceField(label="Scorer", initial="exact_match")
    max_tokens = forms.IntegerField(label="Max tokens per answer", initial=64, required=False)
    concurrency = forms.IntegerField(label="Requests at once", initial=4, required=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        version_field, scorer_field = self.fields["model_version"], self.fields["scorer"]
        assert isinstance(version_field, forms.ChoiceField) and isinstance(scorer_field, forms.ChoiceField)
        version_field.choices = [(str(v.pk), v.label) for v in model_version_list()]
        # The judge needs parameters (its judge model); it is for the API, where a full spec can be given.
        scorer_field.choices = [(name, name) for name in sorted(SCORERS) if name != "judge"]


def run_view(run: EvalRun) -> dict[str, Any]:
    progress = selectors.eval_run_progress(run=run)
    return {
        "run": run, "status": RUN_STATUS.get(run.state, "grey"), "pct": round(progress.fraction * 100),
        "progress": progress, "scorers": ", ".join(s.get("label", s.get("name", "?")) for s in run.scorers),
    }  # fmt: skip


# --- suites ---------------------------------------------------------------------------------------


def _suite_rows() -> list[dict[str, Any]]:
    counts = selectors.eval_suite_run_counts()
    versions: dict[str, int] = {}
    for suite in selectors.eval_suite_list():
        versions[suite.name] = versions.get(suite.name, 0) + 1
    return [
        {"suite": s, "versions": versions.get(s.name, 1), "runs": counts.get(s.pk, 0)}
        for s in selectors.eval_suite_list(latest_only=True)
    ]


@viewer_required
@require_http_methods(["GET", "POST"])
def eval_suite_list_page(request: HttpRequest) -> HttpResponse:
    form = SuiteUploadForm()
    line_errors: list[Any] = []
    status = 200
    if request.method == "POST":
        if not user_roles(user=request.user) & {Role.RELEASE_MANAGER, Role.ADMIN}:
            raise PermissionDenied("uploading a suite needs the role release_manager or admin")
        form = SuiteUploadForm(request.POST, request.FILES)
        if form.is_valid():
            upload = form.cleaned_data.get("file")
            if upload is None:
                form.add_error("file", "choose a JSONL file")
            elif upload.size > MAX_BYTES:
                form.add_error("file", f"the file is {upload.size} bytes; at most {MAX_BYTES} bytes")
            else:
                try:
                    suite = services.eval_suite_create(
                        name=form.cleaned_data["name"], jsonl_data=upload.read(),
                        description=form.cleaned_data.get("description") or "", created_by=request.user,
                    )  # fmt: skip
                except services.SuiteUploadError as exc:
                    line_errors = exc.line_errors
                    form.add_error(
                        "file",
                        f"the file was not stored: {len(line_errors)} bad line{'s' if len(line_errors) != 1 else ''}",
                    )
                except DomainError as exc:
                    form.add_error(exc.field if exc.field in form.fields else None, exc.message)
                else:
                    messages.success(request, f"Stored {suite.label} with {suite.item_count} items.")
                    return redirect("eval-suite-detail", suite_id=suite.pk)
        status = 400
    return render(
        request,
        "evals/suites.html",
        {"rows": _suite_rows(), "form": form, "line_errors": line_errors},
        status=status,
    )


def _suite_or_404(suite_id: int) -> EvalSuite:
    try:
        return selectors.eval_suite_get(ref=suite_id)
    except NotFound as exc:
        raise Http404(exc.message) from exc


def _runs_region(
    request: HttpRequest, *, suite: EvalSuite | None = None, model_version_id: int | None = None
) -> LiveRegion:
    runs = [run_view(r) for r in selectors.eval_run_list(suite=suite, model_version_id=model_version_id)[:50]]
    url = reverse("eval-run-list-live")
    params = []
    if suite is not None:
        params.append(f"suite={suite.pk}")
    if model_version_id is not None:
        params.append(f"model_version={model_version_id}")
    if params:
        url += "?" + "&".join(params)
    return live_region(
        request, template="evals/_runs.html", context={"runs": runs}, region_id="eval-runs-live", url=url,
        every_s=POLL_S, label="Eval runs",
    )  # fmt: skip


@viewer_required
@require_GET
def eval_suite_detail(request: HttpRequest, suite_id: int) -> HttpResponse:
    suite = _suite_or_404(suite_id)
    items = []
    for item in selectors.eval_suite_items(suite=suite)[:ITEMS_SHOWN]:
        prompt = item.prompt or "\n".join(f"{m.get('role')}: {m.get('content')}" for m in item.messages or [])
        items.append({"item": item, "prompt": prompt})
    return render(request, "evals/suite_detail.html", {
        "suite": suite, "versions": selectors.eval_suite_list(name=suite.name), "items": items,
        "runs": _runs_region(request, suite=suite), "start_form": RunStartForm(), "items_shown": ITEMS_SHOWN,
    })  # fmt: skip


@manager_required
@require_POST
def eval_run_start(request: HttpRequest, suite_id: int) -> HttpResponse:
    suite = _suite_or_404(suite_id)
    form = RunStartForm(request.POST)
    if not form.is_valid():
        messages.error(
            request,
            "Could not start the run: "
            + "; ".join(f"{k}: {' '.join(str(e) for e in v)}" for k, v in form.errors.items()),
        )
        return redirect("eval-suite-detail", suite_id=suite.pk)
    try:
        version = model_version_get(ref=form.cleaned_data["model_version"])
        run = services.eval_run_create(
            suite=suite, model_version=version, scorers=[form.cleaned_data["scorer"]],
            concurrency=form.cleaned_data.get("concurrency") or 4, max_tokens=form.cleaned_data.get("max_tokens") or 64,
            created_by=request.user,
        )  # fmt: skip
    except DomainError as exc:
        messages.error(request, f"Could not start the run: {exc.message}")
        return redirect("eval-suite-detail", suite_id=suite.pk)
    messages.success(request, f"Run {run.pk} queued: {suite.label} on {version.label}.")
    return redirect("eval-run-detail", run_id=run.pk)


# --- runs -----------------------------------------------------------------------------------------


@viewer_required
@require_GET
def eval_run_list(request: HttpRequest) -> HttpResponse:
    version_id = request.GET.get("model_version")
    model_version_id = int(version_id) if version_id and version_id.isdigit() else None
    return render(
        request, "evals/runs.html", {"live": _runs_region(request, model_version_id=model_version_id)}
    )


@viewer_required
@require_GET
def eval_run_list_live(request: HttpRequest) -> HttpResponse:
    suite_id, version_id = request.GET.get("suite"), request.GET.get("model_version")
    suite = _suite_or_404(int(suite_id)) if suite_id and suite_id.isdigit() else None
    model_version_id = int(version_id) if version_id and version_id.isdigit() else None
    return live_response(request, _runs_region(request, suite=suite, model_version_id=model_version_id))


def _run_or_404(run_id: int) -> EvalRun:
    try:
        return selectors.eval_run_get(run_id=run_id)
    except NotFound as exc:
        raise Http404(exc.message) from exc


def _run_region(request: HttpRequest, run: EvalRun) -> LiveRegion:
    summary = selectors.eval_run_live_summary(run=run)
    failed = list(selectors.eval_run_results(run=run, failed_only=True)[:20])
    context = {"r": run_view(run), "summary": summary, "failed": failed, "can_cancel": not run.is_finished}
    return live_region(
        request, template="evals/_run.html", context=context, region_id="eval-run-live",
        url=reverse("eval-run-detail-live", args=[run.pk]), every_s=POLL_S, label="Eval run progress",
    )  # fmt: skip


@viewer_required
@require_GET
def eval_run_detail(request: HttpRequest, run_id: int) -> HttpResponse:
    run = _run_or_404(run_id)
    others = selectors.eval_runs_comparable(run=run)[:20]
    results = selectors.eval_run_results(run=run)[:ITEMS_SHOWN]
    return render(request, "evals/run_detail.html", {
        "run": run, "live": _run_region(request, run), "others": others, "results": results, "items_shown": ITEMS_SHOWN,
    })  # fmt: skip


@viewer_required
@require_GET
def eval_run_detail_live(request: HttpRequest, run_id: int) -> HttpResponse:
    return live_response(request, _run_region(request, _run_or_404(run_id)))


@manager_required
@require_POST
def eval_run_cancel(request: HttpRequest, run_id: int) -> HttpResponse:
    run = _run_or_404(run_id)
    try:
        services.eval_run_cancel(run=run)
    except DomainError as exc:
        messages.error(request, f"Could not cancel: {exc.message}")
    else:
        messages.success(
            request, f"Run {run.pk}: cancel requested; a running worker stops at its next checkpoint."
        )
    return redirect("eval-run-detail", run_id=run.pk)


# --- comparisons ----------------------------------------------------------------------------------


@viewer_required
@require_GET
def eval_compare(request: HttpRequest) -> HttpResponse:
    baseline_id, candidate_id = request.GET.get("baseline", ""), request.GET.get("candidate", "")
    if not (baseline_id.isdigit() and candidate_id.isdigit()):
        return render(
            request,
            "evals/compare.html",
            {"error": "Choose two runs of the same suite to compare."},
            status=400,
        )
    baseline, candidate = _run_or_404(int(baseline_id)), _run_or_404(int(candidate_id))
    try:
        comparison = selectors.eval_runs_compare(
            baseline_run=baseline, candidate_run=candidate, scorer=request.GET.get("scorer") or None
        )
    except DomainError as exc:
        return render(
            request,
            "evals/compare.html",
            {"error": exc.message, "baseline": baseline, "candidate": candidate},
            status=400,
        )
    return render(request, "evals/compare.html", {
        "comparison": comparison, "baseline": baseline, "candidate": candidate,
        "raw": json.dumps(comparison, indent=2, default=str),
    })  # fmt: skip


@viewer_required
@require_GET
def eval_history(request: HttpRequest, version_id: int) -> HttpResponse:
    """A model version's eval runs, as a partial (the model version page loads it)."""
    try:
        version = model_version_get(ref=version_id)
    except NotFound as exc:
        raise Http404(exc.message) from exc
    runs = [run_view(r) for r in selectors.eval_run_list(model_version_id=version.pk)[:50]]
    return render(request, "evals/_runs.html", {"runs": runs, "version": version})
