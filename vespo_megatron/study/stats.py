"""Statistics that can decide: paired differences by seed, their confidence intervals, and the design's power.

Two variants of one study share each seed's warm start, prompt stream and evaluation prompts, so their
accuracies are compared seed by seed: the per-seed difference ``d_s = a_s - b_s`` removes what the seeds share.
For the ``n`` differences this module gives the mean, a percentile bootstrap interval (resampling seeds), the
paired t interval, and the **minimum detectable difference** at the usual two-sided ``alpha = 0.05`` and 80 %
power, ``(t_{1-alpha/2, n-1} + t_{power, n-1}) * sd(d) / sqrt(n)``: a true difference smaller than that is
missed more often than not, so "no difference" is only a statement above it. Pure functions, no SciPy:
Student's t for integer degrees of freedom has a closed form (a finite series in ``cos(theta)``).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

ALPHA = 0.05
POWER = 0.8
RESAMPLES = 10_000


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer ``df >= 1`` degrees of freedom (exact series)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2, sin = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 3 terms after 1
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= cos2 * (2 * k) / (2 * k + 1)
            total += term
        central = 2 / math.pi * (theta + sin * math.cos(theta) * total)
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df/2 terms
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        central = sin * total
    return 0.5 + math.copysign(central / 2, t)


def student_t_quantile(p: float, df: int) -> float:
    """The ``t`` with ``P(T <= t) = p`` (bisection on the exact CDF; 0 < p < 1)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    low, high = -1.0, 1.0
    while student_t_cdf(low, df) > p:
        low *= 2
    while student_t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if student_t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return (low + high) / 2


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over paired seeds, its intervals and the smallest difference the design detects."""

    n: int
    mean: float
    sd: float | None
    """Sample standard deviation of the differences (None with one pair)."""
    bootstrap_low: float | None
    bootstrap_high: float | None
    """Percentile bootstrap interval of the mean at 1 - alpha, resampling pairs (None with one pair)."""
    t_low: float | None
    t_high: float | None
    """Paired t interval at 1 - alpha (None with one pair)."""
    min_detectable: float | None
    """(t_{1-alpha/2} + t_{power}) sd / sqrt(n): the true difference found with probability ``power``."""

    @property
    def decided(self) -> bool:
        """Both intervals exclude 0 (with few seeds the percentile bootstrap is the narrower, so it alone would
        over-claim)."""
        if self.bootstrap_low is None or self.t_low is None:
            return False
        return (self.bootstrap_low > 0 and self.t_low > 0) or (self.bootstrap_high < 0 and self.t_high < 0)

    def to_dict(self) -> dict:
        return dict(asdict(self), decided=self.decided)


def bootstrap_mean_interval(values: list[float], alpha: float = ALPHA, resamples: int = RESAMPLES,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement, seeded)."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    low = means[max(0, math.floor(alpha / 2 * resamples))]
    high = means[min(resamples - 1, math.ceil((1 - alpha / 2) * resamples) - 1)]
    return low, high


def paired_difference(a: list[float], b: list[float], alpha: float = ALPHA, power: float = POWER,
                      resamples: int = RESAMPLES, seed: int = 0) -> PairedDifference:
    """``a[i] - b[i]`` for pairs ``i`` (the same seed on both sides): mean, intervals, detectable difference."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples need the same non-zero length, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return PairedDifference(n, mean, None, None, None, None, None, None)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    t_crit = student_t_quantile(1 - alpha / 2, n - 1)
    low, high = bootstrap_mean_interval(diffs, alpha, resamples, seed)
    detectable = (t_crit + student_t_quantile(power, n - 1)) * se
    return PairedDifference(n, mean, sd, low, high, mean - t_crit * se, mean + t_crit * se, detectable)


def binomial_se(accuracy: float, prompts: int) -> float:
    """Standard error of one accuracy measured on ``prompts`` independent prompts (the evaluation's own noise;
    a lower bound when prompts repeat problems)."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(prompts, 1))
