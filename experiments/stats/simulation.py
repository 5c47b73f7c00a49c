"""Simulated traffic as real clients send it, for checking decision rules (tests and benchmarks).

A simulated rollout has a population of users. Each is assigned to the candidate with probability
``weight`` and stays there (the gateway's sticky sessions). Users differ: how many requests they send
(lognormal, so a few users send most of the traffic), how slow their requests are (a per-user factor:
long prompts, a heavy tenant), how often their requests fail (a per-user rate drawn around the arm's).
Requests are slow with a lognormal spread, and a small share of them hit a heavy Pareto tail (a busy CPU,
a cold cache). Each look adds every user's requests for one interval and yields, per arm and per
simulated rollout, the sums over sessions that the database would compute (`clustered.RatioStats`),
so a rule can be run on exactly what it sees in production. Vectorised over rollouts with numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from .clustered import RatioStats

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


def _sums(num: np.ndarray, den: np.ndarray, cov_num: np.ndarray | None, cov_den: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per rollout (rows), the RatioStats sums over users (columns); users with no request contribute 0."""
    out = {
        "num": num.sum(1), "den": den.sum(1), "num_sq": (num * num).sum(1), "den_sq": (den * den).sum(1),
        "num_den": (num * den).sum(1),
    }  # fmt: skip
    if cov_num is not None and cov_den is not None:
        out.update(
            cov_num=cov_num.sum(1), cov_den=cov_den.sum(1), cov_num_sq=(cov_num * cov_num).sum(1),
            cov_den_sq=(cov_den * cov_den).sum(1), cov_num_den=(cov_num * cov_den).sum(1),
            num_cov_num=(num * cov_num).sum(1), num_cov_den=(num * cov_den).sum(1),
            den_cov_num=(den * cov_num).sum(1), den_cov_den=(den * cov_den).sum(1),
        )  # fmt: skip
    return out


def _user_rates(rng: np.random.Generator, mean: float, concentration: float, shift: float, candidate: np.ndarray) -> np.ndarray:
    """Per user, a rate around ``mean`` (a Beta of that concentration); the candidate's users' rates moved by
    ``shift`` points on average, keeping each user's rank (one who errs more on the baseline errs more here)."""
    base = rng.beta(mean * concentration, (1.0 - mean) * concentration, size=candidate.shape)
    target = min(max(mean + shift, 1e-9), 1.0 - 1e-9)
    moved = np.clip(base * (target / mean), 0.0, 1.0) if mean > 0 else np.full(candidate.shape, target)
    return np.where(candidate, moved, base)


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
    # Requests per user (lognormal), spread over the user's active looks; the user's slowness and rates.
    total = traffic.requests_median * np.exp(traffic.requests_sigma * rng.standard_normal(shape))
    span = max(traffic.active_share * looks, 1.0)
    start = rng.uniform(-span / 2.0, looks, size=shape)
    user_log = traffic.user_sigma * rng.standard_normal(shape)
    rate = _user_rates(rng, traffic.error_rate, traffic.error_concentration, effect.error_add, candidate)
    thumbs_rate = _user_rates(rng, traffic.thumbs_rate, traffic.thumbs_concentration, effect.thumbs_add, candidate)
    log_factor = np.where(candidate, math.log(effect.tpot_factor), 0.0)
    totals = {name: np.zeros(shape) for name in ("n", "log", "x", "err", "chars", "thumbs", "requests")}
    flat_users = sims * traffic.users
    log_median = math.log(traffic.tpot_median_ms)
    chars_log_median = math.log(traffic.chars_median)
    for look in range(1, looks + 1):
        # The part of [look - 1, look) the user is active in, times the user's rate.
        overlap = np.clip(np.minimum(look, start + span) - np.maximum(look - 1, start), 0.0, 1.0)
        n = rng.poisson(total / span * overlap)
        count = int(n.sum())
        owner = np.repeat(np.arange(flat_users), n.ravel())
        chars_log = chars_log_median + traffic.chars_sigma * rng.standard_normal(count)
        log_tpot = (
            log_median + user_log.ravel()[owner] + log_factor.ravel()[owner]
            + traffic.chars_slope * (chars_log - chars_log_median) + traffic.tpot_sigma * rng.standard_normal(count)
        )  # fmt: skip
        tail = rng.random(count) < traffic.tail_share
        # A tail request is slower by a Pareto factor (>= 1): rare, unbounded, the same in both arms.
        log_tpot = log_tpot + np.where(tail, np.log1p(rng.pareto(traffic.tail_alpha, count)), 0.0)
        errors = (rng.random(count) < rate.ravel()[owner]).astype(float)
        ok = 1.0 - errors
        thumbs = (rng.random(count) < thumbs_rate.ravel()[owner]).astype(float) * ok
        for name, values in (
            ("n", ok), ("log", log_tpot * ok), ("x", np.exp(log_tpot) * ok), ("err", errors),
            ("chars", np.exp(chars_log) * ok), ("thumbs", thumbs), ("requests", np.ones(count)),
        ):  # fmt: skip
            totals[name] += np.bincount(owner, weights=values, minlength=flat_users).reshape(shape)
        arms = {}
        for arm, mask in (("baseline", ~candidate), ("candidate", candidate)):
            seen = mask & (totals["requests"] > 0)
            pick = {k: np.where(seen, v, 0.0) for k, v in totals.items()}
            arms[arm] = ArmLook(
                units=seen.sum(1), requests=pick["requests"].sum(1),
                metric={
                    "tpot_log": _sums(pick["log"], pick["n"], pick["chars"], pick["n"]),
                    "tpot": _sums(pick["x"], pick["n"], pick["chars"], pick["n"]),
                    "errors": _sums(pick["err"], pick["requests"], None, None),
                    "thumbs": _sums(pick["thumbs"], pick["n"], None, None),
                },
            )  # fmt: skip
        batch = None
        if requests:
            failed = errors > 0
            batch = Requests(
                sim=owner // traffic.users, candidate=candidate.ravel()[owner],
                log_tpot=np.where(failed, np.nan, log_tpot), error=errors, thumbs=np.where(failed, np.nan, thumbs),
            )  # fmt: skip
        yield SimLook(look, arms, batch)
