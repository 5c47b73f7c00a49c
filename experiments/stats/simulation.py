"""Simulated traffic as real clients send it, for checking decision rules (tests and benchmarks).

A simulated rollout has a population of users. Each is assigned to the candidate with probability
``weight`` and stays there (the gateway's sticky sessions). Users differ: how many requests they send
(lognormal, so a few users send most of the traffic), how slow their requests are (a per-user factor:
long prompts, a heavy tenant), how often their requests fail (a per-user rate drawn around the arm's).
Requests are slow with a lognormal spread, and a small share of them hit a heavy Pareto tail (a busy CPU,
a cold cache). Each look adds every user's requests for one interval and yields, per arm and per
simulated rollout, the sums over sessions that the database would compute (`clustered.RatioStats`),
so a rule can be run on exactly what it sees in production. Vectorised over rollouts with numpy.

The parts are there for whole-rollout simulations too (`benchmarks/decision_policy.py`), where the arm of a
user is the gateway's sticky choice at the current step's weight rather than fixed: `draw_users` draws a
population (each user with a baseline and a candidate error and thumbs-up rate), `draw_interval` one
interval's requests given each user's arm, and `request_details` what else a request record holds (TTFT,
tokens, the time within the interval).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from .clustered import RatioStats, product_field

ARMS = ("baseline", "candidate")


@dataclass(frozen=True)
class Traffic:
    """How the users of one simulated rollout behave (defaults: a busy chat alias on shared CPUs)."""

    users: int = 2000
    # Requests per user: lognormal with this median and log-spread (heavy-tailed), sent evenly while the user
    # is active: a span of this share of the rollout, starting anywhere from half a span before the first
    # look to the last (so users keep arriving and leaving, as they do).
    requests_median: float = 10.0
    requests_sigma: float = 1.0
    active_share: float = 0.5
    # TPOT in ms: a median, a per-request log-spread, a per-user log-spread, and a heavy tail.
    tpot_median_ms: float = 30.0
    tpot_sigma: float = 0.4
    user_sigma: float = 0.3
    tail_share: float = 0.02
    tail_alpha: float = 1.5  # Pareto shape of the tail's extra slowness (infinite variance below 2)
    # Prompt length in characters (lognormal per request), and how much of TPOT it explains (log-log slope).
    chars_median: float = 400.0
    chars_sigma: float = 0.8
    chars_slope: float = 0.15
    # Errors: a rate per request, spread over users with a Beta of this concentration (smaller: more uneven).
    error_rate: float = 0.005
    error_concentration: float = 400.0
    # An outcome per successful request (a thumbs-up), with a rate that differs by user like errors do.
    thumbs_rate: float = 0.7
    thumbs_concentration: float = 5.0
    # For request records only (`request_details`): TTFT in ms (a median, a per-request log-spread, the log-log
    # slope on prompt length; a tail request is slow here too), completion tokens (lognormal) and characters
    # per prompt token. The candidate's effect is on TPOT, so TTFT and tokens are the same on both arms.
    ttft_median_ms: float = 150.0
    ttft_sigma: float = 0.35
    ttft_chars_slope: float = 0.3
    tokens_median: float = 120.0
    tokens_sigma: float = 0.6
    chars_per_token: float = 4.0
    # Requests before the rollout (`draw_history`): off by default. ``returning_share`` of the users also
    # sent an earlier visit of their usual size within the pre-period.
    history: bool = False
    returning_share: float = 0.6

    def with_(self, **changes: float | int) -> Traffic:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Effect:
    """What the candidate changes: TPOT multiplied, error and thumbs-up rates shifted (in points of share)."""

    tpot_factor: float = 1.0
    error_add: float = 0.0
    thumbs_add: float = 0.0


@dataclass
class ArmLook:
    """One arm's sums over its users so far, one entry per simulated rollout (arrays of length sims).

    ``metric`` maps a name (``tpot_log``, ``tpot``, ``errors``) to the 14 sums of `RatioStats` (as arrays);
    ``requests`` and ``units`` count what arrived so far."""

    units: np.ndarray
    requests: np.ndarray
    metric: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def ratio(self, name: str, sim: int) -> RatioStats:
        sums = self.metric[name]
        return RatioStats(int(self.units[sim]), **{k: float(v[sim]) for k, v in sums.items()})


@dataclass
class Requests:
    """The interval's requests, for rules that look at them one by one: which rollout, which arm, the
    log TPOT (NaN on an error), the error and the thumbs-up (NaN on an error)."""

    sim: np.ndarray
    candidate: np.ndarray
    log_tpot: np.ndarray
    error: np.ndarray
    thumbs: np.ndarray


@dataclass
class SimLook:
    look: int
    arms: dict[str, ArmLook]
    requests: Requests | None = None


def _sums(num: np.ndarray, den: np.ndarray, cov_num: np.ndarray | None, cov_den: np.ndarray | None,
          pre_num: np.ndarray | None = None, pre_den: np.ndarray | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Per rollout (rows), the RatioStats sums over users (columns); users with no request contribute 0."""
    columns = {"num": num, "den": den}
    if cov_num is not None and cov_den is not None:
        columns.update(cov_num=cov_num, cov_den=cov_den)
    if pre_num is not None and pre_den is not None:
        columns.update(pre_num=pre_num, pre_den=pre_den)
    out = {name: values.sum(1) for name, values in columns.items()}
    names = list(columns)
    for i, x in enumerate(names):
        for y in names[i:]:
            out[product_field(x, y)] = (columns[x] * columns[y]).sum(1)
    return out


