"""The few statistics a comparison over seeds needs, without SciPy: Student's t distribution
(its CDF through the regularized incomplete beta function, its quantiles by bisection), the 95%
interval of a mean, and Welch's t-test of two means with unequal variances."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

EPS = 1e-15


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method: its
    terms are d(2m+1) = -(a+m)(a+b+m)x / ((a+2m)(a+2m+1)) and d(2m) = m(b-m)x / ((a+2m-1)(a+2m))."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < EPS:
            break
    return result


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # where the fraction converges fast; else by symmetry
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (any real df > 0; inf: normal)."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if math.isinf(df):
        return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))
    tail = 0.5 * two_sided_p(t, df)  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|), computed as the tail itself (not 1 - CDF), so that small p keep their digits."""
    if math.isinf(t):
        return 0.0
    if math.isinf(df):
        return math.erfc(abs(t) / math.sqrt(2.0))
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The t such that P(T <= t) = p: t_quantile(0.975, 2) = 4.303, the factor of a 95% interval
    from 3 values."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p}: a probability strictly between 0 and 1")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):  # bisection: t_cdf is increasing
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def sample_std(values: Sequence[float]) -> Optional[float]:
    """The standard deviation with n - 1 in the denominator; None for fewer than 2 values."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def ci_half_width(values: Sequence[float], level: float = 0.95) -> Optional[float]:
    """Half the width of the ``level`` confidence interval of the mean: t(1 - (1 - level)/2, n - 1)
    times the standard error s / sqrt(n). None for fewer than 2 values."""
    std = sample_std(values)
    if std is None:
        return None
    return t_quantile(1.0 - (1.0 - level) / 2.0, len(values) - 1) * std / math.sqrt(len(values))


@dataclass(frozen=True)
class Welch:
    t: float
    df: float  # Welch-Satterthwaite degrees of freedom
    p: float  # two-sided


def welch(a: Sequence[float], b: Sequence[float]) -> Optional[Welch]:
    """Welch's t-test of mean(a) = mean(b), variances not assumed equal; None unless each sample
    has at least 2 values. With no spread in either sample, p is 0 for different means, else 1."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = sample_std(a) ** 2 / len(a), sample_std(b) ** 2 / len(b)  # type: ignore[operator]
    diff = mean(a) - mean(b)
    if va + vb == 0.0:
        same = abs(diff) <= EPS * max(1.0, abs(mean(a)))
        return Welch(0.0 if same else math.copysign(math.inf, diff), math.inf, 1.0 if same else 0.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return Welch(t, df, two_sided_p(t, df))
