"""Serving in the Django admin: mostly for looking. Changes that gateways or the agent must see go
through serving's services (route table, desired state, key revocation), never a bare save."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from config.errors import DomainError
from serving.models import Alias, EngineWorker, GatewayKey, ModelVersion, RequestRecord, ShadowPair
from serving.services import (
    TTFB_TIMEOUT_MAX_S,
    TTFB_TIMEOUT_MIN_S,
    KeyLimits,
    RouteSplit,
    alias_options_set,
    engine_worker_set_desired,
    gateway_key_limits_set,
    gateway_key_revoke,
    route_set,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ("__str__", "served_model_name", "artifact", "short_lineage", "price_input_per_million",
                    "price_output_per_million", "created_at")
    search_fields = ("name", "version", "served_model_name", "lineage_hash")
    # Lineage is computed from the artifact at registration; editing it by hand would make it lie.
    readonly_fields = ("name", "version", "artifact", "lineage_hash", "lineage", "created_by", "created_at",
                       "idempotency_key", "idempotency_fingerprint")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # registration computes the lineage: the API or `build_demo_models`

    @admin.display(description="lineage")
    def short_lineage(self, obj: ModelVersion) -> str:
        return obj.lineage_hash[:12]


@admin.register(EngineWorker)
class EngineWorkerAdmin(ReadOnlyAdmin):
    list_display = ("id", "model_version", "driver", "host_name", "desired_state", "state", "pid", "restarts",
                    "last_health_ok", "ready_at")
    list_filter = ("state", "desired_state", "driver", "host_name")
    search_fields = ("model_version__name", "model_version__version", "host_name", "base_url")
    exclude = ("api_key",)
    actions = ("desire_running", "desire_stopped")

    def _desire(self, request: HttpRequest, queryset: QuerySet[EngineWorker], desired: str) -> None:
        for worker in queryset:
            engine_worker_set_desired(worker=worker, desired=desired)
        self.message_user(request, f"{queryset.count()} engine(s) set to {desired}", messages.SUCCESS)

    @admin.action(description="Run the selected engines (retries failed ones)")
    def desire_running(self, request: HttpRequest, queryset: QuerySet[EngineWorker]) -> None:
        self._desire(request, queryset, EngineWorker.Desired.RUNNING)

    @admin.action(description="Drain and stop the selected engines")
    def desire_stopped(self, request: HttpRequest, queryset: QuerySet[EngineWorker]) -> None:
        self._desire(request, queryset, EngineWorker.Desired.STOPPED)


class AliasForm(forms.ModelForm):
    class Meta:
        model = Alias
        fields = ("name", "baseline", "candidate", "candidate_weight", "shadow_rate", "failover_to_candidate",
                  "store_prompts", "ttfb_timeout_s")

    def clean_ttfb_timeout_s(self) -> float | None:
        value = self.cleaned_data.get("ttfb_timeout_s")
        if value is not None and not (TTFB_TIMEOUT_MIN_S <= value <= TTFB_TIMEOUT_MAX_S):
            raise forms.ValidationError(
                f"Between {TTFB_TIMEOUT_MIN_S:g} and {TTFB_TIMEOUT_MAX_S:g} seconds, or blank for the default.")
        return value


@admin.register(Alias)
class AliasAdmin(admin.ModelAdmin):
    form = AliasForm
    list_display = ("name", "baseline", "candidate", "candidate_weight", "shadow_rate", "rollout_id", "updated_at")
    readonly_fields = ("rollout_id", "gpu_budget", "target_weight", "capacity_targets", "weight_changed_at", "updated_at")

    def save_model(self, request: HttpRequest, obj: Alias, form: Any, change: bool) -> None:
        # Through the service: it validates the split and bumps the route generation gateways watch.
        alias = route_set(alias_name=obj.name, split=RouteSplit(
            baseline=obj.baseline, candidate=obj.candidate, candidate_weight=obj.candidate_weight,
            shadow_rate=obj.shadow_rate, rollout_id=obj.rollout_id, failover_to_candidate=obj.failover_to_candidate,
            gpu_budget=obj.gpu_budget))
        alias_options_set(alias=alias, store_prompts=obj.store_prompts, ttfb_timeout_s=obj.ttfb_timeout_s)


class GatewayKeyForm(forms.ModelForm):
    class Meta:
        model = GatewayKey
        fields = ("rpm_limit", "tpm_limit", "max_concurrency")

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        try:
            KeyLimits(rpm_limit=cleaned.get("rpm_limit"), tpm_limit=cleaned.get("tpm_limit"),
                      max_concurrency=cleaned.get("max_concurrency")).check()
        except DomainError as exc:
            self.add_error(exc.field or None, exc.message)
        return cleaned


@admin.register(GatewayKey)
class GatewayKeyAdmin(admin.ModelAdmin):
    form = GatewayKeyForm
    list_display = ("name", "prefix", "aliases", "rpm_limit", "tpm_limit", "max_concurrency", "created_at",
                    "revoked_at")
    # Only the hash is stored; a key is created (and shown once) by `manage.py create_gateway_key`. Its
    # limits may be changed here.
    fields = ("name", "prefix", "key_hash", "aliases", "rpm_limit", "tpm_limit", "max_concurrency", "created_at",
              "revoked_at")
    readonly_fields = ("name", "prefix", "key_hash", "aliases", "created_at", "revoked_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: GatewayKey, form: Any, change: bool) -> None:
        # Through the service: it checks the limits and bumps the route generation gateways watch.
        gateway_key_limits_set(key=obj, limits=KeyLimits(
            rpm_limit=obj.rpm_limit, tpm_limit=obj.tpm_limit, max_concurrency=obj.max_concurrency))
    actions = ("revoke",)

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[GatewayKey]) -> None:
        for key in queryset:
            gateway_key_revoke(key=key)
        self.message_user(request, f"{queryset.count()} key(s) revoked", messages.SUCCESS)


@admin.register(RequestRecord)
class RequestRecordAdmin(ReadOnlyAdmin):
    list_display = ("request_id", "created_at", "alias", "arm", "model_version", "status_code", "outcome",
                    "ttft_ms", "e2e_ms", "completion_tokens")
    list_filter = ("alias", "arm", "outcome", "stream")
    search_fields = ("request_id", "session_hash")
    date_hierarchy = "created_at"


@admin.register(ShadowPair)
class ShadowPairAdmin(ReadOnlyAdmin):
    list_display = ("request_id", "created_at", "alias", "baseline_version", "candidate_version", "candidate_outcome")
    list_filter = ("alias", "candidate_outcome")
