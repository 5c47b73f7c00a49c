"""Creating a rollout from the form or a pasted plan, checked by the one plan validator, with the sample-size
estimate of its steps before anything starts."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from accounts.decorators import manager_required
from config.errors import DomainError
from evals.selectors import eval_suite_list
from rollouts.forms import PastePlanForm, RolloutForm
from rollouts.planning import plan_sample_sizes
from rollouts.plans import PLAN_EXAMPLE, PlanInvalid
from rollouts.services import (
    plan_validate,
    rollout_create,
)
from rollouts.views.display import estimate_view, plan_yaml, ui_actor
from serving.selectors import model_version_list


def _create_context(request: HttpRequest, **extra: Any) -> dict[str, Any]:
    return {"mode": extra.pop("mode", "form"), "example": plan_yaml(PLAN_EXAMPLE), **extra}


def _form(data: Any = None) -> RolloutForm:
    versions = [v.label for v in model_version_list()]
    suites = [s.name for s in eval_suite_list(latest_only=True)]
    return RolloutForm(data, versions=versions, suites=suites)


@manager_required
@require_http_methods(["GET", "POST"])
def rollout_new(request: HttpRequest) -> HttpResponse:
    mode = request.POST.get("mode") or request.GET.get("mode") or "form"
    mode = "paste" if mode == "paste" else "form"
    if request.method == "GET":
        return render(
            request,
            "rollouts/new.html",
            _create_context(request, mode=mode, form=_form(), paste=PastePlanForm()),
        )
    intent = request.POST.get("intent", "check")
    form, paste = _form(), PastePlanForm()
    plan: dict[str, Any] | str
    if mode == "paste":
        paste = PastePlanForm(request.POST)
        paste.is_valid()
        plan = paste.cleaned_data.get("plan") or ""
        target: RolloutForm | PastePlanForm = paste
    else:
        form = _form(request.POST)
        form.is_valid()
        plan = form.to_plan()
        target = form
    context = _create_context(request, mode=mode, form=form, paste=paste)
    try:
        validated = plan_validate(data=plan)
        if intent == "create":
            created = rollout_create(plan=plan, actor=ui_actor(request))
            messages.success(
                request,
                "Created as a draft. Check the estimate below, then start it when both versions have a ready engine.",
            )
            return redirect("rollout-detail", rollout_id=created.rollout.pk)
        context["estimate"] = estimate_view(
            plan_sample_sizes(plan=validated.plan, baseline=validated.baseline)
        )
        context["normalised"] = plan_yaml(validated.plan.to_dict())
    except PlanInvalid as exc:
        target.place_errors(exc.errors)
        context["error_count"] = sum(len(v) for v in exc.errors.values())
        return render(request, "rollouts/new.html", context, status=400)
    except DomainError as exc:
        target.place_errors({exc.field or "plan": [exc.message]})
        context["error_count"] = 1
        return render(request, "rollouts/new.html", context, status=exc.status_code)
    return render(request, "rollouts/new.html", context)