def _user_rates(
    rng: np.random.Generator, mean: float, concentration: float, shift: float, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Per user, a rate around ``mean`` (a Beta of that concentration) on the baseline, and the same user's
    rate on the candidate: moved by ``shift`` points on average, keeping each user's rank (one who errs more
    on the baseline errs more there too)."""
    base = rng.beta(mean * concentration, (1.0 - mean) * concentration, size=shape)
    target = min(max(mean + shift, 1e-9), 1.0 - 1e-9)
    moved = np.clip(base * (target / mean), 0.0, 1.0) if mean > 0 else np.full(shape, target)
    return base, moved


@dataclass
class Users:
    """A population of users for ``sims`` rollouts: arrays of shape (sims, users). A user sends ``total``
    requests evenly over ``span`` intervals from ``start`` (in intervals; negative: already active at the
    first), is slower than the median by ``user_log`` (log scale) on either arm, and fails (or gives a
    thumbs-up) at one rate on the baseline and another on the candidate."""

    total: np.ndarray
    start: np.ndarray
    span: float
    user_log: np.ndarray
    error_rate: np.ndarray
    error_rate_candidate: np.ndarray
    thumbs_rate: np.ndarray
    thumbs_rate_candidate: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.total.shape)


def draw_users(
    rng: np.random.Generator, traffic: Traffic, effect: Effect, *, sims: int, looks: int, span: float | None = None,
    lead: float | None = None,
) -> Users:  # fmt: skip
    """The users of ``sims`` rollouts of ``looks`` intervals: each active for ``span`` intervals (default the
    traffic's active share of the rollout), starting anywhere from ``lead`` intervals before the first
    (default half a span) to the last, so users keep arriving and leaving."""
    shape = (sims, traffic.users)
    total = traffic.requests_median * np.exp(traffic.requests_sigma * rng.standard_normal(shape))
    span = max(traffic.active_share * looks, 1.0) if span is None else max(float(span), 1.0)
    start = rng.uniform(-(span / 2.0 if lead is None else lead), looks, size=shape)
    user_log = traffic.user_sigma * rng.standard_normal(shape)
    rate, rate_candidate = _user_rates(rng, traffic.error_rate, traffic.error_concentration, effect.error_add, shape)
    thumbs, thumbs_candidate = _user_rates(rng, traffic.thumbs_rate, traffic.thumbs_concentration, effect.thumbs_add, shape)
    return Users(total, start, span, user_log, rate, rate_candidate, thumbs, thumbs_candidate)


@dataclass
class History:
    """Per user (the users' shape), what it sent before the rollout started, on the baseline: successes, the
    sum of their log TPOT and the sum of their TPOT."""

    n: np.ndarray
    log: np.ndarray
    x: np.ndarray


def draw_history(rng: np.random.Generator, traffic: Traffic, users: Users) -> History:
    """Each user's requests before the rollout: the part of its visit before the first interval (a user
    whose span starts before 0), and for ``returning_share`` of the users an earlier visit of its usual size,
    each request's TPOT drawn as on the baseline with the same per-user slowness (the prompt-length term and
    the per-request spread as one normal) and the same heavy tail. Drawn from its own ``rng`` so that the
    rollout's own draws do not depend on it."""
    shape = users.shape
    ongoing = users.total / users.span * np.clip(-users.start, 0.0, users.span)
    earlier = np.where(rng.random(shape) < traffic.returning_share, users.total, 0.0)
    n = rng.poisson(ongoing + earlier).astype(float)
    n = n - rng.binomial(n.astype(np.int64), traffic.error_rate)  # the failures have no TPOT
    owner = np.repeat(np.arange(n.size), n.astype(np.int64).ravel())
    spread = math.sqrt(traffic.tpot_sigma**2 + (traffic.chars_slope * traffic.chars_sigma) ** 2)
    log = math.log(traffic.tpot_median_ms) + users.user_log.ravel()[owner] + spread * rng.standard_normal(owner.size)
    tail = rng.random(owner.size) < traffic.tail_share
    log = log + np.where(tail, np.log1p(rng.pareto(traffic.tail_alpha, owner.size)), 0.0)
    per_user = {name: np.bincount(owner, weights=values, minlength=n.size).reshape(shape)
                for name, values in (("log", log), ("x", np.exp(log)))}  # fmt: skip
    return History(n, per_user["log"], per_user["x"])


