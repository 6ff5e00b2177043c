"""trainer.stop_at_target: training ends at the first validation that reaches the target, validated
more often once the metric is near it."""

from __future__ import annotations

import re

import pytest

from speedrun.config import ConfigError, compose, validate_config
from tests.conftest import read_metrics, read_summary, run_train

pytestmark = pytest.mark.usefixtures("corpus")

# Short validations (2,048 tokens): the reference run validates after every step.
STEPS = ("trainer.max_steps=16", "trainer.log_every=1", "trainer.export=false", "data.val_tokens=2048")


def validations(run_dir) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r}


def expected_validations(curve: dict[int, float], val_every: int, dense_every: int, target: float,
                         margin: float, last: int) -> dict[int, float]:  # fmt: skip
    """The cadence rule, replayed on the curve of a run that validated every step: every val_every
    steps, every dense_every steps once the latest value is within the margin, and the first value
    at or below the target ends it."""
    seen: dict[int, float] = {}
    for step in range(last + 1):
        latest = seen[max(seen)] if seen else None
        near = latest is not None and latest <= target + margin
        if step % val_every == 0 or (near and step % dense_every == 0) or step == last:
            seen[step] = curve[step]
            if curve[step] <= target:
                break
    return seen


def test_training_stops_at_the_first_validation_that_reaches_the_target(tmp_path):
    # The reference curve: the same run validated after every step (validation changes no weights).
    run_train(tmp_path / "every", *STEPS, "trainer.val_every=1")
    curve = validations(tmp_path / "every")
    assert sorted(curve) == list(range(17))
    # A target the loss first reaches at a step only the dense cadence (every 2 steps) validates, and a
    # margin that starts that cadence a few steps before.
    target_step = next(s for s in (10, 12, 14) if curve[s] < min(curve[t] for t in range(s)))
    target = curve[target_step]
    margin = max(curve[target_step - 4] - target, 0.0) + 1e-9

    run_dir = tmp_path / "target"
    run_train(run_dir, *STEPS, "trainer.val_every=8", "trainer.stop_at_target=true", f"trainer.target_value={target!r}",
              f"trainer.target_margin={margin!r}", "trainer.target_val_every=2")  # fmt: skip
    summary = read_summary(run_dir)
    expected = expected_validations(curve, 8, 2, target, margin, last=16)
    assert validations(run_dir) == expected
    stop = max(expected)
    assert curve[stop] <= target and all(curve[s] > target for s in expected if s != stop)
    assert summary["status"] == "completed" and summary["stopped_at_target"] is True
    assert summary["steps"] == stop and summary["val_loss"] == curve[stop]
    assert f"stopping_early: target val_loss:{curve[stop]:.4f}" in (run_dir / "train.log").read_text()


def test_a_target_never_reached_runs_to_the_horizon(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, *STEPS, "trainer.max_steps=8", "trainer.val_every=4", "trainer.stop_at_target=true",
              "trainer.target_value=0.5", "trainer.target_metric=val_bpb")  # fmt: skip
    summary = read_summary(run_dir)
    assert summary["steps"] == 8 and summary["stopped_at_target"] is False
    assert sorted(validations(run_dir)) == [0, 4, 8]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ([], "trainer.stop_at_target needs trainer.target_value, e.g. 3.28"),
        (["trainer.target_value=3.28", "trainer.val_every=0"],
         "trainer.stop_at_target needs validations during training: set trainer.val_every"),
        (["trainer.target_value=3.28", "trainer.target_metric=loss"],
         "trainer.target_metric='loss' must be val_loss or val_bpb"),
    ],
)  # fmt: skip
def test_a_target_that_cannot_work_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(compose(["trainer.stop_at_target=true", *overrides]))


def test_the_refusal_is_one_line_on_the_command_line(tmp_path):
    proc = run_train(tmp_path / "run", "trainer.stop_at_target=true", check=False)
    assert proc.returncode == 2  # a config error, refused before anything starts
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert errors == ["error: trainer.stop_at_target needs trainer.target_value, e.g. 3.28"]
