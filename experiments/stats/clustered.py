"""Request metrics over sessions: the ratio estimator with its cluster-robust (delta-method) variance,
and regression adjustment (CUPED) on it.

The gateway assigns arms by session, so sessions, not requests, are the independent units (DESIGN.md,
"Real traffic and production"). A request metric (mean TPOT, error rate, mean log TTFT, cost per request)
is then a ratio over sessions, R = sum_i a_i / sum_i b_i, where a_i is session i's sum of the metric over
its measured requests and b_i their count. With K sessions, by the delta method (Deng, Knoblich and Lu,
"Applying the delta method in metric analytics", KDD 2018, section 3, eq. 4), R is asymptotically normal
with

    Var(R) = var(L) / K,   L_i = (a_i - R b_i) / mean(b),

the variance of the sessions' linearised contributions; it is the cluster-robust variance of a mean over
requests. A request without a session is a session of one request, so on traffic with no sessions this is
the ordinary per-request variance (checked in the tests).

Regression adjustment (Deng, Xu, Kohavi and Walker, "Improving the sensitivity of online controlled
experiments by utilizing pre-experiment data", WSDM 2013) applies to the linearised contributions: with a
covariate that is itself a ratio over the same sessions, Rc = sum c_i / sum d_i (the length of the prompts,
which the user wrote before any arm answered), M_i = (c_i - Rc d_i) / mean(d), theta = the within-arm
covariance of L and M over the within-arm variance of M, pooled across both arms so that it is the same for
each and carries no treatment effect, and

    R_adj = R - theta (Rc_arm - Rc_pooled),   Var(R_adj) = (var(L) - 2 theta cov(L, M) + theta^2 var(M)) / K.

Everything is computed from sums over sessions of the per-session totals and their products, which the
database computes in one pass over per-session rows; the sums add, so windows and stored rollups merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

from .arm import _as_count, _as_float
from .estimators import ArmEstimate

_SUMS = (
    "num", "den", "num_sq", "den_sq", "num_den",
    "cov_num", "cov_den", "cov_num_sq", "cov_den_sq", "cov_num_den",
    "num_cov_num", "num_cov_den", "den_cov_num", "den_cov_den",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class RatioStats:
    """Sums over one arm's sessions of the per-session totals a (``num``), b (``den``) and, optionally, a
    covariate ratio's c (``cov_num``) and d (``cov_den``), with the products the variances need.

    ``units`` is the number of sessions; ``den`` is then the number of requests the metric measured.
    """

    units: int
    num: float = 0.0
    den: float = 0.0
    num_sq: float = 0.0
    den_sq: float = 0.0
    num_den: float = 0.0
    cov_num: float = 0.0
    cov_den: float = 0.0
    cov_num_sq: float = 0.0
    cov_den_sq: float = 0.0
    cov_num_den: float = 0.0
    num_cov_num: float = 0.0
    num_cov_den: float = 0.0
    den_cov_num: float = 0.0
    den_cov_den: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", _as_count("units", self.units))
        for name in _SUMS:
            object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        if self.units == 0 and any(getattr(self, name) for name in _SUMS):
            raise ValueError("units is 0 but the sums are not: an empty arm has all sums equal to 0")
        for name in ("den", "den_sq", "num_sq", "cov_den", "cov_den_sq", "cov_num_sq"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)!r}")

    @classmethod
    def empty(cls) -> RatioStats:
        return cls(0)

    @classmethod
    def from_units(
        cls,
        num: Sequence[float] | np.ndarray,
        den: Sequence[float] | np.ndarray,
        cov_num: Sequence[float] | np.ndarray | None = None,
        cov_den: Sequence[float] | np.ndarray | None = None,
    ) -> RatioStats:
        """Sums from per-session totals (what the database's per-session rows hold)."""
        a = np.asarray(num, dtype=float)
        b = np.asarray(den, dtype=float)
        if a.shape != b.shape or a.ndim != 1:
            raise ValueError(f"num and den must be one-dimensional and of one length, got {a.shape} and {b.shape}")
        out = {"num": a.sum(), "den": b.sum(), "num_sq": a @ a, "den_sq": b @ b, "num_den": a @ b}
        if cov_num is not None or cov_den is not None:
            if cov_num is None or cov_den is None:
                raise ValueError("give both cov_num and cov_den, or neither")
            c = np.asarray(cov_num, dtype=float)
            d = np.asarray(cov_den, dtype=float)
            if c.shape != a.shape or d.shape != a.shape:
                raise ValueError("cov_num and cov_den must have one entry per session, like num")
            out.update(
                cov_num=c.sum(), cov_den=d.sum(), cov_num_sq=c @ c, cov_den_sq=d @ d, cov_num_den=c @ d,
                num_cov_num=a @ c, num_cov_den=a @ d, den_cov_num=b @ c, den_cov_den=b @ d,
            )  # fmt: skip
        return cls(int(a.size), **{k: float(v) for k, v in out.items()})

    def merge(self, other: RatioStats) -> RatioStats:
        """The sums of two disjoint sets of sessions."""
        if not isinstance(other, RatioStats):
            raise TypeError(f"can only merge RatioStats, got {type(other).__name__}")
        return RatioStats(
            self.units + other.units, **{name: getattr(self, name) + getattr(other, name) for name in _SUMS}
        )

    def __add__(self, other: object) -> RatioStats:
        if not isinstance(other, RatioStats):
            return NotImplemented
        return self.merge(other)

    def scaled(self, factor: float) -> RatioStats:
        """The same sessions with every a_i multiplied by ``factor`` (a baseline scaled by 1 + margin)."""
        f = _as_float("factor", factor)
        return replace(
            self, num=f * self.num, num_sq=f * f * self.num_sq, num_den=f * self.num_den,
            num_cov_num=f * self.num_cov_num, num_cov_den=f * self.num_cov_den,
        )  # fmt: skip

    def replicated(self, factor: float) -> RatioStats:
        """As if every session had ``factor`` copies (fewer when below 1): the same spread, a larger sample.
        What "more data like this" would look like, for projecting how much more a check needs."""
        f = _as_float("factor", factor)
        if f <= 0:
            raise ValueError(f"factor must be positive, got {factor!r}")
        return RatioStats(max(round(self.units * f), 0), **{name: f * getattr(self, name) for name in _SUMS})

    @property
    def ratio(self) -> float:
        return self.num / self.den if self.den else math.nan

    @property
    def has_covariate(self) -> bool:
        return self.cov_den > 0

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _cov(k: int, sxy: float, sx: float, sy: float) -> float:
    return (sxy - sx * sy / k) / (k - 1)


@dataclass(frozen=True, slots=True)
class _Linearised:
    ratio: float
    var_l: float
    cov_ratio: float = math.nan
    var_m: float = 0.0
    cov_lm: float = 0.0


def _linearise(s: RatioStats, role: str) -> _Linearised:
    if s.units < 2:
        raise ValueError(f"{role}.units must be at least 2, got {s.units}")
    if s.den <= 0:
        raise ValueError(f"{role}.den must be positive for a ratio over sessions (it counts the requests)")
    k = s.units
    r = s.num / s.den
    mean_b = s.den / k
    var_a = _cov(k, s.num_sq, s.num, s.num)
    var_b = _cov(k, s.den_sq, s.den, s.den)
    cov_ab = _cov(k, s.num_den, s.num, s.den)
    var_l = max(var_a - 2.0 * r * cov_ab + r * r * var_b, 0.0) / (mean_b * mean_b)
    if not s.has_covariate:
        return _Linearised(r, var_l)
    rc = s.cov_num / s.cov_den
    mean_d = s.cov_den / k
    var_c = _cov(k, s.cov_num_sq, s.cov_num, s.cov_num)
    var_d = _cov(k, s.cov_den_sq, s.cov_den, s.cov_den)
    cov_cd = _cov(k, s.cov_num_den, s.cov_num, s.cov_den)
    var_m = max(var_c - 2.0 * rc * cov_cd + rc * rc * var_d, 0.0) / (mean_d * mean_d)
    cov_ac = _cov(k, s.num_cov_num, s.num, s.cov_num)
    cov_ad = _cov(k, s.num_cov_den, s.num, s.cov_den)
    cov_bc = _cov(k, s.den_cov_num, s.den, s.cov_num)
    cov_bd = _cov(k, s.den_cov_den, s.den, s.cov_den)
    cov_lm = (cov_ac - rc * cov_ad - r * cov_bc + r * rc * cov_bd) / (mean_b * mean_d)
    return _Linearised(r, var_l, rc, var_m, cov_lm)


def ratio_estimate(stats: RatioStats, *, role: str = "arm") -> ArmEstimate:
    """The ratio and its per-session linearised variance: ``variance / n`` is Var(R), n the sessions."""
    if not isinstance(stats, RatioStats):
        raise ValueError(f"{role} must be a RatioStats, got {type(stats).__name__}")
    lin = _linearise(stats, role)
    return ArmEstimate(lin.ratio, lin.var_l, stats.units)


@dataclass(frozen=True, slots=True)
class CupedRatio:
    """Both arms' regression-adjusted estimates, the pooled theta, and how much variance it removed.

    ``variance_reduction`` is 1 - Var(adjusted difference) / Var(unadjusted difference): 0.3 means the
    adjusted comparison needs 30 % fewer sessions for the same precision."""

    baseline: ArmEstimate
    candidate: ArmEstimate
    theta: float
    variance_reduction: float


def cuped_ratio_estimates(baseline: RatioStats, candidate: RatioStats) -> CupedRatio:
    """Regression-adjusted ratio estimates of both arms, theta pooled across arms (module docstring).

    Without a covariate in both arms, or with one that does not vary, theta is 0 and nothing changes."""
    for role, arm in (("baseline", baseline), ("candidate", candidate)):
        if not isinstance(arm, RatioStats):
            raise ValueError(f"{role} must be a RatioStats, got {type(arm).__name__}")
    lin_b, lin_c = _linearise(baseline, "baseline"), _linearise(candidate, "candidate")
    plain_b = ArmEstimate(lin_b.ratio, lin_b.var_l, baseline.units)
    plain_c = ArmEstimate(lin_c.ratio, lin_c.var_l, candidate.units)
    if not (baseline.has_covariate and candidate.has_covariate):
        return CupedRatio(plain_b, plain_c, 0.0, 0.0)
    kb, kc = baseline.units - 1, candidate.units - 1
    pooled_var_m = kb * lin_b.var_m + kc * lin_c.var_m
    if pooled_var_m <= 0:
        return CupedRatio(plain_b, plain_c, 0.0, 0.0)
    theta = (kb * lin_b.cov_lm + kc * lin_c.cov_lm) / pooled_var_m
    rc_pooled = (baseline.cov_num + candidate.cov_num) / (baseline.cov_den + candidate.cov_den)
    adjusted = []
    for arm, lin in ((baseline, lin_b), (candidate, lin_c)):
        variance = max(lin.var_l - 2.0 * theta * lin.cov_lm + theta * theta * lin.var_m, 0.0)
        adjusted.append(ArmEstimate(lin.ratio - theta * (lin.cov_ratio - rc_pooled), variance, arm.units))
    before = plain_b.standard_error_squared + plain_c.standard_error_squared
    after = adjusted[0].standard_error_squared + adjusted[1].standard_error_squared
    reduction = 1.0 - after / before if before > 0 else 0.0
    return CupedRatio(adjusted[0], adjusted[1], theta, reduction)
