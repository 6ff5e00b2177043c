"""The statistics `speedrun-compare` needs for seed groups, without scipy: mean, sample standard deviation
and a one-sided one-sample Student t-test ("is the true mean below this target?")."""

from __future__ import annotations

import math
from dataclasses import dataclass


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the CDF of a Beta(a, b) variable at x.

    The continued fraction of I_x(a, b) (Numerical Recipes §6.4, evaluated with the modified Lentz method)
    converges fast for x < (a + 1) / (a + b + 2); above that point the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) brings x back into that range.
    """
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    # Prefactor x^a (1-x)^b / (a B(a, b)), computed in logs so that large a, b do not overflow.
    log_front = (
        a * math.log(x)
        + b * math.log1p(-x)
        - math.log(a)
        - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    )
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 300):
        # Each m contributes two terms of the fraction: an even one, then an odd one.
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom.

    Uses P(|T| > |t|) = I_{df/(df+t²)}(df/2, 1/2), halved for one tail.
    """
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    two_tailed = regularized_incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return two_tailed / 2 if t > 0 else 1.0 - two_tailed / 2


def mean_and_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1))


@dataclass(frozen=True)
class TTest:
    t: float
    df: int
    p: float


def t_test_mean_below(values: list[float], target: float) -> TTest:
    """One-sided one-sample t-test of H1 "the true mean is below `target`" (lower is better, as for bpb).

    t = (target - mean) / (s / √n) is positive when the mean is below the target; p = P(T_{n-1} > t).
    """
    if len(values) < 2:
        raise ValueError(f"a t-test needs at least 2 values, got {len(values)}")
    mean, std = mean_and_std(values)
    df = len(values) - 1
    if std == 0:  # identical values: the difference is either certain or impossible
        t = math.copysign(math.inf, target - mean) if mean != target else 0.0
    else:
        t = (target - mean) / (std / math.sqrt(len(values)))
    return TTest(t=t, df=df, p=student_t_sf(t, df))
