"""speedrun.stats against the published record p-values and against each test's formula, computed by hand
here (means, standard errors, Welch-Satterthwaite degrees of freedom) with only scipy's t distribution."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import scipy.stats

from speedrun.stats import one_sample_below, paired, power, seeds_needed, welch

# parameter-golf's record README (seed 002): three seeds' final val_bpb, and the bar: SOTA 1.21613611 - 0.005.
PARAMETER_GOLF_SEEDS = [1.20143417, 1.19945102, 1.20319508]
PARAMETER_GOLF_BAR = 1.21613611 - 0.005
# modded-nanogpt record #21 (records/012625_BatchSize/README.md): 30 final val losses against 3.28.
MODDED_NANOGPT_LOSSES = [
    3.2806, 3.2771, 3.2829, 3.2813, 3.2789, 3.2774, 3.2798, 3.2759, 3.2794, 3.2775,
    3.2768, 3.2793, 3.2838, 3.2779, 3.2782, 3.277, 3.2775, 3.2784, 3.2782, 3.2776,
    3.2814, 3.2785, 3.2793, 3.2797, 3.2782, 3.2789, 3.2759, 3.2803, 3.278, 3.2782,
]  # fmt: skip
TOLERANCE = 1e-9


def one_sample_by_hand(values: list[float], threshold: float, alpha: float) -> tuple[float, float, float]:
    """t, p and the upper confidence bound of the mean, from the textbook formulas."""
    n = len(values)
    mean, standard_error = statistics.fmean(values), statistics.stdev(values) / math.sqrt(n)
    t = (mean - threshold) / standard_error
    return t, scipy.stats.t.cdf(t, n - 1), mean + scipy.stats.t.ppf(1 - alpha, n - 1) * standard_error


def test_parameter_golf_record_p_value():
    test = one_sample_below(PARAMETER_GOLF_SEEDS, PARAMETER_GOLF_BAR, confidence=0.99)
    t, p, upper = one_sample_by_hand(PARAMETER_GOLF_SEEDS, PARAMETER_GOLF_BAR, alpha=0.01)
    assert (test.t, test.p, test.high) == pytest.approx((t, p, upper), abs=TOLERANCE)
    assert test.df == 2 and test.n == 3 and test.low == -math.inf
    # The README: mean 1.20136009, std 0.00187, t = 9.06 with df = 2, p = 0.006. The exact t is 9.04 (9.05
    # from the rounded std; the README's last digit is not reproducible from its numbers); the sign is
    # scipy's here: negative, below the bar.
    assert (
        round(test.estimate, 8) == 1.20136009 and round(statistics.stdev(PARAMETER_GOLF_SEEDS), 5) == 0.00187
    )
    assert round(test.t, 2) == -9.04 and abs(test.t + 9.06) < 0.03
    assert round(test.p, 3) == 0.006
    # At p < 0.01 the bound of the mean is below the bar; at p < 0.001 it is not.
    assert test.high < PARAMETER_GOLF_BAR
    assert (
        one_sample_below(PARAMETER_GOLF_SEEDS, PARAMETER_GOLF_BAR, confidence=0.999).high > PARAMETER_GOLF_BAR
    )


def test_modded_nanogpt_record_21_p_value():
    test = one_sample_below(MODDED_NANOGPT_LOSSES, 3.28, confidence=0.99)
    t, p, upper = one_sample_by_hand(MODDED_NANOGPT_LOSSES, 3.28, alpha=0.01)
    assert (test.t, test.p, test.high) == pytest.approx((t, p, upper), abs=TOLERANCE)
    # The README: p=0.0007, std 0.0019, mean 3.2788 (torch.std_mean: the sample standard deviation).
    assert round(test.p, 4) == 0.0007 and test.df == 29
    assert round(test.estimate, 4) == 3.2788 and round(statistics.stdev(MODDED_NANOGPT_LOSSES), 4) == 0.0019


CANDIDATE = [2.9812, 2.9744, 2.9790, 2.9861]
BASELINE = [2.9902, 2.9870, 2.9951]


@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_welch_matches_its_formula(alternative):
    test = welch(CANDIDATE, BASELINE, alternative, confidence=0.95)
    variances = [statistics.variance(x) / len(x) for x in (CANDIDATE, BASELINE)]
    standard_error = math.sqrt(sum(variances))
    df = sum(variances) ** 2 / sum(
        v**2 / (len(x) - 1) for v, x in zip(variances, (CANDIDATE, BASELINE), strict=True)
    )
    delta = statistics.fmean(CANDIDATE) - statistics.fmean(BASELINE)
    t = delta / standard_error
    assert (test.estimate, test.t, test.df) == pytest.approx((delta, t, df), abs=TOLERANCE)
    assert test.n == 3
    check_p_and_interval(test, t, df, delta, standard_error, alternative, alpha=0.05)


@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_paired_matches_its_formula(alternative):
    # Seeds 1-4 of a setting and of its baseline: the seed moves both, so the pairs differ by less.
    candidate, baseline = [3.101, 3.087, 3.122, 3.095], [3.109, 3.090, 3.131, 3.099]
    test = paired(candidate, baseline, alternative, confidence=0.99)
    differences = [c - b for c, b in zip(candidate, baseline, strict=True)]
    delta, standard_error = statistics.fmean(differences), statistics.stdev(differences) / 2
    t = delta / standard_error
    assert (test.estimate, test.t, test.df, test.n) == pytest.approx((delta, t, 3, 4), abs=TOLERANCE)
    check_p_and_interval(test, t, 3, delta, standard_error, alternative, alpha=0.01)


def check_p_and_interval(test, t, df, delta, standard_error, alternative, alpha):
    """p from the t distribution on the tested side(s); the interval at 1 - alpha on the same side(s)."""
    if alternative == "two-sided":
        p, half = 2 * scipy.stats.t.sf(abs(t), df), scipy.stats.t.ppf(1 - alpha / 2, df) * standard_error
        low, high = delta - half, delta + half
    elif alternative == "less":
        p = scipy.stats.t.cdf(t, df)
        low, high = -math.inf, delta + scipy.stats.t.ppf(1 - alpha, df) * standard_error
    else:
        p = scipy.stats.t.sf(t, df)
        low, high = delta - scipy.stats.t.ppf(1 - alpha, df) * standard_error, math.inf
    assert (test.p, test.low, test.high) == pytest.approx((p, low, high), abs=TOLERANCE)
    assert (test.p < alpha) == (not low <= 0 <= high)  # the interval excludes 0 exactly when p < alpha


def test_values_without_spread_give_certain_answers():
    below = one_sample_below([1.0, 1.0, 1.0], 2.0)
    assert (below.t, below.p, below.high) == (-math.inf, 0.0, 1.0)
    assert one_sample_below([3.0, 3.0], 2.0).p == 1.0
    same = welch([1.0, 1.0], [1.0, 1.0])
    assert (same.estimate, same.p) == (0.0, 1.0)
    assert welch([1.0, 1.0], [2.0, 2.0], "less").p == 0.0
    assert paired([1.5, 2.5], [1.0, 2.0], "greater").p == 0.0  # every pair differs by exactly 0.5


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least 2 values"):
        one_sample_below([1.0], 2.0)
    with pytest.raises(ValueError, match="2\\+ values on each side"):
        welch([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="2\\+ pairs"):
        paired([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="alternative"):
        welch([1.0, 2.0], [1.0, 3.0], "smaller")
    with pytest.raises(ValueError, match="confidence"):
        paired([1.0, 2.0], [1.0, 3.0], confidence=95)


@pytest.mark.parametrize(
    ("effect", "samples", "two_sided", "alpha", "expected"),
    [
        # Cohen's tables (and G*Power): a standardised effect d at power 0.8.
        (0.5, 1, False, 0.05, 27),
        (0.5, 1, True, 0.05, 34),
        (0.5, 2, True, 0.05, 64),
        (0.8, 2, True, 0.05, 26),
        (0.5, 2, False, 0.05, 51),
    ],
)
def test_seeds_needed_matches_published_tables(effect, samples, two_sided, alpha, expected):
    assert seeds_needed(effect, 1.0, alpha, 0.8, samples, two_sided) == expected
    # Units do not matter: the same effect in standard deviations of 0.002 bpb.
    assert seeds_needed(effect * 0.002, 0.002, alpha, 0.8, samples, two_sided) == expected


def test_seeds_needed_edges():
    assert seeds_needed(0.0, 1.0, 0.01) is None  # nothing to detect
    assert seeds_needed(-0.1, 1.0, 0.01) is None  # the wrong side of a one-sided test
    assert seeds_needed(1e-6, 1.0, 0.01) is None  # beyond any feasible number of seeds
    assert seeds_needed(0.001, 0.0, 0.01) == 2  # no spread at all
    # Large effects reach deep into the noncentral t's far tail, where nct.cdf returns NaN (scipy#25470).
    assert all(math.isfinite(power(n, 11.0, 1.0, 0.01, 2, True)) for n in range(2, 40))
    assert seeds_needed(11.0, 1.0, 0.01, samples=2, two_sided=True) == 3
    # parameter-golf's record: its observed margin below the bar at its spread needs 3 seeds at p < 0.01.
    margin = PARAMETER_GOLF_BAR - statistics.fmean(PARAMETER_GOLF_SEEDS)
    assert seeds_needed(margin, statistics.stdev(PARAMETER_GOLF_SEEDS), 0.01) == 3


@pytest.mark.parametrize(("samples", "two_sided"), [(1, False), (2, True)])
def test_power_agrees_with_simulated_experiments(samples, two_sided):
    """The noncentral-t power against 20,000 simulated experiments at the number of seeds it asks for."""
    effect, std, alpha = 0.003, 0.004, 0.01
    n = seeds_needed(effect, std, alpha, 0.8, samples, two_sided)
    assert (
        power(n, effect, std, alpha, samples, two_sided)
        >= 0.8
        > power(n - 1, effect, std, alpha, samples, two_sided)
    )
    rng = np.random.default_rng(0)
    candidate = rng.normal(-effect, std, size=(20_000, n))
    if samples == 1:
        p = scipy.stats.ttest_1samp(candidate, 0.0, axis=1, alternative="less").pvalue
    else:
        p = scipy.stats.ttest_ind(candidate, rng.normal(0.0, std, size=(20_000, n)), axis=1).pvalue
    simulated = float(np.mean(p < alpha))
    assert simulated == pytest.approx(power(n, effect, std, alpha, samples, two_sided), abs=0.015)