@dataclass
class Interval:
    """One interval's requests, in the order drawn (grouped by user): each one's user (a flat index over
    sims x users), arm, log prompt length, log TPOT (set on errors too), whether it hit the heavy tail,
    whether it failed (1.0) and its thumbs-up (0.0 on an error)."""

    owner: np.ndarray
    candidate: np.ndarray
    chars_log: np.ndarray
    log_tpot: np.ndarray
    tail: np.ndarray
    errors: np.ndarray
    thumbs: np.ndarray

    @property
    def count(self) -> int:
        return int(self.owner.size)


def draw_interval(
    rng: np.random.Generator, traffic: Traffic, effect: Effect, users: Users, look: int, candidate: np.ndarray
) -> Interval:
    """The requests of interval [look - 1, look): each user's share of it, at its rate; ``candidate`` (the
    users' shape, bool) says which arm each user is on during the interval."""
    span, start = users.span, users.start
    # The part of [look - 1, look) the user is active in, times the user's rate.
    overlap = np.clip(np.minimum(look, start + span) - np.maximum(look - 1, start), 0.0, 1.0)
    n = rng.poisson(users.total / span * overlap)
    count = int(n.sum())
    owner = np.repeat(np.arange(users.total.size), n.ravel())
    on_candidate = candidate.ravel()[owner]
    log_median = math.log(traffic.tpot_median_ms)
    chars_log_median = math.log(traffic.chars_median)
    chars_log = chars_log_median + traffic.chars_sigma * rng.standard_normal(count)
    log_tpot = (
        log_median + users.user_log.ravel()[owner] + np.where(on_candidate, math.log(effect.tpot_factor), 0.0)
        + traffic.chars_slope * (chars_log - chars_log_median) + traffic.tpot_sigma * rng.standard_normal(count)
    )  # fmt: skip
    tail = rng.random(count) < traffic.tail_share
    # A tail request is slower by a Pareto factor (>= 1): rare, unbounded, the same in both arms.
    log_tpot = log_tpot + np.where(tail, np.log1p(rng.pareto(traffic.tail_alpha, count)), 0.0)
    rate = np.where(on_candidate, users.error_rate_candidate.ravel()[owner], users.error_rate.ravel()[owner])
    errors = (rng.random(count) < rate).astype(float)
    thumbs_rate = np.where(on_candidate, users.thumbs_rate_candidate.ravel()[owner], users.thumbs_rate.ravel()[owner])
    thumbs = (rng.random(count) < thumbs_rate).astype(float) * (1.0 - errors)
    return Interval(owner, on_candidate, chars_log, log_tpot, tail, errors, thumbs)


@dataclass
class Details:
    """What else a request record holds, per request of an `Interval`: seconds into the interval, TTFT (ms),
    prompt and completion tokens."""

    offset_s: np.ndarray
    ttft_ms: np.ndarray
    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray


def request_details(rng: np.random.Generator, traffic: Traffic, batch: Interval, *, seconds: float) -> Details:
    """TTFT grows with the prompt (log-log slope) and with the user's slowness, and a tail request is slow
    here too; tokens are lognormal (at least 2, so each success has a TPOT). Drawn from ``rng`` after the
    interval, so `simulate`'s own stream does not depend on it."""
    count = batch.count
    chars_log_median = math.log(traffic.chars_median)
    ttft_log = (
        math.log(traffic.ttft_median_ms) + traffic.ttft_chars_slope * (batch.chars_log - chars_log_median)
        + traffic.ttft_sigma * rng.standard_normal(count)
    )  # fmt: skip
    ttft_log = ttft_log + np.where(batch.tail, np.log1p(rng.pareto(traffic.tail_alpha, count)), 0.0)
    tokens = np.maximum(2, np.rint(traffic.tokens_median * np.exp(traffic.tokens_sigma * rng.standard_normal(count))))
    prompt = np.maximum(1, np.rint(np.exp(batch.chars_log) / traffic.chars_per_token))
    return Details(
        offset_s=np.sort(rng.uniform(0.0, seconds, count)), ttft_ms=np.exp(ttft_log),
        prompt_tokens=prompt.astype(np.int64), completion_tokens=tokens.astype(np.int64),
    )  # fmt: skip


