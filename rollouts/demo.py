"""The demo `make run` seeds: engines for the demo models, three aliases, a gateway key, and three canaries,
one for each way a rollout ends.

- `adder` serves adder-v1; a canary to adder-v2 (10 % -> 50 % -> 100 %) that should promote by itself.
- `adder-slow-demo` serves adder-v1; a canary to adder-v2-slow (the same answers from a far bigger model)
  whose guardrails (TPOT, cost per request) should roll it back by itself.
- `adder-broken-demo` serves adder-v1; an eval-gated canary to adder-v2-broken (under-trained: about half
  the held-out sums right where adder-v1 gets nine in ten) that its eval gate should stop before any user
  is sent to it.

Engines become ready only after the engine agent has started them, so the canaries are created in draft
with `start_when_ready`: the analysis beat starts each once both of its versions have a ready engine.
adder-v1, adder-v2 and adder-v2-slow get a local engine here; adder-v2-broken gets none, and its canary,
created to start when ready, asks for one (rollouts.engines). `make run` lets the agent run three local
engines at once (ENGINE_MAX_LOCAL_ENGINES, each about 3 GB), so the broken one waits until an engine
stops: the slow canary's, ENGINE_IDLE_STOP_S after its rollback (60 s under `make run`). After its gate
fails, the broken candidate's engine is stopped the same way. adder-v1 keeps its engine: the other aliases
still serve it after adder-v2's promotion.

Everything here is idempotent: a restart of `make run` finds what it made before and makes nothing twice
(a demo canary that already ran is not run again; `--reset-demo` is not a thing).

`python manage.py demo_load` sends the traffic (rollouts/management/commands/demo_load.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from config.env import env_str, generated_secret
from config.errors import DomainError, NotFound
from rollouts.actors import SYSTEM
from rollouts.models import Rollout
from rollouts.services import rollout_create
from serving.models import EngineWorker, ModelVersion
from serving.selectors import engine_worker_list, model_version_get
from serving.services import alias_ensure, engine_worker_create, gateway_key_create

DEMO_VERSIONS = ("adder-v1", "adder-v2", "adder-v2-slow", "adder-v2-broken")
# The versions that get an engine at once; the others' rollouts ask for theirs (start when ready).
DEMO_ENGINES = ("adder-v1", "adder-v2", "adder-v2-slow")
DEMO_ALIASES = {"adder": "adder-v1", "adder-slow-demo": "adder-v1", "adder-broken-demo": "adder-v1"}
# demo_load's share of its requests per alias: the canary that promotes needs the most evidence; the slow one
# is caught within a hundred requests, and the eval-gated one is stopped before any user reaches its candidate.
DEMO_LOAD_SHARES = {"adder": 0.5, "adder-slow-demo": 0.3, "adder-broken-demo": 0.2}
DEMO_KEY_NAME = "demo"
DEMO_KEY_FILE = "demo_gateway_key"

# Both arms share two CPU cores here, so latencies are noisy: margins are generous where the candidate
# is meant to pass, and the slow model is several times slower, far beyond its 10 % margin.
DEMO_PLANS: dict[str, dict[str, Any]] = {
    "adder": {
        "name": "demo: adder-v1 -> adder-v2 canary",
        "description": "Seeded by `make run`. adder-v2 answers as fast as adder-v1: it should promote by itself, "
        "each step once its checks are shown safe, then bake for two minutes against a 5 % holdout.",
        "alias": "adder",
        "baseline": "adder-v1",
        "candidate": "adder-v2",
        "strategy": "canary",
        # Each step ends when every check is shown safe: with a 5-point error margin that takes about 200
        # candidate requests a step (a 2-point one would take 500, over half an hour at the demo's load at 10 %).
        "steps": [
            {"weight": "25%", "min_duration_s": 60},
            {"weight": "50%", "min_duration_s": 60},
            {"weight": "100%", "min_duration_s": 60},
        ],
        "slos": ["error_rate <= 0.05"],
        "guardrails": [
            {"metric": "error_rate", "margin": 0.05},
            {"metric": "tpot_gmean_ms", "margin": "50%"},
        ],
        "bake_s": 120,
    },
    "adder-slow-demo": {
        "name": "demo: adder-v1 -> adder-v2-slow canary",
        "description": "Seeded by `make run`. adder-v2-slow gives adder-v2's answers from a model about 80 times "
        "the size: six times the price per token and several times the TPOT. Its TPOT guardrail (the ratio of "
        "geometric means) rolls it back by itself in its first step, as soon as each arm has 30 sessions.",
        "alias": "adder-slow-demo",
        "baseline": "adder-v1",
        "candidate": "adder-v2-slow",
        "strategy": "canary",
        # Steps long enough for the guardrail to decide at demo_load's few requests per second (it needs
        # about a hundred candidate requests); a candidate that passed them would promote. Each step's
        # min_candidate_requests is left out: its floor (the error-rate guardrail's) fills it.
        "steps": [
            {"weight": "25%", "min_duration_s": 300},
            {"weight": "50%", "min_duration_s": 300},
            {"weight": "100%", "min_duration_s": 120},
        ],
        "guardrails": [
            {"metric": "tpot_gmean_ms", "margin": "10%"},
            {"metric": "error_rate", "margin": 0.02},
            {"metric": "cost_per_request", "margin": "5%"},
        ],
    },
    "adder-broken-demo": {
        "name": "demo: adder-v1 -> adder-v2-broken canary, eval-gated",
        "description": "Seeded by `make run`. adder-v2-broken is adder-v2's recipe stopped at a third of its training "
        "steps: it gets about 45 % of the 200 held-out sums right, adder-v1 about 90 %. Its eval gate (exact match, "
        "at most 5 points worse than the baseline) stops it before any user is sent to it. Its engine is asked for by "
        "this rollout and starts once another demo engine has stopped (three at a time); it is stopped again after "
        "the gate fails.",
        "alias": "adder-broken-demo",
        "baseline": "adder-v1",
        "candidate": "adder-v2-broken",
        "strategy": "canary",
        "eval_gate": {"suite": "adder-heldout", "scorer": "exact_match", "max_drop": 0.05},
        # What it would run if the gate passed.
        "steps": [
            {"weight": "10%", "min_duration_s": 300},
            {"weight": "100%", "min_duration_s": 300},
        ],
        "guardrails": [
            {"metric": "error_rate", "margin": 0.02},
            {"metric": "tpot_gmean_ms", "margin": "50%"},
        ],
    },
}


@dataclass
class DemoState:
    ready: bool
    gateway_key: str = ""
    key_generated: bool = False
    workers_created: list[str] = field(default_factory=list)
    rollouts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def demo_gateway_key() -> tuple[str, bool]:
    """PLATFORM_DEMO_GATEWAY_KEY, else one generated once into var/secrets/ (then True)."""
    chosen = env_str("PLATFORM_DEMO_GATEWAY_KEY", secret=True)
    if chosen:
        return chosen, False
    path = settings.VAR_DIR / "secrets" / DEMO_KEY_FILE
    existed = path.exists()
    return "gw_" + generated_secret(path, nbytes=24).removeprefix("gw_"), not existed


def _versions() -> dict[str, ModelVersion] | None:
    found = {}
    for label in DEMO_VERSIONS:
        try:
            found[label] = model_version_get(ref=label)
        except NotFound:
            return None
    return found


def demo_ensure(*, log: Callable[[str], None] = print) -> DemoState:
    """Seed the demo (idempotent). Needs the demo versions (`manage.py build_demo_models`)."""
    versions = _versions()
    if versions is None:
        state = DemoState(ready=False, notes=["the demo models are not registered: run `manage.py build_demo_models`"])
        log(state.notes[0])
        return state
    state = DemoState(ready=True)
    for label in DEMO_ENGINES:
        version = versions[label]
        # One local engine per demo version; an operator's stopped engine counts as there (not restarted).
        if not engine_worker_list(model_version=version).exists():
            engine_worker_create(model_version=version, driver=EngineWorker.Driver.LOCAL)
            state.workers_created.append(label)
    for alias, stable in DEMO_ALIASES.items():
        alias_ensure(name=alias, stable=versions[stable])
    key, generated = demo_gateway_key()
    gateway_key_create(name=DEMO_KEY_NAME, raw=key)
    state.gateway_key, state.key_generated = key, generated
    for alias, plan in DEMO_PLANS.items():
        earlier = Rollout.objects.filter(alias_name=alias, name=plan["name"]).order_by("-id").first()
        if earlier is not None:
            state.rollouts[alias] = earlier.pk
            continue
        try:
            created = rollout_create(plan=plan, actor=SYSTEM, start_when_ready=True)
        except DomainError as exc:  # a live rollout on the alias already (409), or no eval suite yet
            state.notes.append(f"{alias}: not seeding the demo canary ({exc.message})")
            continue
        state.rollouts[alias] = created.rollout.pk
    if state.workers_created:
        log(f"demo engines requested: {', '.join(state.workers_created)} (the engine agent starts them)")
    shown = "generated, kept in var/secrets/demo_gateway_key" if generated else "from PLATFORM_DEMO_GATEWAY_KEY or var/secrets"
    if env_str("PLATFORM_DEMO_GATEWAY_KEY", secret=True):
        log("demo gateway key: the one in PLATFORM_DEMO_GATEWAY_KEY")
    else:
        log(f"demo gateway key: {key} ({shown})")
    for alias, rollout_id in state.rollouts.items():
        rollout = Rollout.objects.get(pk=rollout_id)
        log(f"demo rollout {rollout_id} on {alias}: {rollout.state}"
            + (" (starts once its engines are ready)" if rollout.state == Rollout.State.DRAFT else ""))  # fmt: skip
    for note in state.notes:
        log(note)
    return state
