"""Learning-rate schedules: a multiplier on every group's base LR, given the step and training time.

Hydra builds each schedule as a partial; the trainer completes it with the horizon it resolved
(`max_steps`, `max_wallclock_ms`, either may be None). When both limits exist, the first one
reached wins, so the multiplier is the smaller of the two.
"""

from __future__ import annotations


def towards_floor(left: float, final_lr_frac: float) -> float:
    """A decay's multiplier: `left` (1 at the start of the decay, 0 at its end) mapped onto
    [final_lr_frac, 1], so the LR ends at final_lr_frac of its peak instead of at 0."""
    return left + (1 - left) * final_lr_frac


class Schedule:
    def __init__(self, max_steps: int | None, max_wallclock_ms: float | None):
        if not max_steps and not max_wallclock_ms:
            raise ValueError("a schedule needs a horizon: max_steps or max_wallclock_ms")
        self.max_steps = max_steps or None
        self.max_wallclock_ms = max_wallclock_ms or None

    def lr_scale(self, step: int, elapsed_ms: float) -> float:
        scales = []
        if self.max_steps:
            scales.append(self._by_steps(step))
        if self.max_wallclock_ms:
            scales.append(self._by_time(step, elapsed_ms))
        return min(scales)

    def _by_steps(self, step: int) -> float:
        raise NotImplementedError

    def _by_time(self, step: int, elapsed_ms: float) -> float:
        raise NotImplementedError

    def warning(self, step: int, elapsed_ms: float) -> str | None:
        """A problem with this schedule on this hardware, if one shows (checked once, early)."""
        return None


class WallclockWarmdown(Schedule):
    """parameter-golf's schedule: LR 1.0, then linear to 0 over the last `warmdown_iters` steps.

    Under a wallclock cap the reference times the warmdown as warmdown_iters x the mean step time
    so far. On hardware slower than the reference's, that estimate exceeds the whole budget and the
    LR decays from step 1; `warmdown_fraction` > 0 instead decays over that fraction of the horizon.
    `final_lr_frac` > 0 ends the decay at that fraction of the peak rather than at 0 (modded-nanogpt's
    record #20 decays its last 40% to 0.1); 0 is parameter-golf's schedule, bit for bit.
    """

    def __init__(
        self,
        max_steps: int | None,
        max_wallclock_ms: float | None,
        warmdown_iters: int = 1200,
        warmdown_fraction: float = 0.0,
        final_lr_frac: float = 0.0,
    ):
        super().__init__(max_steps, max_wallclock_ms)
        self.warmdown_iters = warmdown_iters
        self.warmdown_fraction = warmdown_fraction
        self.final_lr_frac = final_lr_frac

    def _by_steps(self, step: int) -> float:
        n = self.max_steps
        warmdown = round(self.warmdown_fraction * n) if self.warmdown_fraction > 0 else self.warmdown_iters
        if warmdown <= 0:
            return 1.0
        if max(n - warmdown, 0) <= step < n:
            return towards_floor(max((n - step) / max(warmdown, 1), 0.0), self.final_lr_frac)
        return 1.0

    def _warmdown_ms(self, step: int, elapsed_ms: float) -> float:
        if self.warmdown_fraction > 0:
            return self.warmdown_fraction * self.max_wallclock_ms
        return self.warmdown_iters * (elapsed_ms / max(step, 1))

    def _by_time(self, step: int, elapsed_ms: float) -> float:
        if self.warmdown_iters <= 0 and self.warmdown_fraction <= 0:
            return 1.0
        warmdown_ms = self._warmdown_ms(step, elapsed_ms)
        remaining_ms = max(self.max_wallclock_ms - elapsed_ms, 0.0)
        if remaining_ms > warmdown_ms:
            return 1.0
        return towards_floor(remaining_ms / max(warmdown_ms, 1e-9), self.final_lr_frac)

    def warning(self, step: int, elapsed_ms: float) -> str | None:
        if not self.max_wallclock_ms or self.warmdown_fraction > 0 or step == 0:
            return None
        if self._warmdown_ms(step, elapsed_ms) >= self.max_wallclock_ms:
            return (
                f"warmdown_iters={self.warmdown_iters} x {elapsed_ms / step:.1f} ms/step exceeds the "
                f"{self.max_wallclock_ms / 1000:.0f} s budget, so the LR decays from the first step; "
                "set schedule.warmdown_fraction (e.g. 0.2) to warm down over a fraction of the budget"
            )
        return None


class WSD(Schedule):
    """nanochat's warmup / stable / decay: fractions of the horizon, decaying to final_lr_frac."""

    def __init__(
        self,
        max_steps: int | None,
        max_wallclock_ms: float | None,
        warmup_ratio: float = 0.0,
        warmdown_ratio: float = 0.4,
        final_lr_frac: float = 0.0,
    ):
        super().__init__(max_steps, max_wallclock_ms)
        self.warmup_ratio = warmup_ratio
        self.warmdown_ratio = warmdown_ratio
        self.final_lr_frac = final_lr_frac

    def _by_steps(self, step: int) -> float:
        n = self.max_steps
        warmup = round(self.warmup_ratio * n)
        warmdown = round(self.warmdown_ratio * n)
        if step < warmup:
            return (step + 1) / warmup
        if step <= n - warmdown:
            return 1.0
        return towards_floor((n - step) / warmdown, self.final_lr_frac)

    def _by_time(self, step: int, elapsed_ms: float) -> float:
        progress = min(elapsed_ms / self.max_wallclock_ms, 1.0)
        if progress < self.warmup_ratio:
            return max(progress / self.warmup_ratio, 1e-3)
        if progress <= 1 - self.warmdown_ratio:
            return 1.0
        return towards_floor((1 - progress) / self.warmdown_ratio, self.final_lr_frac)
