"""Significance of paired comparisons: the exact McNemar test and the Benjamini-Hochberg false
discovery rate over many of them (SPEC section 2). Pure functions of counts and p-values."""

from __future__ import annotations

import math
from typing import Sequence


EXACT_INTEGER_LIMIT = 10_000  # up to this many discordant samples the tail is summed in whole numbers


def mcnemar_p_value(gain: int, loss: int) -> float:
    """Exact two-sided McNemar p-value of a paired comparison with ``gain`` and ``loss`` discordant pairs.

    Under no effect each discordant sample is a gain or a loss with probability 1/2, so the
    smaller count ``k`` of ``n = gain + loss`` is binomial(n, 1/2); p = 2·P(X ≤ k), capped at 1
    (p = 1 when both counts are 0, and whenever they are equal). Up to
    ``EXACT_INTEGER_LIMIT`` discordant samples the tail is a sum of whole binomial coefficients
    (the float is the correctly rounded exact p); above, it is summed in log space from a
    saddle-point form of its largest term, relative error about 1e-12 for n in the millions and
    no underflow on the way (a p below about 1e-308 comes out as 0.0).
    """
    for name, count in (("gain", gain), ("loss", loss)):
        if isinstance(count, bool) or int(count) != count or count < 0:
            raise ValueError(f"{name} must be a count (a whole number, at least 0); got {count!r}")
    gain, loss = int(gain), int(loss)
    n, k = gain + loss, min(gain, loss)
    if 2 * k + 1 >= n:  # equal counts, or one apart with n odd: the tail holds at least half the mass
        return 1.0
    if n <= EXACT_INTEGER_LIMIT:
        coefficient = tail = 1
        for j in range(k):
            coefficient = coefficient * (n - j) // (j + 1)
            tail += coefficient
        return min(1.0, (2 * tail) / (1 << n))  # int / int is correctly rounded
    return min(1.0, math.exp(math.log(2.0) + _log_binomial_half_cdf(n, k)))


def _log_binomial_half_cdf(n: int, k: int) -> float:
    """ln P(X ≤ k) for X ~ binomial(n, 1/2) and k < n/2."""
    # Terms relative to the top one, P(X = j - 1) / P(X = j) = j / (n - j + 1) < 1: they fall
    # geometrically, so the sum stops once a term no longer changes it.
    total, term = 1.0, 1.0
    for j in range(k, 0, -1):
        term *= j / (n - j + 1)
        total += term
        if term < total * 1e-17:
            break
    return _log_binomial_half_pmf(n, k) + math.log(total)


def _log_binomial_half_pmf(n: int, k: int) -> float:
    """ln P(X = k) for X ~ binomial(n, 1/2), without the cancellation of ln C(n, k) − n ln 2 for large n.

    Saddle-point form: ln C(n,k)/2^n = δ(n) − δ(k) − δ(n−k) − d(k) − d(n−k) + ½ ln(n / (2π k (n−k))),
    with δ Stirling's error and d(x) = x ln(2x/n) + n/2 − x.
    """
    if k == 0:
        return -n * math.log(2.0)
    half = n / 2.0
    return (
        _stirling_error(n) - _stirling_error(k) - _stirling_error(n - k)
        - _deviance(k, half) - _deviance(n - k, half)
        + 0.5 * math.log(n / (2.0 * math.pi * k * (n - k)))
    )


def _stirling_error(m: int) -> float:
    """δ(m) = ln m! − (m + ½) ln m + m − ½ ln 2π."""
    if m < 16:
        return math.lgamma(m + 1) - (m + 0.5) * math.log(m) + m - 0.5 * math.log(2.0 * math.pi)
    inverse, square = 1.0 / m, 1.0 / (m * m)
    return inverse * (1 / 12 - square * (1 / 360 - square * (1 / 1260 - square * (1 / 1680 - square / 1188))))


def _deviance(x: float, mean: float) -> float:
    """x ln(x / mean) + mean − x, accurate also when x is close to mean."""
    if abs(x - mean) < 0.1 * (x + mean):
        # With v = (x − mean)/(x + mean): (x − mean)·v + 2x·Σ_{j≥1} v^(2j+1)/(2j+1).
        v = (x - mean) / (x + mean)
        total, power = (x - mean) * v, 2.0 * x * v
        for j in range(1, 1000):
            power *= v * v
            updated = total + power / (2 * j + 1)
            if updated == total:
                break
            total = updated
        return total
    return x * math.log(x / mean) + mean - x


def benjamini_hochberg_adjusted(p_values: Sequence[float | None]) -> list[float | None]:
    """Benjamini–Hochberg adjusted p-values (q-values), in the order given.

    A test is significant at false-discovery rate ``q`` when its adjusted p is at most ``q``.
    ``None`` or NaN entries (no test) stay ``None`` and do not count among the tests.
    """
    present = [(p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    for p, _ in present:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-values lie in [0, 1]; got {p}")
    adjusted: list[float | None] = [None] * len(p_values)
    m = len(present)
    running = 1.0
    # From the largest p down: q_(i) = min over j ≥ i of p_(j)·m/j, never above 1.
    for rank, (p, i) in zip(range(m, 0, -1), sorted(present, reverse=True)):
        running = min(running, p * m / rank)
        adjusted[i] = running
    return adjusted


def benjamini_hochberg(p_values: Sequence[float | None], fdr: float = 0.05) -> list[bool]:
    """Which tests are discoveries at false-discovery rate ``fdr`` (Benjamini–Hochberg step-up); ``None`` is never one."""
    if not 0.0 < fdr < 1.0:
        raise ValueError(f"the false-discovery rate must lie strictly between 0 and 1; got {fdr}")
    return [q is not None and q <= fdr for q in benjamini_hochberg_adjusted(p_values)]


def expected_false_positives(tests: int, alpha: float = 0.05) -> float:
    """How many of ``tests`` comparisons with no real effect come out at p < ``alpha`` on average: ``alpha · tests``."""
    return alpha * tests


def significance_summary(p_values: Sequence[float | None], alpha: float = 0.05, fdr: float = 0.05) -> dict[str, float | int]:
    """For a table footer: tests, how many have p < ``alpha``, how many that would be by chance alone, and the BH discoveries."""
    present = [p for p in p_values if p is not None and not math.isnan(p)]
    return {
        "tests": len(present),
        "below_alpha": sum(1 for p in present if p < alpha),
        "expected_by_chance": expected_false_positives(len(present), alpha),
        "discoveries": sum(benjamini_hochberg(p_values, fdr)),
        "alpha": alpha,
        "fdr": fdr,
    }
