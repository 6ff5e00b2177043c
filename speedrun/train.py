"""`python -m speedrun.train [overrides]`: the Hydra entry point.

This process owns the config and the run folder. It validates the config, resolves it once
(so `${now:}` and friends cannot differ between ranks), prepares the data, launches the ranks,
makes sure `summary.json` exists whatever happened, and returns the objective for sweepers.
torch is imported only once a job really starts, so `--cfg job`, `--help` and config errors
answer instantly.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from speedrun.config import ConfigError, register_configs, validate_config
from speedrun.config.resolvers import register_resolvers
from speedrun.summary import read_summary, write_summary

log = logging.getLogger("speedrun")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _torchrun_overrides(argv: list[str]) -> list[str]:
    """Extra Hydra overrides when an external `torchrun` started this process.

    Every rank runs this entry point; they must share one run folder (not one timestamped folder
    each) and only rank 0 may write Hydra's files and logs.
    """
    from speedrun.launch import external_rank

    rank = external_rank()
    if rank is None:
        return []
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        extra.append(f"hydra.run.dir=outputs/{datetime.now():%Y-%m-%d}/torchrun-{run_id}")
    if rank != 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    return extra


def _run_info(cfg: DictConfig) -> dict:
    """Who this job is within a sweep: used for wandb group / job_type / name and summary.json."""
    hc = HydraConfig.get()
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    choices = dict(hc.runtime.choices)
    return {
        "run_dir": hc.runtime.output_dir,
        "overrides": list(hc.overrides.task),
        "sweep_dir_name": Path(hc.sweep.dir).name if multirun else None,
        "sweep_preset": choices.get("sweep") if multirun else None,
        "job_name": Path(hc.runtime.output_dir).name if multirun else None,
        "multirun": multirun,
    }


def run_job(cfg: DictConfig) -> float | None:
    """Run one job (one run folder); return final val_bpb for sweepers (None if it failed)."""
    from speedrun.launch import external_rank, launch, local_world_size

    info = _run_info(cfg)
    run_dir = Path(info["run_dir"])
    external = external_rank() is not None
    try:
        world_size = local_world_size(cfg.trainer.nproc_per_node)
        validate_config(cfg, world_size)
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        if not external or external_rank() == 0:
            _prepare_data(cfg)
        launch(config, info, nproc=world_size, external=external)
    except KeyboardInterrupt:
        _ensure_summary(run_dir, info, cfg, "interrupted", "interrupted by the user")
    except Exception as exc:  # noqa: BLE001 - every failure must end in summary.json, then re-raise
        message = _one_line(exc)
        log.error("error: %s", message)
        _ensure_summary(run_dir, info, cfg, "failed", message)
    summary = read_summary(run_dir)
    status = summary.get("status") if summary else "failed"
    if status != "completed" and not info["multirun"] and (not external or external_rank() == 0):
        # A single run reports failure through its exit code; in a sweep the other jobs go on
        # and the sweep-end callback lists the failures.
        sys.exit(1)
    return summary.get("val_bpb") if summary else None


def _prepare_data(cfg: DictConfig) -> None:
    """Build or verify the data once, in this process, before any rank starts."""
    from hydra.utils import instantiate

    data = instantiate(cfg.data)
    data.prepare()
    log.info("data: %s", data.describe())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _ensure_summary(run_dir: Path, info: dict, cfg: DictConfig, status: str, error: str) -> None:
    """Write summary.json for a job that ended before rank 0 could (keeping rank 0's if it did)."""
    existing = read_summary(run_dir)
    if existing and existing.get("status") not in (None, "running"):
        return
    write_summary(
        run_dir,
        {
            **(existing or {}),
            "status": status,
            "error": error,
            "seed": cfg.seed,
            "overrides": info["overrides"],
        },
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


def main() -> None:
    os.environ.setdefault("SPEEDRUN_ORIG_CWD", os.getcwd())
    register_configs()
    register_resolvers()
    sys.argv += _torchrun_overrides(sys.argv[1:])
    try:
        hydra_main()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
