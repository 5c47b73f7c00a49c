"""Input and output shapes of serving's REST API. They validate and shape; the services decide and write."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from rest_framework import serializers

from serving.engines.command import gpu_count, reserved_flag_in
from serving.engines.flavors import base_url_normalise
from serving.engines.kubernetes.spec import DeploymentSpec, SpecError
from serving.models import EngineWorker, ModelVersion


class ModelVersionRegisterInput(serializers.Serializer):
    name = serializers.SlugField(max_length=64, help_text="The model family, e.g. 'adder'.")
    version = serializers.SlugField(max_length=64, help_text="e.g. 'v2' or 'v2-int8'.")
    artifact = serializers.CharField(max_length=500,
                                     help_text="A directory on the engine hosts, or a hub id on GPU hosts.")
    served_model_name = serializers.CharField(max_length=128, required=False, allow_blank=True, default="",
                                              help_text="The name the engine serves it under (default: name-version).")
    description = serializers.CharField(required=False, allow_blank=True, default="")
    engine_args = serializers.ListField(child=serializers.CharField(max_length=500), required=False, default=list,
                                        max_length=100, help_text="Extra vLLM command-line arguments.")
    sampling_defaults = serializers.DictField(required=False, default=dict)
    deployment = serializers.DictField(
        required=False, default=dict,
        help_text="How the kubernetes driver deploys it: image, gpus, model_source (hub, pvc, node_path), pvc, "
                  "hf_token_secret, node_selector, tolerations, runtime_class, shm_size, cpu, memory, env, "
                  "startup_timeout_s.")
    price_input_per_million = serializers.DecimalField(max_digits=12, decimal_places=4, min_value=Decimal(0),
                                                       required=False, default=Decimal(0))
    price_output_per_million = serializers.DecimalField(max_digits=12, decimal_places=4, min_value=Decimal(0),
                                                        required=False, default=Decimal(0))

    def validate_engine_args(self, value: list[str]) -> list[str]:
        reserved = reserved_flag_in(value)
        if reserved is not None:
            raise serializers.ValidationError(f"{reserved} is set by the engine agent; leave it out")
        try:
            gpu_count(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from None
        return value

    def validate_deployment(self, value: dict[str, Any]) -> dict[str, Any]:
        try:
            DeploymentSpec.from_dict(value)
        except SpecError as exc:
            raise serializers.ValidationError(f"{exc.field.removeprefix('deployment.')}: {exc.message}") from None
        return value

    def validate_artifact(self, value: str) -> str:
        if "\x00" in value or not value.strip():
            raise serializers.ValidationError("must be a directory path or a hub id")
        return value.strip()


class ModelVersionOutput(serializers.ModelSerializer):
    label = serializers.CharField(read_only=True)  # type: ignore[assignment]  # a field, not Field.label
    created_by = serializers.SerializerMethodField()

    class Meta:
        model = ModelVersion
        fields: tuple[str, ...] = (
            "id", "name", "version", "label", "description", "artifact", "served_model_name", "engine_args",
            "sampling_defaults", "deployment", "lineage_hash", "lineage", "price_input_per_million", "price_output_per_million",
            "created_by", "created_at",
        )

    def get_created_by(self, obj: ModelVersion) -> str | None:
        return obj.created_by.get_username() if obj.created_by is not None else None


class ModelVersionDetailOutput(ModelVersionOutput):
    ready_engines = serializers.SerializerMethodField(help_text="Engine workers of this version that are READY.")

    class Meta(ModelVersionOutput.Meta):
        fields = (*ModelVersionOutput.Meta.fields, "ready_engines")

    def get_ready_engines(self, obj: ModelVersion) -> int:
        return int(self.context.get("ready_engines", 0))


class EngineWorkerCreateInput(serializers.Serializer):
    model_version = serializers.CharField(max_length=200, help_text="The version's id or label (adder-v2).")
    driver = serializers.ChoiceField(choices=EngineWorker.Driver.choices, default=EngineWorker.Driver.LOCAL)
    host_name = serializers.CharField(max_length=128, required=False, default=lambda: settings.ENGINE_AGENT_HOST,
                                      help_text="The engine agent host that runs (or probes) it "
                                                "(default: this server's ENGINE_AGENT_HOST).")
    base_url = serializers.CharField(max_length=300, required=False, allow_blank=True, default="",
                                     help_text="Static only: the OpenAI-compatible endpoint (http or https), with or "
                                               "without its /v1.")
    api_key = serializers.CharField(max_length=300, required=False, allow_blank=True, default="", write_only=True,
                                    help_text="Static only: the key the endpoint needs. Never shown again.")
    flavor = serializers.ChoiceField(choices=EngineWorker.Flavor.choices, default=EngineWorker.Flavor.VLLM,
                                     help_text="Static only: the server behind base_url (its probes, key header, "
                                               "drain signal). Local and kubernetes engines are vLLM.")
    replicas = serializers.IntegerField(min_value=1, max_value=1000, default=1,
                                        help_text="Kubernetes only: the Deployment's pods.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        driver = attrs["driver"]
        static = driver == EngineWorker.Driver.STATIC
        if static and not attrs["base_url"]:
            raise serializers.ValidationError({"base_url": ["a static engine needs its endpoint's URL"]})
        if not static and (attrs["base_url"] or attrs["api_key"]):
            field = "base_url" if attrs["base_url"] else "api_key"
            raise serializers.ValidationError({field: [f"only a static engine takes this; the platform sets a {driver} one's"]})
        if not static and attrs["flavor"] != EngineWorker.Flavor.VLLM:
            raise serializers.ValidationError({"flavor": [f"a {driver} engine is vLLM; flavor is for static endpoints"]})
        if attrs["replicas"] != 1 and driver != EngineWorker.Driver.KUBERNETES:
            raise serializers.ValidationError({"replicas": ["only a kubernetes engine has more than one replica"]})
        if static:
            # Not Django's URLValidator: it refuses a bare host name such as http://sglang:30000 (compose).
            try:
                base_url_normalise(attrs["base_url"], flavor=attrs["flavor"])
            except ValueError as exc:
                raise serializers.ValidationError({"base_url": [str(exc)]}) from None
        return attrs


class EngineDesiredStateInput(serializers.Serializer):
    desired_state = serializers.ChoiceField(choices=EngineWorker.Desired.choices)


class HealthOutput(serializers.Serializer):
    ok = serializers.BooleanField(allow_null=True, source="last_health_ok")
    at = serializers.DateTimeField(allow_null=True, source="last_health_at")
    detail = serializers.CharField(source="last_health_detail")


class EngineWorkerOutput(serializers.ModelSerializer):
    model_version = serializers.IntegerField(source="model_version_id")
    model_version_label = serializers.CharField(source="model_version.label")
    health = HealthOutput(source="*")
    has_api_key = serializers.SerializerMethodField()

    class Meta:
        model = EngineWorker
        fields: tuple[str, ...] = (
            "id", "model_version", "model_version_label", "driver", "flavor", "host_name", "base_url", "port",
            "has_api_key", "replicas", "ready_replicas", "gpu_ids", "desired_state", "state", "state_reason", "state_changed_at", "pid", "restarts", "consecutive_failures",
            "next_start_at", "started_at", "ready_at", "health", "claimed_by", "metrics_at", "created_at",
        )

    def get_has_api_key(self, obj: EngineWorker) -> bool:
        return bool(obj.api_key)


class EngineWorkerDetailOutput(EngineWorkerOutput):
    class Meta(EngineWorkerOutput.Meta):
        fields = (*EngineWorkerOutput.Meta.fields, "pods", "metrics", "log_tail")
