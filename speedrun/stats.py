"""The tests that records are judged by, on a metric where lower is better (loss, bits per byte).

- `one_sample_below`: is the mean below a threshold? parameter-golf's record rule (beat SOTA - 0.005 at
  p < 0.01) and modded-nanogpt's (mean val loss <= 3.28 at p < 0.01) are both this one-sided test.
- `welch`: the difference of two settings' means, neither spread assumed equal to the other.
- `paired`: the same, when both settings ran the same seeds (each seed's difference cancels what the
  seed alone decides, e.g. data order).
- `seeds_needed`: how many seeds a test needs to detect a given effect at the observed spread.

The distributions come from scipy.stats; every result says which alternative it tested. t has scipy's
sign: negative when the mean (or the difference) is below the reference.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import scipy.stats

# The tests' alternatives, as scipy names them: "less" asks whether the candidate is lower (better).
ALTERNATIVES = ("two-sided", "less", "greater")


@dataclass(frozen=True)
class TTest:
    """A t-test's outcome. `estimate` is the mean (one sample) or the mean difference (two samples); `low`
    and `high` bound it with the test's confidence (1 - alpha, on the tested side or sides)."""

    estimate: float
    low: float
    high: float
    t: float
    df: float
    p: float
    n: int  # values (one sample), pairs (paired) or the smaller group (Welch)


def _result(result, estimate: float, confidence: float, n: int) -> TTest:
    interval = result.confidence_interval(confidence)
    return TTest(
        estimate=float(estimate),
        low=float(interval.low),
        high=float(interval.high),
        t=float(result.statistic),
        df=float(result.df),
        p=float(result.pvalue),
        n=n,
    )


def _identical_values_result(estimate: float, reference: float, alternative: str, n: int, df: float) -> TTest:
    """Values with no spread at all: the estimate is exact, so the difference is either certain or
    impossible. (scipy returns NaN here, with a warning about catastrophic cancellation.)"""
    difference = estimate - reference
    t = math.copysign(math.inf, difference) if difference else 0.0
    p = {
        "less": 0.0 if difference < 0 else 1.0,
        "greater": 0.0 if difference > 0 else 1.0,
        "two-sided": 0.0 if difference else 1.0,
    }[alternative]
    return TTest(estimate=estimate, low=estimate, high=estimate, t=t, df=df, p=p, n=n)


def _check(alternative: str, confidence: float) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {', '.join(ALTERNATIVES)}, not {alternative!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")


def one_sample_below(values: list[float], threshold: float, confidence: float = 0.99) -> TTest:
    """One-sided one-sample t-test of H1 "the true mean is below `threshold`".

    With a record's margin, threshold = target - margin. The interval is (-inf, upper bound of the mean];
    p < 1 - confidence exactly when that bound is below the threshold.
    """
    _check("less", confidence)
    if len(values) < 2:
        raise ValueError(f"a t-test needs at least 2 values, got {len(values)}")
    mean = statistics.fmean(values)
    if len(set(values)) == 1:
        return _identical_values_result(mean, threshold, "less", len(values), len(values) - 1)
    result = scipy.stats.ttest_1samp(values, threshold, alternative="less")
    return _result(result, mean, confidence, len(values))


def welch(
    candidate: list[float], baseline: list[float], alternative: str = "two-sided", confidence: float = 0.99
) -> TTest:
    """Welch's two-sample t-test of mean(candidate) - mean(baseline) (df from Welch-Satterthwaite)."""
    _check(alternative, confidence)
    if len(candidate) < 2 or len(baseline) < 2:
        raise ValueError(
            f"Welch's test needs 2+ values on each side, got {len(candidate)} and {len(baseline)}"
        )
    difference = statistics.fmean(candidate) - statistics.fmean(baseline)
    n = min(len(candidate), len(baseline))
    if len(set(candidate)) == 1 and len(set(baseline)) == 1:
        return _identical_values_result(difference, 0.0, alternative, n, math.nan)
    result = scipy.stats.ttest_ind(candidate, baseline, equal_var=False, alternative=alternative)
    return _result(result, difference, confidence, n)


def paired(
    candidate: list[float], baseline: list[float], alternative: str = "two-sided", confidence: float = 0.99
) -> TTest:
    """Paired t-test of the mean of candidate[i] - baseline[i] (the i-th values share a seed)."""
    _check(alternative, confidence)
    if len(candidate) != len(baseline) or len(candidate) < 2:
        raise ValueError(f"a paired test needs 2+ pairs, got {len(candidate)} and {len(baseline)} values")
    differences = [c - b for c, b in zip(candidate, baseline, strict=True)]
    mean = statistics.fmean(differences)
    if len(set(differences)) == 1:
        return _identical_values_result(mean, 0.0, alternative, len(differences), len(differences) - 1)
    result = scipy.stats.ttest_rel(candidate, baseline, alternative=alternative)
    return _result(result, mean, confidence, len(differences))


def power(n: int, effect: float, std: float, alpha: float, samples: int, two_sided: bool) -> float:
    """The chance that a t-test at level `alpha` detects a true difference `effect` (> 0, in the tested
    direction) between means, with n values per sample and standard deviation `std` in each.

    One sample: t has n - 1 degrees of freedom and noncentrality effect / (std / sqrt(n)). Two samples
    of n each (equal spread assumed, the textbook approximation for planning): 2n - 2 and
    effect / (std * sqrt(2 / n)).
    """
    if samples == 1:
        df, standard_error = n - 1, std / math.sqrt(n)
    else:
        df, standard_error = 2 * n - 2, std * math.sqrt(2 / n)
    noncentrality = effect / standard_error
    critical = scipy.stats.t.ppf(1 - (alpha / 2 if two_sided else alpha), df)
    detected = scipy.stats.nct.sf(critical, df, noncentrality)
    if two_sided:
        # The far side, P(T < -critical), as the mirror image's upper tail: nct.cdf returns NaN deep in
        # that tail (scipy#25470), its survival function does not.
        detected += scipy.stats.nct.sf(critical, df, -noncentrality)
    return float(detected)


# Beyond this many seeds per setting the answer is "not feasible", whatever the exact number.
MAX_SEEDS = 100_000


def seeds_needed(
    effect: float,
    std: float,
    alpha: float,
    target_power: float = 0.8,
    samples: int = 1,
    two_sided: bool = False,
) -> int | None:
    """The fewest seeds (per sample) for which a t-test detects `effect` with `target_power`; None when no
    number up to MAX_SEEDS does (no effect, or one far below the spread).

    statsmodels' TTestPower.solve_power answers the same question, but a whole package for a root search
    over n would be a heavy dependency; the distributions are scipy's (noncentral t), the search is a
    bisection over whole numbers, as power grows with n.
    """
    if not effect > 0:
        return None
    if std == 0:
        return 2  # no spread: the smallest test that has a standard deviation at all is certain
    low, high = 2, 2
    while power(high, effect, std, alpha, samples, two_sided) < target_power:
        if high >= MAX_SEEDS:
            return None
        low, high = high + 1, min(2 * high, MAX_SEEDS)
    while low < high:  # power(high) >= target; find the first n in [low, high] that reaches it
        middle = (low + high) // 2
        if power(middle, effect, std, alpha, samples, two_sided) >= target_power:
            high = middle
        else:
            low = middle + 1
    return high
