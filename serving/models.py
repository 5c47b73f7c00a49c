"""Serving's data: model versions, engine workers, aliases (the route table), gateway keys, and what the
gateway records. Other apps read and change these only through `serving.services` and `serving.selectors`."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class ModelVersion(models.Model):
    """One deployable version of a model: weights, tokenizer, chat template, engine flags."""

    name = models.SlugField(max_length=64, help_text="The model family, e.g. 'adder'.")
    version = models.SlugField(max_length=64, help_text="e.g. 'v2' or 'v2-int8'.")
    description = models.TextField(blank=True)
    artifact = models.CharField(max_length=500, help_text="A local directory, or a hub id on GPU hosts.")
    served_model_name = models.CharField(max_length=128, help_text="The name the engine serves it under.")
    engine_args = models.JSONField(default=list, blank=True, help_text="Extra vLLM command-line arguments.")
    # How the `kubernetes` driver deploys it (serving.engines.kubernetes.spec.DeploymentSpec): image, GPUs,
    # where the weights come from, node selector, tolerations, runtime class, shared memory.
    deployment = models.JSONField(default=dict, blank=True, help_text="Kubernetes deployment settings.")
    sampling_defaults = models.JSONField(default=dict, blank=True)
    # sha256 over the weights, tokenizer, chat template and sampling defaults, and each part's own hash.
    lineage_hash = models.CharField(max_length=64, blank=True)
    lineage = models.JSONField(default=dict, blank=True)
    price_input_per_million = models.DecimalField(max_digits=12, decimal_places=4, default=0)
    price_output_per_million = models.DecimalField(max_digits=12, decimal_places=4, default=0)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    # An Idempotency-Key replays the registration it first made (config.idempotency).
    idempotency_key = models.CharField(max_length=255, blank=True, default="")
    idempotency_fingerprint = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ("name", "version")
        constraints = [
            models.UniqueConstraint(fields=("name", "version"), name="model_version_unique"),
            models.UniqueConstraint(fields=("created_by", "idempotency_key"), condition=~Q(idempotency_key=""),
                                    name="model_version_idempotency_key_unique"),
        ]

    def __str__(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        return f"{self.name}-{self.version}"


class EngineWorker(models.Model):
    """One engine serving one model version: a vLLM process the agent runs, or a static endpoint."""

    class Driver(models.TextChoices):
        LOCAL = "local", "local vLLM process"
        STATIC = "static", "static endpoint"
        KUBERNETES = "kubernetes", "Kubernetes Deployment"

    class Flavor(models.TextChoices):
        """The server behind a worker: decides its probes, headers, paths and drain signal
        (serving.engines.flavors). Local and Kubernetes workers are always vLLM."""

        VLLM = "vllm", "vLLM"
        SGLANG = "sglang", "SGLang"
        TGI = "tgi", "Text Generation Inference"
        LLAMACPP = "llamacpp", "llama.cpp server"
        OLLAMA = "ollama", "Ollama"
        OPENAI = "openai", "OpenAI API"
        AZURE_OPENAI = "azure-openai", "Azure OpenAI"

    class Desired(models.TextChoices):
        RUNNING = "running"
        STOPPED = "stopped"

    class State(models.TextChoices):
        PENDING = "pending"  # desired running, not started yet
        STARTING = "starting"  # process launched, not ready yet
        READY = "ready"  # passed readiness; routable
        UNHEALTHY = "unhealthy"  # was ready, a health check failed; not routable
        DRAINING = "draining"  # stop routing, wait for in-flight requests
        STOPPED = "stopped"
        CRASHED = "crashed"  # the process died; restart after backoff
        FAILED = "failed"  # gave up after too many restarts

    ROUTABLE_STATES = (State.READY,)

    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="workers")
    driver = models.CharField(max_length=16, choices=Driver.choices, default=Driver.LOCAL)
    host_name = models.CharField(max_length=128, default="localhost", help_text="The agent host that runs it.")
    base_url = models.URLField(max_length=300, blank=True, help_text="Static: the endpoint; local: set by the agent.")
    port = models.PositiveIntegerField(null=True, blank=True)
    api_key = models.CharField(max_length=300, blank=True,
                               help_text="The key the engine wants: a static endpoint's, or the one the agent gave its engine.")
    flavor = models.CharField(max_length=16, choices=Flavor.choices, default=Flavor.VLLM)
    # Kubernetes: the Deployment's replicas (the GPU-budget capacity service changes it), the pods' count
    # that pass readiness, and every pod the reconciler saw ({name, url, node, ready, draining, reason}).
    replicas = models.PositiveIntegerField(default=1)
    ready_replicas = models.PositiveIntegerField(default=0)
    pods = models.JSONField(default=list, blank=True)
    # Local on a GPU host: the GPUs its engine was given (CUDA_VISIBLE_DEVICES), e.g. "2,3".
    gpu_ids = models.CharField(max_length=200, blank=True)
    desired_state = models.CharField(max_length=16, choices=Desired.choices, default=Desired.RUNNING)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    state_reason = models.CharField(max_length=500, blank=True)
    state_changed_at = models.DateTimeField(null=True, blank=True)
    # Compare-and-set claim: the agent that owns the process, until when (renewed each pass).
    claimed_by = models.CharField(max_length=128, blank=True)
    claim_expires_at = models.DateTimeField(null=True, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    restarts = models.PositiveIntegerField(default=0)
    consecutive_failures = models.PositiveIntegerField(default=0)
    next_start_at = models.DateTimeField(null=True, blank=True, help_text="Backoff after a crash.")
    started_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    last_health_ok = models.BooleanField(null=True)
    last_health_at = models.DateTimeField(null=True, blank=True)
    last_health_detail = models.CharField(max_length=500, blank=True)
    log_tail = models.TextField(blank=True, help_text="The engine's last log lines.")
    metrics = models.JSONField(default=dict, blank=True, help_text="The last scrape of the engine's /metrics.")
    metrics_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    # An Idempotency-Key replays the creation it first made (config.idempotency).
    idempotency_key = models.CharField(max_length=255, blank=True, default="")
    idempotency_fingerprint = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ("id",)
        indexes = [models.Index(fields=("host_name", "desired_state")), models.Index(fields=("state",))]
        constraints = [
            models.UniqueConstraint(fields=("created_by", "idempotency_key"), condition=~Q(idempotency_key=""),
                                    name="engine_worker_idempotency_key_unique"),
        ]

    def __str__(self) -> str:
        return f"engine {self.pk} ({self.model_version.label}, {self.state})"


class Alias(models.Model):
    """A public model name and how its traffic is split. The gateway's route table is built from these."""

    name = models.SlugField(max_length=64, unique=True)
    baseline = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    candidate = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    candidate_weight = models.FloatField(default=0.0, help_text="Share of users sent to the candidate, 0 to 1.")
    shadow_rate = models.FloatField(default=0.0, help_text="Share of baseline requests mirrored to the candidate.")
    # The rollout driving the split, by id: serving depends on no other app.
    rollout_id = models.PositiveBigIntegerField(null=True, blank=True)
    # May a request fail over to the candidate when every baseline engine is down?
    failover_to_candidate = models.BooleanField(default=False)
    store_prompts = models.BooleanField(default=False, help_text="Keep redacted prompts and outputs.")
    ttfb_timeout_s = models.FloatField(
        null=True, blank=True,
        help_text="Seconds to wait for an engine's first event of the answer (streamed or not: the gateway "
                  "asks the engine for a stream either way) before trying another replica (blank: "
                  "GATEWAY_TTFB_TIMEOUT_S).",
    )
    # A GPU budget (replicas of the two versions together): the candidate gets the replicas its weight
    # needs and the baseline gives them up first; `candidate_weight` follows `target_weight` only once the
    # candidate's replicas for it are ready (serving.engines.capacity).
    gpu_budget = models.PositiveIntegerField(null=True, blank=True)
    target_weight = models.FloatField(default=0.0, help_text="The weight the rollout asked for.")
    # Model version id -> the replicas it should have under the budget; a version that left the alias
    # stays here at 0 until its last replica is gone (its GPUs are what the others grow into).
    capacity_targets = models.JSONField(default=dict, blank=True)
    weight_changed_at = models.DateTimeField(null=True, blank=True, help_text="When candidate_weight last changed.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("name",)
        verbose_name_plural = "aliases"

    def __str__(self) -> str:
        return self.name


class RouteGeneration(models.Model):
    """A single row bumped in the same transaction as any change a gateway must see (alias, engine readiness).

    Every gateway process polls it; a new generation makes it rebuild its in-memory route table."""

    generation = models.PositiveBigIntegerField(default=0)
    changed_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"route generation {self.generation}"


class GatewayKey(models.Model):
    """A key an application presents to the gateway. Only a SHA-256 of it is stored."""

    name = models.CharField(max_length=100)
    key_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=12)
    aliases = models.JSONField(default=list, blank=True, help_text="Aliases it may call; empty means all.")
    # Admission limits (blank: none). Shared by every gateway process through Redis when there is one.
    rpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute.")
    tpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Tokens (prompt + completion) per minute.")
    max_concurrency = models.PositiveIntegerField(null=True, blank=True, help_text="Requests in flight at once.")
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class RequestRecord(models.Model):
    """One request the gateway served, measured as DESIGN.md defines (times in milliseconds)."""

    class Outcome(models.TextChoices):
        OK = "ok"
        ENGINE_ERROR = "engine_error"  # >= 500 from the engine, connection failure, in-stream error, cut stream
        CLIENT_ERROR = "client_error"  # 4xx from the engine: not the engine's fault
        CANCELLED = "cancelled"  # the client went away first
        NO_ENGINE = "no_engine"  # 503: nothing healthy to send it to

    # One record per attempt: a request the gateway retried on another replica or arm has a record for each
    # try, numbered from 1, so a candidate's failures count against the candidate even when the baseline
    # answered the user in the end. (request_id, attempt) is unique; the day-partitioned table adds
    # created_at to it. Its index serves lookups by request_id.
    request_id = models.CharField(max_length=64)
    attempt = models.PositiveSmallIntegerField(default=1)
    # The attempt whose answer (a success or the last error) went to the client; exactly one per request.
    final = models.BooleanField(default=True)
    created_at = models.DateTimeField(db_index=True, help_text="When this attempt was sent upstream.")
    alias = models.CharField(max_length=64)
    rollout_id = models.PositiveBigIntegerField(null=True, blank=True)
    arm = models.CharField(max_length=16)  # baseline | candidate: the arm this attempt went to
    # The arm the request's session was assigned to (the sticky draw): the unit counts of sample-ratio
    # checks. It differs from `arm` only on a failover attempt.
    assigned_arm = models.CharField(max_length=16, blank=True)
    # No foreign-key constraint in the database: checking it cost the record writer about a fifth of
    # PostgreSQL's time per record. The gateway writes versions it read from the route table; deleting a
    # version still sets its records' field to NULL (Django does SET_NULL itself, constraint or not).
    model_version = models.ForeignKey(ModelVersion, null=True, on_delete=models.SET_NULL, related_name="+", db_constraint=False)
    engine_worker_id = models.PositiveBigIntegerField(null=True, blank=True)
    endpoint = models.CharField(max_length=32)  # chat.completions | completions
    stream = models.BooleanField(default=False)
    session_hash = models.CharField(max_length=32, blank=True)
    prompt_hash = models.CharField(max_length=32, blank=True)
    prompt_chars = models.PositiveIntegerField(default=0)
    status_code = models.PositiveSmallIntegerField()
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    error_kind = models.CharField(max_length=64, blank=True)
    failover = models.BooleanField(default=False, help_text="Sent to the other arm after the assigned one failed.")
    # A failed attempt: e2e_ms is the time it cost (sent to failure). The final attempt of a retried request
    # is timed from the first attempt's send, so the time lost on the failed ones is in its TTFT and E2E.
    ttft_ms = models.FloatField(null=True)
    tpot_ms = models.FloatField(null=True)
    e2e_ms = models.FloatField(null=True)
    prompt_tokens = models.PositiveIntegerField(null=True)
    completion_tokens = models.PositiveIntegerField(null=True)
    prompt_text = models.TextField(blank=True, help_text="Redacted; only when the alias opts in.")
    output_text = models.TextField(blank=True, help_text="Redacted; only when the alias opts in.")

    class Meta:
        indexes = [
            models.Index(fields=("rollout_id", "arm", "created_at")),
            models.Index(fields=("alias", "created_at")),
            models.Index(fields=("session_hash",)),
        ]
        constraints = [
            models.UniqueConstraint(fields=("request_id", "attempt"), name="request_record_attempt_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id}#{self.attempt} {self.alias}/{self.arm} {self.outcome}"


class ShadowPair(models.Model):
    """A baseline response and the candidate's answer to the same request, replayed off the user's path."""

    request_id = models.CharField(max_length=64, unique=True, help_text="The served request it mirrors.")
    created_at = models.DateTimeField(db_index=True)
    alias = models.CharField(max_length=64)
    rollout_id = models.PositiveBigIntegerField(null=True, blank=True)
    # The session the gateway hashed for the request's record (keyed, never the user's own id); blank when
    # the request had none. The shadow checks take sessions as their units, as the live checks do.
    session_hash = models.CharField(max_length=32, blank=True, default="")
    baseline_version = models.ForeignKey(ModelVersion, null=True, on_delete=models.SET_NULL, related_name="+")
    candidate_version = models.ForeignKey(ModelVersion, null=True, on_delete=models.SET_NULL, related_name="+")
    prompt_text = models.TextField(blank=True, help_text="Redacted.")
    baseline_output = models.TextField(blank=True, help_text="Redacted.")
    candidate_output = models.TextField(blank=True, help_text="Redacted.")
    baseline_ttft_ms = models.FloatField(null=True)
    baseline_e2e_ms = models.FloatField(null=True)
    baseline_completion_tokens = models.PositiveIntegerField(null=True)
    candidate_ttft_ms = models.FloatField(null=True)
    candidate_tpot_ms = models.FloatField(null=True)
    candidate_e2e_ms = models.FloatField(null=True)
    candidate_completion_tokens = models.PositiveIntegerField(null=True)
    candidate_outcome = models.CharField(max_length=16, choices=RequestRecord.Outcome.choices)
    candidate_error = models.CharField(max_length=300, blank=True)
    # False when the alias does not store prompts: the texts above are empty and there is nothing to score.
    texts_stored = models.BooleanField(default=True)
    # The baseline asked the same request by the mirror task, at the same moment and through the same code
    # as the candidate: the timings the two sides are compared on, pair by pair (the gateway's own timing
    # of the user's request above was taken elsewhere, earlier, under other load). Blank outcome: a pair
    # from before the baseline was replayed.
    baseline_replay_outcome = models.CharField(max_length=16, choices=RequestRecord.Outcome.choices, blank=True)
    baseline_replay_ttft_ms = models.FloatField(null=True, blank=True)
    baseline_replay_tpot_ms = models.FloatField(null=True, blank=True)
    baseline_replay_e2e_ms = models.FloatField(null=True, blank=True)
    # Filled by the evals app's shadow scoring, keyed by scorer name.
    scores = models.JSONField(default=dict, blank=True)

    class Meta:
        indexes = [models.Index(fields=("rollout_id", "created_at"))]

    def __str__(self) -> str:
        return f"shadow of {self.request_id}"
