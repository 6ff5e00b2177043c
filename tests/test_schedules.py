"""LR schedules against the reference formulas, and the training horizon."""

from __future__ import annotations

import pytest

from speedrun.config import TrainerConfig
from speedrun.job import resolve_max_steps
from speedrun.schedules import WSD, WallclockWarmdown


def reference_lr_mul(
    step: int, elapsed_ms: float, iterations: int, warmdown_iters: int, cap_ms: float | None
):
    """parameter-golf's lr_mul, transcribed from train_gpt.py."""
    if warmdown_iters <= 0:
        return 1.0
    if cap_ms is None:
        start = max(iterations - warmdown_iters, 0)
        return max((iterations - step) / max(warmdown_iters, 1), 0.0) if start <= step < iterations else 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = warmdown_iters * step_ms
    remaining_ms = max(cap_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


@pytest.mark.parametrize("step", [0, 1, 500, 799, 800, 801, 999, 1000])
def test_wallclock_warmdown_by_steps_is_the_reference(step):
    schedule = WallclockWarmdown(max_steps=1000, max_wallclock_ms=None, warmdown_iters=200)
    assert schedule.lr_scale(step, 0.0) == reference_lr_mul(step, 0.0, 1000, 200, None)


@pytest.mark.parametrize(
    ("step", "elapsed_ms"), [(1, 40.0), (100, 4000.0), (9000, 540_000.0), (9500, 590_000.0)]
)
def test_wallclock_warmdown_by_time_is_the_reference(step, elapsed_ms):
    # The reference run: 20,000 iterations and a 600 s cap; time decides.
    schedule = WallclockWarmdown(max_steps=20000, max_wallclock_ms=600_000.0, warmdown_iters=1200)
    assert schedule.lr_scale(step, elapsed_ms) == reference_lr_mul(step, elapsed_ms, 20000, 1200, 600_000.0)


def test_the_reference_flaw_is_detected_and_warmdown_fraction_avoids_it():
    # 1 s per step with a 60 s budget: 1200 warmdown iterations "take" 1200 s, so the reference
    # decays from the very first step.
    flawed = WallclockWarmdown(max_steps=None, max_wallclock_ms=60_000.0, warmdown_iters=1200)
    assert flawed.lr_scale(10, 10_000.0) < 0.1
    assert "warmdown_fraction" in flawed.warning(10, 10_000.0)
    fixed = WallclockWarmdown(
        max_steps=None, max_wallclock_ms=60_000.0, warmdown_iters=1200, warmdown_fraction=0.25
    )
    assert fixed.warning(10, 10_000.0) is None
    assert fixed.lr_scale(10, 10_000.0) == 1.0
    assert fixed.lr_scale(50, 52_500.0) == pytest.approx(0.5)
    assert fixed.lr_scale(60, 60_000.0) == 0.0


def test_wsd_by_steps_is_nanochats_formula():
    schedule = WSD(
        max_steps=100, max_wallclock_ms=None, warmup_ratio=0.1, warmdown_ratio=0.5, final_lr_frac=0.1
    )
    assert schedule.lr_scale(0, 0.0) == pytest.approx(0.1)  # (it + 1) / warmup_iters
    assert schedule.lr_scale(9, 0.0) == pytest.approx(1.0)
    assert schedule.lr_scale(50, 0.0) == 1.0
    assert schedule.lr_scale(75, 0.0) == pytest.approx(0.5 * 1.0 + 0.5 * 0.1)
    assert schedule.lr_scale(100, 0.0) == pytest.approx(0.1)


def test_with_both_limits_the_first_reached_wins():
    schedule = WSD(max_steps=1000, max_wallclock_ms=10_000.0, warmdown_ratio=0.5)
    # Step 100 of 1000 is early, but 9 s of a 10 s budget is late: time decides.
    assert schedule.lr_scale(100, 9_000.0) == pytest.approx(0.2)
    # Step 900 of 1000 is late, 1 s of 10 s is early: steps decide.
    assert schedule.lr_scale(900, 1_000.0) == pytest.approx(0.2)


def test_a_schedule_needs_a_horizon():
    with pytest.raises(ValueError, match="horizon"):
        WSD(max_steps=None, max_wallclock_ms=None)


def horizon(**overrides) -> TrainerConfig:
    cfg = {"train_batch_tokens": 1000, "max_steps": 0, "target_flops": 0.0, "target_param_data_ratio": 0.0}
    return TrainerConfig(**{**cfg, **overrides})


def test_horizon_precedence_is_steps_then_flops_then_data_ratio():
    # nanochat: iterations = target_flops / (flops_per_token * batch), or ratio * params // batch.
    assert resolve_max_steps(horizon(max_steps=7, target_flops=1e12), 1e6, 10_000) == 7
    assert resolve_max_steps(horizon(target_flops=6e12, target_param_data_ratio=20), 2e6, 10_000) == 3000
    assert resolve_max_steps(horizon(target_param_data_ratio=20), 2e6, 10_000) == 200
    assert resolve_max_steps(horizon(), 2e6, 10_000) is None
