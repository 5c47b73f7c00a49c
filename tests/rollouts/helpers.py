"""Shared set-up for rollout, experiment and CLI tests: versions with (fake) ready engines, plans, and
synthetic request records written the way the gateway writes them."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone

from rollouts.analysis import rollout_analyse
from rollouts.models import Rollout, RolloutAnalysis
from serving.models import EngineWorker, ModelVersion, RequestRecord
from serving.services import engine_worker_create, model_version_register


def version(label: str, *, ready: bool = True, price_in: float = 0.0, price_out: float = 0.0) -> ModelVersion:
    """A registered version; `ready` gives it one engine in the READY state (no process behind it)."""
    name, ver = label.rsplit("-", 1)
    found = ModelVersion.objects.filter(name=name, version=ver).first()
    if found is None:
        found = model_version_register(
            name=name, version=ver, artifact=f"/nonexistent/{label}", served_model_name=label,
            price_input_per_million=price_in, price_output_per_million=price_out,
        )  # fmt: skip
    if ready:
        engine_ready(found)
    return found


def engine_ready(model_version: ModelVersion) -> EngineWorker:
    worker = EngineWorker.objects.filter(model_version=model_version).first()
    if worker is None:
        worker = engine_worker_create(model_version=model_version, driver="static", base_url="http://127.0.0.1:9")
    EngineWorker.objects.filter(pk=worker.pk).update(state=EngineWorker.State.READY, desired_state="running")
    return worker


def engines_down(model_version: ModelVersion) -> None:
    EngineWorker.objects.filter(model_version=model_version).update(state=EngineWorker.State.CRASHED)


def canary_plan(**overrides: Any) -> dict[str, Any]:
    """Two steps whose minimums are their floors (60 s, and the fewest candidate requests at which the
    guardrails can be shown safe: 922 and 1,175 here, for the error-rate guardrail)."""
    plan: dict[str, Any] = {
        "alias": "adder",
        "baseline": "adder-v1",
        "candidate": "adder-v2",
        "strategy": "canary",
        "steps": [{"weight": 0.1}, {"weight": 0.5}],
        "guardrails": [
            {"metric": "tpot_mean_ms", "margin": "10%"},
            {"metric": "error_rate", "margin": 0.01},
        ],
    }
    plan.update(overrides)
    return plan


def records(
    rollout: Rollout | int | None,
    *,
    arm: str,
    n: int,
    alias: str = "adder",
    model_version: ModelVersion | None = None,
    at: datetime | None = None,
    ttft: tuple[float, float] = (100.0, 10.0),
    tpot: tuple[float, float] | Callable[[random.Random], float] = (20.0, 2.0),
    error_rate: float = 0.0,
    prompt_tokens: int = 12,
    completion_tokens: int = 4,
    seed: int | None = None,
    spread_s: float = 0.0,
    sessions: int | Sequence[str] | None = None,
    prompt_chars: int | Callable[[random.Random], int] = 5,
) -> list[RequestRecord]:
    """`n` request records as the gateway writes them: normal latencies (mean, sd), errors at `error_rate`.

    `sessions`: each request's session drawn from a pool of that many (or from those hashes; "" is no
    session); by default every request has a session of its own."""
    rng = random.Random(seed)
    # Sessions are sticky to an arm: a pool is the arm's own (both arms drawn with one seed must not share).
    pool = [f"{arm}-{seed}-{i:06d}" for i in range(sessions)] if isinstance(sessions, int) else sessions
    start = at or timezone.now()
    rollout_id = rollout if isinstance(rollout, int) or rollout is None else rollout.pk
    rows = []
    for i in range(n):
        failed = rng.random() < error_rate
        ttft_ms = max(1.0, rng.gauss(*ttft))
        tpot_ms = max(0.1, tpot(rng) if callable(tpot) else rng.gauss(*tpot))
        rows.append(
            RequestRecord(
                request_id=os.urandom(12).hex(),
                created_at=start + timedelta(seconds=spread_s * i / max(n, 1)),
                alias=alias,
                rollout_id=rollout_id,
                arm=arm,
                model_version=model_version,
                endpoint="chat.completions",
                stream=True,
                session_hash=rng.choice(pool) if pool else f"{arm[0]}{rng.getrandbits(60):015x}",
                prompt_chars=prompt_chars(rng) if callable(prompt_chars) else prompt_chars,
                status_code=502 if failed else 200,
                outcome="engine_error" if failed else "ok",
                ttft_ms=None if failed else ttft_ms,
                tpot_ms=None if failed else tpot_ms,
                e2e_ms=None if failed else ttft_ms + tpot_ms * (completion_tokens - 1),
                prompt_tokens=None if failed else prompt_tokens,
                completion_tokens=None if failed else completion_tokens,
            )
        )
    return RequestRecord.objects.bulk_create(rows)


def both_arms(rollout: Rollout, *, total: int, weight: float, **kwargs: Any) -> None:
    """A split of `total` requests at the configured weight (what a correct gateway produces)."""
    candidate_n = round(total * weight)
    candidate_kwargs = {k[len("candidate_"):]: v for k, v in kwargs.items() if k.startswith("candidate_")}
    common = {k: v for k, v in kwargs.items() if not k.startswith("candidate_")}
    records(rollout, arm="baseline", n=total - candidate_n, model_version=rollout.baseline, **common)
    records(rollout, arm="candidate", n=candidate_n, model_version=rollout.candidate, **{**common, **candidate_kwargs})


def step_back(rollout: Rollout, seconds: float) -> None:
    """Pretend the current step started `seconds` ago (tests do not sleep)."""
    Rollout.objects.filter(pk=rollout.pk).update(step_started_at=timezone.now() - timedelta(seconds=seconds))


def quick_plan(**overrides: Any) -> dict[str, Any]:
    """A canary whose one guardrail (TPOT, geometric means, 10 %) decides on a few dozen sessions per arm:
    for tests about what happens once a step is shown safe, not about how much data that takes."""
    return canary_plan(**{"guardrails": [{"metric": "tpot_gmean_ms", "margin": "10%"}], **overrides})


def kinds(rollout: Rollout) -> list[str]:
    return list(rollout.events.order_by("seq").values_list("kind", flat=True))


def ids(items: Iterable[Any]) -> list[int]:
    return [int(item.pk) for item in items]


def shadow_pairs(
    rollout: Rollout,
    *,
    n: int,
    at: datetime | None = None,
    ttft: tuple[float, float] = (100.0, 10.0),
    tpot: tuple[float, float] = (20.0, 2.0),
    error_rate: float = 0.0,
    seed: int | None = None,
    baseline_ttft: tuple[float, float] = (100.0, 10.0),
    baseline_tpot: tuple[float, float] = (20.0, 2.0),
    sessions: list[str] | None = None,
) -> None:
    """`n` shadow pairs as serving's shadow mirroring stores them: the candidate's answer, and the baseline
    asked the same request beside it (its replay timings, `baseline_ttft` / `baseline_tpot`). `sessions`:
    the session hashes the pairs take in turn (none: each pair without a session, its own unit)."""
    from serving.models import ShadowPair

    rng = random.Random(seed)
    start = at or timezone.now()
    rows = []
    for i in range(n):
        failed = rng.random() < error_rate
        ttft_ms, tpot_ms = max(1.0, rng.gauss(*ttft)), max(0.1, rng.gauss(*tpot))
        base_ttft, base_tpot = max(1.0, rng.gauss(*baseline_ttft)), max(0.1, rng.gauss(*baseline_tpot))
        pair = ShadowPair(
            request_id=os.urandom(12).hex(), created_at=start, alias=rollout.alias_name, rollout_id=rollout.pk,
            session_hash=sessions[i % len(sessions)] if sessions else "", baseline_version=rollout.baseline, candidate_version=rollout.candidate,
            baseline_ttft_ms=100.0, baseline_e2e_ms=160.0, baseline_completion_tokens=4,
            candidate_ttft_ms=None if failed else ttft_ms, candidate_tpot_ms=None if failed else tpot_ms,
            candidate_e2e_ms=None if failed else ttft_ms + 3 * tpot_ms,
            candidate_completion_tokens=None if failed else 4,
            candidate_outcome="engine_error" if failed else "ok",
            baseline_replay_outcome="ok", baseline_replay_ttft_ms=base_ttft, baseline_replay_tpot_ms=base_tpot,
            baseline_replay_e2e_ms=base_ttft + 3 * base_tpot,
        )  # fmt: skip
        rows.append(pair)
    ShadowPair.objects.bulk_create(rows)


def sticky_traffic(
    rollout: Rollout,
    *,
    users: int,
    weight: float,
    seed: int,
    tpot_factor: float = 1.0,
    error_rate: float = 0.0,
    candidate_error_rate: float | None = None,
    requests_median: float = 4.0,
    at: datetime | None = None,
) -> dict[str, int]:
    """Traffic as real clients send it, written as the gateway writes it: `users` sessions, each sticky to
    one arm (the candidate with probability `weight`), sending a lognormal number of requests (a few users
    send most of them); TPOT lognormal per request around a per-user factor (long prompts, a heavy tenant),
    with a rare heavy tail; errors at a per-user rate around the arm's. The candidate's TPOT is
    `tpot_factor` times the baseline's. Returns the requests written per arm."""
    rng = random.Random(seed)
    start = at or timezone.now()
    rollout_id = rollout.pk
    rows, written = [], {"baseline": 0, "candidate": 0}
    for user in range(users):
        arm = "candidate" if rng.random() < weight else "baseline"
        session = f"s{seed}-{user:06d}"
        user_factor = rng.lognormvariate(0.0, 0.3)
        rate = candidate_error_rate if arm == "candidate" and candidate_error_rate is not None else error_rate
        user_rate = min(1.0, rate * rng.betavariate(20, 20) * 2.0) if rate else 0.0
        count = max(1, round(requests_median * rng.lognormvariate(0.0, 1.0)))
        version = rollout.candidate if arm == "candidate" else rollout.baseline
        for _ in range(count):
            failed = rng.random() < user_rate
            tpot = 30.0 * user_factor * rng.lognormvariate(0.0, 0.4) * (tpot_factor if arm == "candidate" else 1.0)
            if rng.random() < 0.01:
                tpot *= 1.0 + rng.paretovariate(1.5)
            ttft = max(1.0, rng.gauss(100.0, 10.0))
            rows.append(RequestRecord(
                request_id=os.urandom(12).hex(), created_at=start, alias=rollout.alias_name, rollout_id=rollout_id,
                arm=arm, model_version=version, endpoint="chat.completions", stream=True, session_hash=session,
                prompt_chars=rng.randint(20, 400), status_code=502 if failed else 200,
                outcome="engine_error" if failed else "ok", ttft_ms=None if failed else ttft,
                tpot_ms=None if failed else tpot, e2e_ms=None if failed else ttft + tpot * 3,
                prompt_tokens=None if failed else 12, completion_tokens=None if failed else 4,
            ))  # fmt: skip
            written[arm] += 1
    RequestRecord.objects.bulk_create(rows, batch_size=2000)
    return written


def fresh(rollout: Rollout) -> Rollout:
    """The rollout as the database has it now, with its versions."""
    return Rollout.objects.select_related("baseline", "candidate").get(pk=rollout.pk)


def look(rollout: Rollout) -> RolloutAnalysis:
    """One analysis of the rollout, as the beat task runs it."""
    analysis = rollout_analyse(rollout_id=rollout.pk)
    assert analysis is not None
    return analysis
