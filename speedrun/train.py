"""`python -m speedrun.train [overrides]`: the Hydra entry point.

This process owns the config and the run folder. It validates the config, resolves it once
(so `${now:}` and friends cannot differ between ranks), prepares the data, launches the ranks,
makes sure `summary.json` exists whatever happened, and returns the objective for sweepers.
torch is imported only once a job really starts, so `--cfg job`, `--help` and config errors
answer instantly.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from speedrun.config import register_configs, validate_config
from speedrun.config.resolvers import register_resolvers
from speedrun.summary import error_message, read_summary, write_summary

log = logging.getLogger("speedrun")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# At import, not only in main(): a launcher plugin (submitit) unpickles `hydra_main` in a fresh
# process where main() never ran, and names the job's output folder there with these resolvers.
register_resolvers()


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
        # (Hydra's job logging is still set up from conf/config.yaml: run_job silences it.)
        extra += ["hydra.output_subdir=null", "hydra/hydra_logging=none"]
    return extra


def _run_info(cfg: DictConfig) -> dict:
    """Who this job is within a sweep: used for wandb group / job_type / name and summary.json."""
    hc = HydraConfig.get()
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    choices = dict(hc.runtime.choices)
    # The preset (`+sweep=lr`), else a search sweeper's config (`hydra/sweeper=optuna_lr`); a plain
    # `-m key=a,b` grid has neither.
    sweeper = choices.get("hydra/sweeper")
    preset = choices.get("sweep") or (sweeper if sweeper not in (None, "basic") else None)
    return {
        "run_dir": hc.runtime.output_dir,
        "overrides": list(hc.overrides.task),
        "sweep_dir_name": Path(hc.sweep.dir).name if multirun else None,
        "sweep_preset": preset if multirun else None,
        "job_name": Path(hc.runtime.output_dir).name if multirun else None,
        "multirun": multirun,
    }


def run_job(cfg: DictConfig) -> float:
    """Run one job (one run folder); return the final val_bpb for sweepers (+inf if it failed)."""
    from speedrun.launch import RankFailure, external_rank, launch, local_world_size
    from speedrun.slurm import adopt_submitit_task

    adopt_submitit_task()
    info = _run_info(cfg)
    run_dir = Path(info["run_dir"])
    external = external_rank() is not None
    if external and external_rank() != 0:
        _silence_logging()
    ended_early = False  # this job raised: whatever summary.json says, it did not complete
    try:
        world_size = local_world_size(cfg.trainer.nproc_per_node)
        validate_config(cfg, world_size)
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        info["resume"] = _choose_checkpoint(config, run_dir)
        if not external or external_rank() == 0:
            _prepare_data(cfg)
        launch(config, info, nproc=world_size, external=external)
    except KeyboardInterrupt:
        ended_early = True
        if not external or external_rank() == 0:
            _ensure_summary(run_dir, info, cfg, "interrupted", "interrupted by the user")
    except Exception as exc:  # noqa: BLE001 - every failure must end in summary.json, then re-raise
        ended_early = True
        # A failed rank's own error replaces rank 0's summary, which may only have seen its
        # collective break (or the launcher's SIGTERM) because of that rank.
        rank_failed = isinstance(exc, RankFailure)
        message = str(exc) if rank_failed else error_message(exc)
        if not external or external_rank() == 0:  # rank 0 alone writes summary.json
            _ensure_summary(run_dir, info, cfg, "failed", message, replace=rank_failed)
            # Under torchrun, rank 0's summary names the rank that failed first; so does its log.
            message = (read_summary(run_dir) or {}).get("error") or message
        log.error("error: %s", message)
    if external and external_rank() != 0:
        # Another rank of an external torchrun: a failure must show in this process's exit code,
        # so that torchrun stops the job and names this rank; rank 0 reports the rest.
        if ended_early and not info["multirun"]:
            sys.exit(1)
        return None
    summary = read_summary(run_dir)
    # A reused run folder may hold an earlier attempt's summary: it must not turn this failure into success.
    status = summary.get("status") if summary and not ended_early else "failed"
    if status != "completed" and not info["multirun"]:
        # A single run reports failure through its exit code; in a sweep the other jobs go on
        # and the sweep-end callback lists the failures.
        sys.exit(1)
    # Sweepers (Optuna) need a float for every job. A job that did not complete scores the worst
    # val_bpb, +inf, which also steers a search away from its learning rates; NaN would crash the
    # released Optuna sweeper (hydra-optuna-sweeper 1.2.0 re-tells the failed trial: hydra#2237).
    if status != "completed" or summary.get("val_bpb") is None:
        return math.inf
    return summary["val_bpb"]


def _silence_logging() -> None:
    """Ranks other than 0 of an external launch (torchrun, SLURM tasks) log nothing: Hydra set up its
    console and train.log handlers in every process. Warnings and errors still reach stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()


def _choose_checkpoint(config: dict, run_dir: Path) -> str:
    """The checkpoint this job continues from ("never" for a fresh start), chosen once here,
    before any rank starts or any file is written: a corrupt checkpoint is set aside with one
    warning, and a config that changes the run is refused in one line."""
    from speedrun.checkpoint import CheckpointManager, select_checkpoint

    tc = config["trainer"]
    manager = CheckpointManager(run_dir / "checkpoints")
    # mmap: only the config is read here; the ranks load the tensors, and rank 0 logs a forced resume.
    found = select_checkpoint(manager, str(tc["resume"]), config, tc["resume_force"], mmap=True, warn=False)
    return str(found[1]) if found else "never"


def _prepare_data(cfg: DictConfig) -> None:
    """Build or verify the data once, in this process, before any rank starts."""
    from hydra.utils import instantiate

    data = instantiate(cfg.data)
    data.prepare()
    log.info("data: %s", data.describe())


def _ensure_summary(
    run_dir: Path, info: dict, cfg: DictConfig, status: str, error: str, replace: bool = False
) -> None:
    """Write summary.json for a job that ended before rank 0 could (keeping rank 0's if it did,
    unless `replace`: then its status and error are overwritten, its measurements kept). Rank 0's
    `interrupted` always stands: all ranks agreed on that stop, so none of them had crashed."""
    existing = read_summary(run_dir)
    status_written = existing.get("status") if existing else None
    if status_written not in (None, "running") and (not replace or status_written == "interrupted"):
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
def hydra_main(cfg: DictConfig) -> float:
    return run_job(cfg)


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # Outside the training loop (start-up, export) SIGTERM acts as Ctrl-C, so a pre-empted job still
    # ends with summary.json saying `interrupted`; the loop installs its own finish-the-step handler.
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    os.environ.setdefault("SPEEDRUN_ORIG_CWD", os.getcwd())
    register_configs()
    sys.argv += _torchrun_overrides(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
