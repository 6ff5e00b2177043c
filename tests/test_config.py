"""Every config option composes against its schema and instantiates; bad configs are refused."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from speedrun.config import ConfigError, register_configs, validate_config
from speedrun.config.resolvers import claim_dir, register_resolvers, safe_name
from speedrun.config.validate import split_batch
from speedrun.models.protocol import parameter_groups
from tests.conftest import REPO, cli_env

CONF = REPO / "conf"
register_configs()
register_resolvers()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(*overrides: str, hydra_config: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_config)


@pytest.mark.parametrize("option", options("model"))
def test_model_options_build(option):
    """Every model option builds; the small ones also compute a loss (the record-sized ones, hundreds of
    millions of parameters, are built on the meta device: their math is tested at small sizes elsewhere)."""
    import torch

    cfg = compose_with(f"model={option}")
    with torch.device("meta"):
        params = sum(p.numel() for p in instantiate(cfg.model).parameters())
    assert params > 0
    if params < 50_000_000:
        model = instantiate(cfg.model)
        block = cfg.model.get("window_block_size", 8)  # a whole block of tokens for block-wise windows
        assert model(*[torch.zeros(1, block, dtype=torch.long)] * 2).ndim == 0


def test_pg_9x512_has_the_reference_parameter_count():
    model = instantiate(compose_with("model=pg_9x512").model)
    assert sum(p.numel() for p in model.parameters()) == 17_059_912


@pytest.mark.parametrize("option", options("optimizer"))
def test_optimizer_options_complete_with_a_model(option):
    cfg = compose_with(f"optimizer={option}", "model=gpt_tiny")
    model = instantiate(cfg.model)
    optimizer = instantiate(cfg.optimizer)(parameter_groups(model))
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, optimized)) == sorted(map(id, model.parameters()))


@pytest.mark.parametrize("option", options("schedule"))
def test_schedule_options_complete_with_a_horizon(option):
    cfg = compose_with(f"schedule={option}")
    schedule = instantiate(cfg.schedule)(max_steps=100, max_wallclock_ms=None)
    assert schedule.lr_scale(0, 0.0) > 0 and schedule.lr_scale(99, 0.0) < 1.0


@pytest.mark.parametrize("option", options("data"))
def test_data_options_instantiate(option):
    extra = ["data.path=/nowhere", "data.tokenizer=/nowhere/t.model"] if option == "shards" else []
    cfg = compose_with(f"data={option}", *extra)
    assert instantiate(cfg.data).seq_len == cfg.data.seq_len


@pytest.mark.parametrize("group", ["trainer", "logger"])
def test_other_groups_compose(group):
    for option in options(group):
        cfg = compose_with(f"{group}={option}")
        validate_config(cfg)


@pytest.mark.parametrize("experiment", [e for e in options("experiment") if e.startswith("pg_")])
def test_parameter_golf_experiments_compose_to_the_reference_values(experiment):
    cfg = compose_with(f"experiment={experiment}")
    validate_config(cfg, world_size=8)
    assert cfg.data._target_.endswith("FinewebSP1024")
    assert sum(p.numel() for p in instantiate(cfg.model).parameters()) == 17_059_912
    assert cfg.trainer.max_wallclock_seconds == 600 and cfg.trainer.max_steps == 20000


def test_pg_seq4096_v1_matches_the_record_readme():
    cfg = compose_with("experiment=pg_seq4096_v1")
    assert (cfg.data.seq_len, cfg.trainer.train_batch_tokens) == (4096, 393216)
    o = cfg.optimizer
    assert (o.embed_lr, o.matrix_lr, o.scalar_lr) == (0.03, 0.02, 0.02)
    assert (o.momentum, o.momentum_warmup_start, o.momentum_warmup_steps) == (0.99, 0.92, 1500)
    assert cfg.schedule.warmdown_iters == 3000


@pytest.mark.parametrize("sweep", options("sweep"))
def test_sweep_presets_compose(sweep):
    cfg = compose_with(f"+sweep={sweep}", hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.model_dim=100", "model.num_heads=3"], "model.num_heads=3"),
        (["model.num_heads=4", "model.num_kv_heads=3"], "model.num_kv_heads=3"),
        (["model.model_dim=96", "model.num_heads=32", "model.num_kv_heads=32"], "even"),
        (["trainer.train_batch_tokens=1000"], "trainer.train_batch_tokens=1000"),
        (["trainer.train_batch_tokens=8192", "data.seq_len=3000"], "data.seq_len=3000"),
        (["trainer.micro_batch_tokens=3000"], "trainer.micro_batch_tokens=3000"),
        (["trainer.max_steps=0", "trainer.max_wallclock_seconds=0"], "no training horizon"),
        (["trainer.nproc_per_node=two"], "trainer.nproc_per_node"),
        (["logger.mode=sometimes"], "logger.mode"),
    ],
)
def test_shapes_that_do_not_fit_are_refused_with_the_fix(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate_config(compose_with(*overrides))


def test_batch_split_keeps_the_global_batch_fixed():
    assert split_batch(8192, 0, 1, 256) == (8, 1024)
    assert split_batch(8192, 0, 2, 256) == (4, 1024)
    assert split_batch(8192, 512, 2, 256) == (8, 512)
    with pytest.raises(ConfigError):
        split_batch(8192, 0, 3, 256)


def test_safe_name_and_claim_dir(tmp_path):
    assert "/" not in safe_name("data.path=/a/b,optimizer.matrix_lr=0.02")
    long = safe_name("x=" + "y" * 500)
    assert len(long) <= 80 and long != safe_name("x=" + "y" * 499)
    first = claim_dir(str(tmp_path), "2026-01-01_00-00-00")
    second = claim_dir(str(tmp_path), "2026-01-01_00-00-00")
    assert first != second and Path(second).name == "2026-01-01_00-00-00-2"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "speedrun.train", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_cfg_job_does_not_import_torch():
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH'))\n"
        "sys.argv = ['speedrun.train', 'model=pg_9x512', '--cfg', 'job']\n"
        "from speedrun.train import main\nmain()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True
    )
    assert "num_layers: 9" in proc.stdout
    assert "NO_TORCH" in proc.stdout


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.nmu_layers=3", "model.nmu_layers is not a setting of model; did you mean model.num_layers?"),
        ("trainer.max_steps=ten", "trainer.max_steps"),
        ("optimizer.matrix_lr=fast", "optimizer.matrix_lr"),
    ],
)
def test_typos_and_wrong_types_stop_before_any_work(tmp_path, override, needle):
    proc = _cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written for a config that does not compose"


def test_shape_error_from_the_cli_is_one_line_before_any_folder_is_made(tmp_path):
    run_dir = tmp_path / "run"
    proc = _cli("model.num_kv_heads=3", "logger=none", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.num_kv_heads=3" in errors[0]
    assert not run_dir.exists()
