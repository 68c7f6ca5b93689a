"""Seed statistics of a confirmation: mean and spread over seeds, and a paired comparison of two configurations.

Why a paired t interval: every configuration of a confirmation is trained with the same seeds, so the
per-seed difference of two configurations cancels what a seed does alike to both (head
initialisation, and data order where the batch sizes agree), and its mean over N seeds has a
Student t distribution with N - 1 degrees of freedom when the differences are roughly normal. With
the few seeds a confirmation affords (N = 3 by default), a bootstrap interval has only
C(2N - 1, N) = 10 distinct resamples and is far too narrow, and Welch's t would ignore the pairing.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (N - 1 in the denominator); None where undefined."""
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def t_quantile(p: float, dof: int) -> float:
    """The p quantile of Student's t distribution with `dof` degrees of freedom (scipy)."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


@dataclass(frozen=True)
class PairedComparison:
    """Mean of the per-seed differences a - b and its two-sided t confidence interval."""

    n: int  # seeds both configurations completed
    difference: float
    low: float
    high: float
    confidence: float = 0.95

    @property
    def dof(self) -> int:
        return self.n - 1

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_t(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedComparison | None:
    """Paired t interval of mean(a - b) over seeds (a[i] and b[i] share seed i); None under 2 pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    if len(a) < 2:
        return None
    mean, sd = mean_sd([x - y for x, y in zip(a, b)])
    half = t_quantile(0.5 + confidence / 2, len(a) - 1) * sd / math.sqrt(len(a))
    return PairedComparison(len(a), mean, mean - half, mean + half, confidence)


def verdict(a: str, b: str, comparison: PairedComparison | None, maximize: bool = True) -> str:
    """One plain sentence: is `a` better than `b` (a - b > 0 when maximizing), or can they not be told apart."""
    if comparison is None:
        return f"{a} and {b} cannot be compared: they share fewer than 2 completed seeds."
    c = comparison
    detail = (f"difference {c.difference:+.4f}, {round(100 * c.confidence)}% CI [{c.low:+.4f}, {c.high:+.4f}], "
              f"paired t over {c.n} seeds")
    if c.excludes_zero():
        better, worse = (a, b) if (c.low > 0) == maximize else (b, a)
        return f"{better} is better than {worse} ({detail})."
    return f"{a} and {b} cannot be told apart with {c.n} seeds ({detail})."
