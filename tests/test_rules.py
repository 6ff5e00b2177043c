"""Track rules: every limit of every shipped preset, on synthetic summaries, and one real run that breaks one."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from speedrun.config import compose
from speedrun.rules import TrackRules, failure_lines
from tests.conftest import read_summary, run_train

H100 = "NVIDIA H100 80GB HBM3"


def preset(name: str) -> tuple[TrackRules, dict]:
    """The shipped preset as a run gets it, and that run's config (as a plain dict)."""
    cfg = compose([f"rules={name}", "data.val_tokens=0"])
    return instantiate(cfg.rules), OmegaConf.to_container(cfg, resolve=True)


def summary_within_every_limit(**changes) -> dict:
    """A run on the tracks' hardware that meets every shipped limit (each at its boundary)."""
    summary = {
        "status": "completed",
        "artifact_bytes": 16_000_000,
        "train_time_ms": 600_000.0,
        "eval_time_ms": 600_000.0,
        "val_loss": 3.28,
        "val_tokens_scored": 10_485_760,
        "world_size": 8,
        "provenance": {"gpu_name": H100, "gpu_count": 8},
    }
    return {**summary, **changes}


def failed(block: dict) -> list[str]:
    return [c["name"] for c in block["checks"] if not c["pass"]]


EXPECTED_CHECKS = {
    "pg_10min_16mb": [
        ("artifact_bytes", 16_000_000),
        ("train_time_s", 600.0),
        ("eval_time_s", 600.0),
        ("val_tokens", "whole split"),
        ("hardware", "8xH100"),
    ],
    "mn_3p28": [("val_loss", 3.28), ("val_tokens", 10_485_760), ("hardware", "8xH100")],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CHECKS))
def test_a_run_within_every_limit_passes_each_check(name):
    rules, config = preset(name)
    block = rules.check(summary_within_every_limit(), config)
    assert block["preset"] == name and block["pass"] is True
    assert [(c["name"], c["limit"]) for c in block["checks"]] == EXPECTED_CHECKS[name]
    assert all(set(c) == {"name", "limit", "value", "pass"} for c in block["checks"])
    assert failure_lines(block) == []


# Each case breaks one limit by the smallest step past it; every other value stays within its limit.
BREAKS = {
    "pg_10min_16mb": [
        ("artifact_bytes", {"artifact_bytes": 16_000_001}, "artifact_bytes: 16,000,001 exceeds the limit 16,000,000"),
        ("train_time_s", {"train_time_ms": 600_001.0}, "train_time_s: 600.001 exceeds the limit 600"),
        ("eval_time_s", {"eval_time_ms": 600_001.0}, "eval_time_s: 600.001 exceeds the limit 600"),
        ("hardware", {"provenance": {"gpu_name": H100, "gpu_count": 4}},
         "hardware: ran on 4xNVIDIA H100 80GB HBM3, not the track's hardware (8xH100)"),
        ("hardware", {"provenance": {"gpu_name": "NVIDIA H200", "gpu_count": 8}},
         "hardware: ran on 8xNVIDIA H200, not the track's hardware (8xH100)"),
        ("hardware", {"world_size": 1, "provenance": {"gpu_name": None, "gpu_count": 0}},
         "hardware: ran on 1xcpu, not the track's hardware (8xH100)"),
        ("artifact_bytes", {"artifact_bytes": None}, "artifact_bytes: not measured by this run (limit 16000000)"),
    ],
    "mn_3p28": [
        ("val_loss", {"val_loss": 3.2800001}, "val_loss: 3.28 exceeds the limit 3.28"),
        ("val_tokens", {"val_tokens_scored": 10_484_736},
         "val_tokens: scored 10,484,736 validation tokens, the track scores exactly the first 10,485,760"),
        ("val_tokens", {"val_tokens_scored": 10_485_761},
         "val_tokens: scored 10,485,761 validation tokens, the track scores exactly the first 10,485,760"),
        ("hardware", {"world_size": 8, "provenance": {"gpu_name": None, "gpu_count": 0}},
         "hardware: ran on 8xcpu, not the track's hardware (8xH100)"),
        ("val_loss", {"val_loss": None}, "val_loss: not measured by this run (limit 3.28)"),
    ],
}  # fmt: skip
CASES = [(name, *case) for name, cases in BREAKS.items() for case in cases]


@pytest.mark.parametrize(
    "name,check,changes,line", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)]
)
def test_breaking_one_limit_fails_that_check_alone(name, check, changes, line):
    rules, config = preset(name)
    block = rules.check(summary_within_every_limit(**changes), config)
    assert block["pass"] is False
    assert failed(block) == [check]
    assert failure_lines(block) == [line]


def test_the_parameter_golf_track_scores_the_whole_validation_split():
    rules, config = preset("pg_10min_16mb")
    config["data"]["val_tokens"] = 8192  # a cut validation split: not the track's score
    block = rules.check(summary_within_every_limit(val_tokens_scored=8128), config)
    assert failed(block) == ["val_tokens"]
    assert failure_lines(block) == [
        "val_tokens: scored 8,128 validation tokens, the track scores the whole validation split "
        "(data.val_tokens=0)"
    ]


def test_no_preset_means_no_checks_and_a_custom_one_checks_only_what_it_sets():
    assert compose([]).rules is None  # rules=none, the default
    custom = TrackRules(max_val_loss=4.0)
    block = custom.check({"val_loss": 3.5}, {})
    assert block == {
        "preset": "custom",
        "pass": True,
        "checks": [{"name": "val_loss", "limit": 4.0, "value": 3.5, "pass": True}],
    }


@pytest.mark.usefixtures("corpus")
def test_a_run_that_breaks_a_rule_completes_and_says_which_check_failed(tmp_path):
    """The track's preset on this CPU with a 100 KB artifact limit: the run completes (exit 0), and
    rules.pass is false with the artifact, the split and the hardware named; code bytes are the one file
    named as the submission's code."""
    script = tmp_path / "train_gpt.py"
    script.write_text("# the submission's code.\n" * 100)  # 25 bytes a line
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, "trainer.max_steps=6", "trainer.val_every=3", "rules=pg_10min_16mb",
                     "rules.max_artifact_bytes=100000", f"export.code_files=[{script}]")  # fmt: skip
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and proc.returncode == 0
    assert summary["code_bytes"] == script.stat().st_size == 2500
    assert summary["code_files"] == [str(script)]
    assert summary["artifact_bytes"] == summary["model_bytes"] + 2500
    rules = summary["rules"]
    assert rules["preset"] == "pg_10min_16mb" and rules["pass"] is False
    assert failed(rules) == ["artifact_bytes", "val_tokens", "hardware"]
    checks = {c["name"]: c for c in rules["checks"]}
    assert checks["artifact_bytes"]["value"] == summary["artifact_bytes"] > 100_000
    assert checks["train_time_s"]["value"] == pytest.approx(summary["train_time_ms"] / 1000, abs=1e-3)
    assert checks["eval_time_s"]["pass"] and 0 < checks["eval_time_s"]["value"] < 60
    assert checks["hardware"]["value"] == "1xcpu"
    assert "rules pg_10min_16mb: FAIL" in proc.stdout
    assert (
        f"rules pg_10min_16mb: artifact_bytes: {summary['artifact_bytes']:,} exceeds the limit 100,000"
        in proc.stdout
    )
    assert "rules pg_10min_16mb: hardware: ran on 1xcpu, not the track's hardware (8xH100)" in proc.stdout
    assert f"code {summary['code_bytes']} bytes (train_gpt.py)" in (run_dir / "train.log").read_text()
