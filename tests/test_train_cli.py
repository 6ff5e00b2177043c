"""End-to-end runs through the real CLI (`python -m speedrun.train`), on the embedded corpus."""

from __future__ import annotations

import gc
import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from speedrun.config import register_configs
from speedrun.job import run_rank
from tests.conftest import REPO, TINY, read_metrics, read_summary, run_train

pytestmark = pytest.mark.usefixtures("corpus")

SUMMARY_FIELDS = {
    "status", "val_loss", "val_bpb", "quant_val_loss", "quant_val_bpb", "model_bytes", "code_bytes",
    "artifact_bytes", "params", "steps", "tokens_seen", "train_time_ms", "step_avg_ms", "tok_per_sec",
    "mfu", "peak_mem_mib", "world_size", "seed", "overrides", "error",
}  # fmt: skip


def test_tiny_run_leaves_every_output_and_learns(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "trainer.max_steps=30", "trainer.val_every=15", "logger=wandb", "logger.mode=offline")

    summary = read_summary(run_dir)
    assert SUMMARY_FIELDS <= summary.keys()
    assert summary["status"] == "completed" and summary["error"] is None
    assert summary["steps"] == 30 and summary["tokens_seen"] == 30 * 1024
    assert summary["mfu"] is None  # no GPU, no MFU
    assert summary["artifact_bytes"] == summary["model_bytes"] + summary["code_bytes"]
    # Code bytes count the framework source the run imported, not tools it never loads.
    package = REPO / "speedrun"
    tools = sum((package / name).stat().st_size for name in ("compare.py", "data/prepare.py"))
    assert 0 < summary["code_bytes"] <= sum(p.stat().st_size for p in package.rglob("*.py")) - tools
    assert (run_dir / "final_model.int8.ptz").stat().st_size == summary["model_bytes"]
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "train.log").exists()
    assert list((run_dir / "checkpoints").glob("step_*.pt"))
    assert list((run_dir / "wandb").glob("offline-run-*"))

    records = read_metrics(run_dir)
    assert all({"step", "tokens", "train_time_ms"} <= r.keys() for r in records)
    vals = [r for r in records if "val/bpb" in r]
    assert [r["step"] for r in vals] == [0, 15, 30]
    assert vals[-1]["val/bpb"] < 0.8 * vals[0]["val/bpb"], "validation bpb should fall well below step 0"
    assert summary["val_bpb"] == pytest.approx(vals[-1]["val/bpb"])
    assert abs(summary["quant_val_bpb"] - summary["val_bpb"]) < 0.05
    assert any("train/loss" in r for r in records)
    assert "final_int8_zlib_roundtrip" in (run_dir / "train.log").read_text()


def test_wallclock_cap_stops_on_training_time(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "trainer.max_steps=0", "trainer.max_wallclock_seconds=2", "trainer.val_every=0",
              "trainer.export=false")  # fmt: skip
    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    # It stops after the step that crosses the cap: at most one step (slack for a loaded machine) late.
    assert 2000 <= summary["train_time_ms"] < 2000 + max(5 * summary["step_avg_ms"], 1500)
    assert "stopping_early: wallclock_cap" in (run_dir / "train.log").read_text()


def test_warmup_steps_restore_the_initial_state(tmp_path):
    """Compile warm-up steps train for real, then restore weights, optimizer and data position:
    the measured run must be identical to one without warm-up."""
    common = ("trainer.max_steps=6", "trainer.val_every=3", "trainer.log_every=1", "trainer.export=false")
    run_train(tmp_path / "plain", *common)
    run_train(tmp_path / "warm", *common, "trainer.warmup_steps=3")

    def losses(d):
        return [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in read_metrics(d)]

    assert losses(tmp_path / "plain") == losses(tmp_path / "warm")
    assert "warmup_step:3/3" in (tmp_path / "warm" / "train.log").read_text()


def test_overrides_and_seed_are_recorded(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "trainer.max_steps=2", "trainer.val_every=0", "trainer.export=false", "seed=7")
    summary = read_summary(run_dir)
    assert summary["seed"] == 7
    assert "seed=7" in summary["overrides"]
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_a_job_leaves_the_collector_as_it_found_it(tmp_path, corpus):
    """The trainer freezes the garbage collector for its loop; a sweep runs job after job in one
    process, so each job must unfreeze it, or every model it built would stay in memory for good."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"data.cache_dir={corpus}", "trainer.max_steps=2"])
    config = OmegaConf.to_container(cfg, resolve=True)
    assert gc.get_freeze_count() == 0
    summary = run_rank(config, {"run_dir": str(tmp_path), "overrides": []})
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert gc.get_freeze_count() == 0
