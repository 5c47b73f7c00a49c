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

With several covariates (the prompt's length, and the session's own requests before the rollout started,
``pre``: c2_i the sum of the same metric over them, d2_i their count) theta is the vector that regresses L on
the covariates' linearised contributions M_1, M_2, pooled the same way (theta = S_MM^-1 s_ML over the
within-arm covariances summed across arms), and

    R_adj = R - theta . (Rc_arm - Rc_pooled),   Var(R_adj) = (var(L) - 2 theta . cov(L, M) + theta' S_MM theta) / K.

A session with no requests before the rollout has c2_i = d2_i = 0, so its M_2 is 0, the covariate's mean
over all sessions (sum_i M_2,i = 0 by construction): mean imputation on the linearised scale, with no
missing-value indicator. Both are valid, since whether a session has a history is settled before the
rollout; the imputation only makes the adjustment weaker for sessions without one (Deng et al. 2013,
section 3.4).

Everything is computed from sums over sessions of the per-session totals and their products, which the
database computes in one pass over per-session rows; the sums add, so windows and stored rollups merge.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

from .arm import _as_count, _as_float
from .estimators import ArmEstimate

# The per-session totals: the metric's (num, den), then each covariate's: the prompt's length (cov_) and the
# same metric over the session's requests before the rollout (pre_).
_COLUMNS = ("num", "den", "cov_num", "cov_den", "pre_num", "pre_den")
COVARIATES = ("cov", "pre")


def product_field(x: str, y: str) -> str:
    """The field holding sum_i x_i y_i (``num_den``, ``cov_num_sq``, ``num_pre_den``, ...)."""
    i, j = sorted((_COLUMNS.index(x), _COLUMNS.index(y)))
    x, y = _COLUMNS[i], _COLUMNS[j]
    if x == y:
        return f"{x}_sq"
    if x.rsplit("_", 1)[0] == y.rsplit("_", 1)[0] and x.endswith("_num") and y.endswith("_den"):
        return f"{x}_den"  # one ratio's own numerator and denominator: cov_num_den, pre_num_den
    return f"{x}_{y}"


_PRODUCTS = tuple(
    product_field(_COLUMNS[i], _COLUMNS[j]) for i in range(len(_COLUMNS)) for j in range(i, len(_COLUMNS))
)
_SUMS = (*_COLUMNS, *_PRODUCTS)


@dataclass(frozen=True, slots=True)
class RatioStats:
    """Sums over one arm's sessions of the per-session totals a (``num``), b (``den``) and, optionally, the
    covariates' ratios: the prompt's length, c (``cov_num``) over d (``cov_den``), and the same metric over
    the session's requests before the rollout, ``pre_num`` over ``pre_den``, with the products the
    variances need (``_SUMS``).

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
    pre_num: float = 0.0
    pre_den: float = 0.0
    pre_num_sq: float = 0.0
    pre_den_sq: float = 0.0
    pre_num_den: float = 0.0
    num_pre_num: float = 0.0
    num_pre_den: float = 0.0
    den_pre_num: float = 0.0
    den_pre_den: float = 0.0
    cov_num_pre_num: float = 0.0
    cov_num_pre_den: float = 0.0
    cov_den_pre_num: float = 0.0
    cov_den_pre_den: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", _as_count("units", self.units))
        for name in _SUMS:
            object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        if self.units == 0 and any(getattr(self, name) for name in _SUMS):
            raise ValueError("units is 0 but the sums are not: an empty arm has all sums equal to 0")
        for name in ("den", "den_sq", "num_sq", "cov_den", "cov_den_sq", "cov_num_sq", "pre_den", "pre_den_sq", "pre_num_sq"):
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
        *,
        pre_num: Sequence[float] | np.ndarray | None = None,
        pre_den: Sequence[float] | np.ndarray | None = None,
    ) -> RatioStats:
        """Sums from per-session totals (what the database's per-session rows hold)."""
        a = np.asarray(num, dtype=float)
        b = np.asarray(den, dtype=float)
        if a.shape != b.shape or a.ndim != 1:
            raise ValueError(f"num and den must be one-dimensional and of one length, got {a.shape} and {b.shape}")
        columns = {"num": a, "den": b}
        for prefix, c, d in (("cov", cov_num, cov_den), ("pre", pre_num, pre_den)):
            if c is None and d is None:
                continue
            if c is None or d is None:
                raise ValueError(f"give both {prefix}_num and {prefix}_den, or neither")
            columns[f"{prefix}_num"] = np.asarray(c, dtype=float)
            columns[f"{prefix}_den"] = np.asarray(d, dtype=float)
            if columns[f"{prefix}_num"].shape != a.shape or columns[f"{prefix}_den"].shape != a.shape:
                raise ValueError(f"{prefix}_num and {prefix}_den must have one entry per session, like num")
        out = {name: float(values.sum()) for name, values in columns.items()}
        for x, y in itertools.combinations_with_replacement(columns, 2):
            out[product_field(x, y)] = float(columns[x] @ columns[y])
        return cls(int(a.size), **out)

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
        changes = {"num": f * self.num, "num_sq": f * f * self.num_sq}
        for other in _COLUMNS[1:]:
            name = product_field("num", other)
            changes[name] = f * getattr(self, name)
        return replace(self, **changes)  # type: ignore[arg-type]

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
        """Whether any covariate was measured (the prompt's length or a history before the rollout)."""
        return bool(self.covariates)

    @property
    def covariates(self) -> tuple[str, ...]:
        """The covariates these sums carry, by prefix (``cov``: the prompt's length; ``pre``: the metric
        before the rollout): those with a positive denominator."""
        return tuple(p for p in COVARIATES if getattr(self, f"{p}_den") > 0)

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _cov(k: int, sxy: float, sx: float, sy: float) -> float:
    return (sxy - sx * sy / k) / (k - 1)


@dataclass(frozen=True, slots=True)
class _Linearised:
    """One arm's linearised contributions: the ratio, var(L); per covariate its ratio, and the covariances
    of L with each M_j (``cov_lm``) and of the M_j among themselves (``var_m``), in ``covariates`` order."""

    ratio: float
    var_l: float
    covariates: tuple[str, ...] = ()
    cov_ratio: tuple[float, ...] = ()
    cov_lm: tuple[float, ...] = ()
    var_m: tuple[tuple[float, ...], ...] = ()


def _linearise(s: RatioStats, role: str, covariates: Sequence[str] = ()) -> _Linearised:
    """The covariances of the sessions' linearised contributions (x_i - R_x y_i) / mean(y) of the metric
    (x, y) = (num, den) and of each covariate (x, y) = (<p>_num, <p>_den), from the sums alone."""
    if s.units < 2:
        raise ValueError(f"{role}.units must be at least 2, got {s.units}")
    if s.den <= 0:
        raise ValueError(f"{role}.den must be positive for a ratio over sessions (it counts the requests)")
    k = s.units
    ratios = [("num", "den")] + [(f"{p}_num", f"{p}_den") for p in covariates]
    levels = [getattr(s, x) / getattr(s, y) for x, y in ratios]
    mean_y = [getattr(s, y) / k for _, y in ratios]

    def cov(x: str, y: str) -> float:
        return _cov(k, getattr(s, product_field(x, y)), getattr(s, x), getattr(s, y))

    def lin_cov(i: int, j: int) -> float:
        (xi, yi), (xj, yj) = ratios[i], ratios[j]
        ri, rj = levels[i], levels[j]
        value = cov(xi, xj) - rj * cov(xi, yj) - ri * cov(yi, xj) + ri * rj * cov(yi, yj)
        return value / (mean_y[i] * mean_y[j])

    var_l = max(lin_cov(0, 0), 0.0)
    if not covariates:
        return _Linearised(levels[0], var_l)
    n = len(covariates)
    var_m = tuple(tuple(lin_cov(1 + i, 1 + j) for j in range(n)) for i in range(n))
    return _Linearised(
        levels[0], var_l, tuple(covariates), tuple(levels[1:]), tuple(lin_cov(0, 1 + i) for i in range(n)), var_m
    )


def ratio_estimate(stats: RatioStats, *, role: str = "arm") -> ArmEstimate:
    """The ratio and its per-session linearised variance: ``variance / n`` is Var(R), n the sessions."""
    if not isinstance(stats, RatioStats):
        raise ValueError(f"{role} must be a RatioStats, got {type(stats).__name__}")
    lin = _linearise(stats, role)
    return ArmEstimate(lin.ratio, lin.var_l, stats.units)


@dataclass(frozen=True, slots=True)
class CupedRatio:
    """Both arms' regression-adjusted estimates, the pooled theta, and how much variance it removed.

    ``covariates`` names those adjusted on (``cov``: the prompt's length; ``pre``: the session's requests
    before the rollout) and ``thetas`` their coefficients; ``theta`` is the first's (0 with none).
    ``variance_reduction`` is 1 - Var(adjusted difference) / Var(unadjusted difference): 0.3 means the
    adjusted comparison needs 30 % fewer sessions for the same precision."""

    baseline: ArmEstimate
    candidate: ArmEstimate
    theta: float
    variance_reduction: float
    covariates: tuple[str, ...] = ()
    thetas: tuple[float, ...] = ()


def cuped_ratio_estimates(
    baseline: RatioStats, candidate: RatioStats, *, covariates: Sequence[str] | None = None
) -> CupedRatio:
    """Regression-adjusted ratio estimates of both arms, theta pooled across arms (module docstring), on the
    covariates both arms carry (of ``covariates`` when given).

    Without a covariate in both arms, or with ones that do not vary, theta is 0 and nothing changes."""
    for role, arm in (("baseline", baseline), ("candidate", candidate)):
        if not isinstance(arm, RatioStats):
            raise ValueError(f"{role} must be a RatioStats, got {type(arm).__name__}")
    wanted = COVARIATES if covariates is None else tuple(covariates)
    shared = [p for p in COVARIATES if p in wanted and p in baseline.covariates and p in candidate.covariates]
    lin_b, lin_c = _linearise(baseline, "baseline", shared), _linearise(candidate, "candidate", shared)
    plain_b = ArmEstimate(lin_b.ratio, lin_b.var_l, baseline.units)
    plain_c = ArmEstimate(lin_c.ratio, lin_c.var_l, candidate.units)
    kb, kc = baseline.units - 1, candidate.units - 1
    # Covariates that vary within the arms; pooled (k - 1)-weighted covariances, as one regression would.
    pooled_mm = kb * np.array(lin_b.var_m, dtype=float).reshape(len(shared), len(shared)) + kc * np.array(
        lin_c.var_m, dtype=float
    ).reshape(len(shared), len(shared))
    pooled_ml = kb * np.array(lin_b.cov_lm, dtype=float) + kc * np.array(lin_c.cov_lm, dtype=float)
    keep = [i for i in range(len(shared)) if pooled_mm[i, i] > 0]
    if not keep:
        return CupedRatio(plain_b, plain_c, 0.0, 0.0)
    mm, ml = pooled_mm[np.ix_(keep, keep)], pooled_ml[keep]
    # lstsq: two covariates that carry the same information (a constant ratio) leave mm singular.
    theta = np.linalg.lstsq(mm, ml, rcond=None)[0]
    adjusted = []
    for arm_stats, lin in ((baseline, lin_b), (candidate, lin_c)):
        m = np.array(lin.var_m, dtype=float).reshape(len(shared), len(shared))[np.ix_(keep, keep)]
        lm = np.array(lin.cov_lm, dtype=float)[keep]
        variance = max(lin.var_l - 2.0 * float(theta @ lm) + float(theta @ m @ theta), 0.0)
        shift = 0.0
        for t, i in zip(theta, keep, strict=True):
            p = shared[i]
            pooled = (getattr(baseline, f"{p}_num") + getattr(candidate, f"{p}_num")) / (
                getattr(baseline, f"{p}_den") + getattr(candidate, f"{p}_den")
            )
            shift += float(t) * (lin.cov_ratio[i] - pooled)
        adjusted.append(ArmEstimate(lin.ratio - shift, variance, arm_stats.units))
    before = plain_b.standard_error_squared + plain_c.standard_error_squared
    after = adjusted[0].standard_error_squared + adjusted[1].standard_error_squared
    reduction = 1.0 - after / before if before > 0 else 0.0
    names = tuple(shared[i] for i in keep)
    thetas = tuple(float(t) for t in theta)
    return CupedRatio(adjusted[0], adjusted[1], thetas[0], reduction, names, thetas)
