"""How likely class counts are under equal classes: Pearson's chi-square test in plain Python (host floats only).

A validation set of 64 samples over 1,000 classes leaves about 938 classes empty by chance alone, and a split of
768 tokens over a 32,000-token vocabulary leaves almost all of them empty. Such counts say nothing about imbalance.
:func:`imbalance_p` gives the probability of counts at least this uneven (:func:`balanced_p`), or of a class at
least this rare (:func:`fewest_p`), when every class is equally likely, so ``class_imbalance`` fires only on counts
that chance does not explain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

_MAX_TERMS = 100_000  # series / continued-fraction terms: enough for any df up to millions (they need ~sqrt(df))
_EPS = 1e-15
_TINY = 1e-300


def _lower_series(a: float, x: float) -> float:
    """``P(a, x)`` by its power series (converges fast for ``x < a + 1``)."""
    term = total = 1.0 / a
    n = a
    for _ in range(_MAX_TERMS):
        n += 1.0
        term *= x / n
        total += term
        if abs(term) < abs(total) * _EPS:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _upper_fraction(a: float, x: float) -> float:
    """``Q(a, x)`` by its continued fraction, evaluated with the modified Lentz method (for ``x >= a + 1``)."""
    b = x + 1.0 - a
    c = 1.0 / _TINY
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_TERMS):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = _TINY if abs(d) < _TINY else d
        c = b + an / c
        c = _TINY if abs(c) < _TINY else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def chi2_sf(x: float, df: float) -> float:
    """``P(X >= x)`` for ``X`` chi-square with ``df`` degrees of freedom (the regularized upper gamma ``Q(df/2, x/2)``).

    Example:
        >>> round(chi2_sf(3.841, 1), 4), round(chi2_sf(18.307, 10), 4), chi2_sf(0.0, 5)
        (0.05, 0.05, 1.0)
    """
    if x <= 0.0:
        return 1.0
    a, h = df / 2.0, x / 2.0
    if h < a + 1.0:
        return max(0.0, 1.0 - _lower_series(a, h))
    return min(1.0, _upper_fraction(a, h))


def binomial_cdf(k: int, n: int, q: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, q)``, summed down from ``k`` in log space (exact; fast below the mean).

    Example:
        >>> math.isclose(binomial_cdf(0, 64, 0.001), 0.999**64), round(binomial_cdf(5, 10, 0.5), 4)
        (True, 0.623)
    """
    if k < 0:
        return 0.0
    if k >= n or q <= 0.0:
        return 1.0
    if q >= 1.0:
        return 0.0
    log_q, log_r, head = math.log(q), math.log1p(-q), math.lgamma(n + 1)
    total = 0.0
    for j in range(k, -1, -1):
        term = math.exp(head - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_q + (n - j) * log_r)
        total += term
        if j < n * q and term < total * _EPS:  # below the mean each term is a shrinking share of the sum
            break
    return min(1.0, total)


def fewest_p(counts: Sequence[float]) -> float:
    """The chance that, of ``C`` equally likely classes, one gets as few samples as the smallest class here.

    ``1 - (1 - F(min))^C`` with ``F`` the binomial distribution of one class's count (the classes taken as
    independent: slightly conservative). It finds one rare class among many equal ones, which the chi-square test
    of :func:`balanced_p` dilutes over ``C - 1`` degrees of freedom.

    Example:
        >>> fewest_p([100] * 999 + [10]) < 1e-20, fewest_p([0] * 936 + [1] * 64) == 1.0
        (True, True)
    """
    k = len(counts)
    total = round(sum(counts))
    if k < 2 or total <= 0:
        return 1.0
    f = binomial_cdf(round(min(counts)), total, 1.0 / k)
    return 1.0 if f >= 1.0 else -math.expm1(k * math.log1p(-f))


def balanced_p(counts: Sequence[float]) -> float:
    """The chance that classes of equal probability give counts at least this uneven (Pearson's chi-square test).

    ``X^2 = sum (n_c - n / C)^2 / (n / C)`` against a chi-square with ``C - 1`` degrees of freedom. Its mean and
    variance under equal classes are exact at any sample size (``C - 1`` and ``2 (C - 1)(1 - 1/n)``), so the test
    stays sound when most classes are empty; the tail is the usual approximation. 1.0 without samples.

    Example:
        >>> counts = [1] * 64 + [0] * 936  # 64 samples over 1,000 classes, each in its own class
        >>> balanced_p(counts) > 0.5  # what equal classes give: most classes empty
        True
        >>> balanced_p([950, 50]) < 1e-9, balanced_p([52, 48]) > 0.5
        (True, True)
    """
    k = len(counts)
    total = float(sum(counts))
    if k < 2 or total <= 0:
        return 1.0
    expected = total / k
    stat = sum((c - expected) ** 2 for c in counts) / expected
    return chi2_sf(stat, k - 1)


def imbalance_p(counts: Sequence[float]) -> float:
    """The smaller of :func:`balanced_p` (uneven counts overall) and :func:`fewest_p` (one class too rare).

    Example:
        >>> imbalance_p([100] * 999 + [10]) < 1e-20, imbalance_p([1] * 64 + [0] * 936) > 0.5
        (True, True)
    """
    return min(balanced_p(counts), fewest_p(counts))


__all__ = ["balanced_p", "binomial_cdf", "chi2_sf", "fewest_p", "imbalance_p"]