# Per user, what the sums of a look are made of: successes, their log TPOT, TPOT, errors, prompt characters
# of successes, thumbs-up, requests. With a `History`, `simulate` adds those before the rollout: pre_n,
# pre_log and pre_x (successes, their log TPOT and TPOT).
TOTALS = ("n", "log", "x", "err", "chars", "thumbs", "requests")


def interval_totals(batch: Interval, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per user (arrays of ``shape``), the `TOTALS` of one interval's requests."""
    ok = 1.0 - batch.errors
    size = int(np.prod(shape))
    out = {}
    for name, values in (
        ("n", ok), ("log", batch.log_tpot * ok), ("x", np.exp(batch.log_tpot) * ok), ("err", batch.errors),
        ("chars", np.exp(batch.chars_log) * ok), ("thumbs", batch.thumbs), ("requests", np.ones(batch.count)),
    ):  # fmt: skip
        out[name] = np.bincount(batch.owner, weights=values, minlength=size).reshape(shape)
    return out


# Each metric's (numerator, denominator) and covariate (numerator, denominator) totals.
METRIC_TOTALS: dict[str, tuple[str, str, tuple[str, str] | None]] = {
    "tpot_log": ("log", "n", ("chars", "n")),
    "tpot": ("x", "n", ("chars", "n")),
    "errors": ("err", "requests", None),
    "thumbs": ("thumbs", "n", None),
}
# The metrics with a pre-rollout covariate, when the totals carry one.
METRIC_PRE: dict[str, tuple[str, str]] = {"tpot_log": ("pre_log", "pre_n"), "tpot": ("pre_x", "pre_n")}


def arm_look(totals: dict[str, np.ndarray], mask: np.ndarray, metrics: tuple[str, ...] = tuple(METRIC_TOTALS)) -> ArmLook:
    """One arm's sums over the users in ``mask`` that sent anything, per rollout, from per-user `TOTALS` (those
    the ``metrics`` need, and ``requests``)."""
    seen = mask & (totals["requests"] > 0)
    pick = {k: np.where(seen, v, 0.0) for k, v in totals.items()}
    sums = {}
    for name in metrics:
        num, den, covariate = METRIC_TOTALS[name]
        cov = (pick[covariate[0]], pick[covariate[1]]) if covariate else (None, None)
        pre = METRIC_PRE.get(name)
        before = (pick[pre[0]], pick[pre[1]]) if pre and pre[0] in pick else (None, None)
        sums[name] = _sums(pick[num], pick[den], *cov, *before)
    return ArmLook(units=seen.sum(1), requests=pick["requests"].sum(1), metric=sums)


def simulate(
    traffic: Traffic, effect: Effect, *, sims: int, looks: int, weight: float, seed: int, requests: bool = False
) -> Iterator[SimLook]:
    """Yield the cumulative per-arm sums after each of ``looks`` intervals, for ``sims`` rollouts at once
    (and, with ``requests``, the interval's requests themselves)."""
    if not 0.0 < weight < 1.0:
        raise ValueError(f"weight must be in (0, 1), got {weight!r}")
    rng = np.random.default_rng(seed)
    shape = (sims, traffic.users)
    candidate = rng.random(shape) < weight
    users = draw_users(rng, traffic, effect, sims=sims, looks=looks)
    totals = {name: np.zeros(shape) for name in TOTALS}
    if traffic.history:
        history = draw_history(np.random.default_rng([seed, 1]), traffic, users)
        totals.update(pre_n=history.n, pre_log=history.log, pre_x=history.x)
    for look in range(1, looks + 1):
        batch = draw_interval(rng, traffic, effect, users, look, candidate)
        for name, values in interval_totals(batch, shape).items():
            totals[name] += values
        arms = {"baseline": arm_look(totals, ~candidate), "candidate": arm_look(totals, candidate)}
        owner, log_tpot, errors, thumbs = batch.owner, batch.log_tpot, batch.errors, batch.thumbs
        seen_requests = None
        if requests:
            failed = errors > 0
            seen_requests = Requests(
                sim=owner // traffic.users, candidate=candidate.ravel()[owner],
                log_tpot=np.where(failed, np.nan, log_tpot), error=errors, thumbs=np.where(failed, np.nan, thumbs),
            )  # fmt: skip
        yield SimLook(look, arms, seen_requests)
