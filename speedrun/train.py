"""`python -m speedrun.train [overrides]`: the Hydra entry point.

This process owns the config and the run folder. Before Hydra starts, the command line is composed
and validated once (`precheck`): a config error is one `error:` line in a fraction of a second, and
no folder is made. Then, for each job (one, or each of a sweep), `run_job`:
1. takes the run folder (one live process per folder),
2. checks everything that can be checked before training (config with the real world size, data,
   the model's shapes, the checkpoint to resume) without writing anything: a refused attempt leaves
   the folder as it found it, save a line in `attempts.jsonl`,
3. writes the attempt's record (`.hydra/`, `train.log`), launches the ranks, and makes sure
   `summary.json` exists whatever happened,
4. prints the one command that resumes a run that stopped, and returns the objective for sweepers.
torch is imported only once a job really starts, so `--cfg job`, `--help` and config errors answer
instantly.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from speedrun.config import CONF_DIR, ConfigError, compose, register_configs, validate_config
from speedrun.config.resolvers import register_resolvers
from speedrun.run_folder import LogBuffer, RunFolder, RunFolderBusy, resume_command
from speedrun.signals import stop_as_interrupt
from speedrun.summary import error_message, one_line, read_summary, record_early_end

log = logging.getLogger("speedrun")

# At import, not only in main(): a launcher plugin (submitit) unpickles `hydra_main` in a fresh
# process where main() never ran, and names the job's output folder there with these resolvers.
register_resolvers()


class Refused(RuntimeError):
    """An attempt refused before training: nothing of the run folder's record is touched."""


class AlreadyCompleted(Exception):
    """The folder holds this very run, completed: there is nothing to do (a resumed sweep skips it)."""


def _torchrun_overrides(argv: list[str]) -> list[str]:
    """Extra Hydra overrides when an external `torchrun` started this process.

    Every rank runs this entry point; they must share one run folder (not one timestamped folder
    each), and only rank 0 writes the record and logs.
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
        extra.append("hydra/hydra_logging=none")
    return extra


def precheck(argv: list[str]) -> str | None:
    """Compose and validate what the command line asks for, before Hydra makes any folder; the error
    as one line, or None. A sweep is checked with the first value of each swept key (each job is
    checked again with its own values when it runs)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(argv)
    if (
        args.help
        or args.hydra_help
        or args.info
        or args.shell_completion
        or args.config_path
        or args.config_dir
    ):
        return None
    try:
        overrides = []
        for override in OverridesParser.create().parse_overrides(args.overrides):
            if not override.is_sweep_override():
                overrides.append(override.input_line)
                continue
            try:  # choice and range sweeps: check their first value; an interval's is the search's
                first = next(iter(override.sweep_string_iterator()))
                overrides.append(f"{override.get_key_element()}={first}")
            except Exception:  # noqa: BLE001 - a sweep that only its sweeper can enumerate
                continue
        cfg = _compose_or_explain(overrides, args.config_name or "config")
        nproc = str(cfg.trainer.nproc_per_node)
        world_size = int(nproc) if nproc.isdigit() else 1  # auto: 1 here, the GPU count once a job runs
        # Only printing the config (--cfg job): mandatory values may stay unset.
        validate_config(cfg, world_size, require_all=not args.cfg)
    except Exception as exc:  # noqa: BLE001 - any config error becomes its one line
        return one_line(exc)
    return None


def _compose_or_explain(overrides: list[str], config_name: str) -> DictConfig:
    """compose(), with Hydra's "Could not override 'a.b'" (a key no schema has) said as a fix."""
    import difflib
    import re

    try:
        return compose(overrides, config_name=config_name)
    except Exception as exc:
        unknown = re.match(r"Could not override '([^']+)'", str(exc))
        if not unknown:
            raise
        key = unknown.group(1)
        parent, _, leaf = key.rpartition(".")
        others = [o for o in overrides if not o.lstrip("+~").startswith(f"{key}=")]
        node = OmegaConf.select(compose(others, config_name=config_name), parent) if parent else None
        known = [str(k) for k in node] if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f"did you mean {parent}.{close[0]}?" if close else f"its settings are: {', '.join(known)}"
        raise ConfigError(f"{key} is not a setting of {parent or 'the config'}; {hint}") from None


def run_info(cfg: DictConfig) -> dict:
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


def run_job(cfg: DictConfig) -> float | None:
    """Run one job (one run folder); return the final val_bpb for sweepers (+inf if it did not complete)."""
    from speedrun.callbacks import SWEEP
    from speedrun.launch import external_rank
    from speedrun.slurm import adopt_submitit_task

    adopt_submitit_task()
    info = run_info(cfg)
    folder = RunFolder(info["run_dir"])
    rank0 = external_rank() in (None, 0)
    if not rank0:
        _silence_logging()
    if info["multirun"] and SWEEP.stopped:
        SWEEP.not_run.append(folder.path)  # the sweep was stopped: this job does not start
        return math.inf
    started = time.time()
    try:
        with folder.lock() if rank0 else _nothing():
            status = _attempt(cfg, info, folder, rank0, started)
    except RunFolderBusy as exc:
        log.error("error: %s", exc)
        status = "refused"
    if status == "interrupted" and info["multirun"]:
        SWEEP.stopped = "interrupted"  # Ctrl-C or SIGTERM stops the whole sweep, not only this job
    return _objective(folder, status, info, rank0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _attempt(cfg: DictConfig, info: dict, folder: RunFolder, rank0: bool, started: float) -> str:
    """Check, then (if accepted) run, one attempt; return how it ended."""
    try:
        with LogBuffer().attached() as checks_log:
            config = _check_before_training(cfg, info, folder, rank0)
    except AlreadyCompleted as done:
        log.info("%s", done)
        return "completed"
    except KeyboardInterrupt:
        return _refuse(
            folder, info, cfg, rank0, started, "interrupted", "interrupted before training started"
        )
    except Exception as exc:  # noqa: BLE001 - a refusal is one line; tracebacks of real bugs go to the log
        log.debug("refused", exc_info=True)
        return _refuse(folder, info, cfg, rank0, started, "failed", error_message(exc))
    if rank0:
        folder.write_hydra_record(cfg, _hydra_config(), info["overrides"])
    with folder.train_log(checks_log.records) if rank0 else _nothing():
        status, error = _launch(cfg, config, info, folder, rank0)
        if rank0:
            if status in ("interrupted", "failed") and (folder.path / "checkpoints").is_dir():
                log.warning("resume with: %s", resume_command(folder.path, info["overrides"]))
            folder.log_attempt(started, status, error)
    return status


def _check_before_training(cfg: DictConfig, info: dict, folder: RunFolder, rank0: bool) -> dict:
    """Everything that can fail before training, checked without writing anything; the resolved config."""
    from speedrun.launch import local_world_size
    from speedrun.preflight import check_model_vocab, choose_checkpoint, prepare_data

    validate_config(cfg)  # each job of a sweep with its own values (fast: no torch yet)
    world_size = local_world_size(cfg.trainer.nproc_per_node)
    validate_config(cfg, world_size)
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    data = prepare_data(cfg) if rank0 else None
    check_model_vocab(cfg, data)
    info["resume"], saved_config = choose_checkpoint(config, folder, cfg, log_forced=rank0)
    if saved_config == config and (read_summary(folder.path) or {}).get("status") == "completed":
        raise AlreadyCompleted(f"{folder.path} already holds this run, completed; nothing to do")
    if info["resume"] == "never" and folder.trained_before():
        raise Refused(
            f"{folder.path} holds an earlier run's results but no checkpoint to continue it from; a new run "
            "here would mix with them: use a new folder (hydra.run.dir=...)"
        )
    return config


def _refuse(folder: RunFolder, info: dict, cfg: DictConfig, rank0: bool, started: float, status: str,
            error: str) -> str:  # fmt: skip
    """An attempt that ended before training: its own error on the console; a folder holding an earlier
    attempt's record keeps it (this one goes to attempts.jsonl), a new folder gets this one's record."""
    log.error("error: %s", error)
    if not rank0:
        return status
    if not folder.trained_before():
        folder.write_hydra_record(cfg, _hydra_config(), info["overrides"])
        record_early_end(folder.path, status, error, seed=cfg.seed, overrides=info["overrides"], fresh=True)
    folder.log_attempt(started, status if status == "interrupted" else "refused", error)
    return status


def _launch(
    cfg: DictConfig, config: dict, info: dict, folder: RunFolder, rank0: bool
) -> tuple[str, str | None]:
    """Run the ranks; rank 0 makes sure summary.json says how it ended. (status, error)."""
    from speedrun.job import run_rank
    from speedrun.launch import RankFailure, external_rank, launch, local_world_size

    external = external_rank() is not None
    try:
        launch(run_rank, config, info, nproc=local_world_size(cfg.trainer.nproc_per_node), external=external)
    except KeyboardInterrupt:
        if rank0:
            record_early_end(folder.path, "interrupted", "interrupted by the user", seed=cfg.seed,
                             overrides=info["overrides"])  # fmt: skip
        return "interrupted", "interrupted by the user"
    except Exception as exc:  # noqa: BLE001 - every failure must end in summary.json
        # A failed rank's own error replaces rank 0's summary, which may only have seen its
        # collective break (or the launcher's SIGTERM) because of that rank.
        rank_failed = isinstance(exc, RankFailure)
        message = str(exc) if rank_failed else error_message(exc)
        if rank0:
            record_early_end(folder.path, "failed", message, seed=cfg.seed, overrides=info["overrides"],
                             replace=rank_failed)  # fmt: skip
            # Under torchrun, rank 0's summary names the rank that failed first; so does its log.
            message = (read_summary(folder.path) or {}).get("error") or message
        log.error("error: %s", message)
        return "failed", message
    summary = read_summary(folder.path) or {} if rank0 else {}
    return summary.get("status", "completed" if not rank0 else "failed"), summary.get("error")


def _objective(folder: RunFolder, status: str, info: dict, rank0: bool) -> float | None:
    """What the job returns to Hydra. A single run reports failure through its exit code; in a sweep
    the other jobs go on and the sweep-end report lists the failures."""
    from speedrun.launch import external_rank

    if external_rank() is not None and not rank0:
        # Another rank of an external torchrun: a failure must show in this process's exit code,
        # so that torchrun stops the job and names this rank; rank 0 reports the rest.
        if status != "completed" and not info["multirun"]:
            sys.exit(1)
        return None
    if status != "completed":
        if not info["multirun"]:
            sys.exit(130 if status == "interrupted" else 1)
        # Sweepers (Optuna) need a float for every job: a job that did not complete scores the worst,
        # +inf, which also steers a search away from it; NaN would crash the released Optuna sweeper
        # (hydra-optuna-sweeper 1.2.0 re-tells the failed trial: hydra#2237).
        return math.inf
    summary = read_summary(folder.path) or {}
    value = summary.get("val_bpb") if summary.get("val_bpb") is not None else summary.get("val_loss")
    return math.inf if value is None else value


def _hydra_config() -> DictConfig | None:
    return HydraConfig.get() if HydraConfig.initialized() else None


def _silence_logging() -> None:
    """Ranks other than 0 of an external launch (torchrun, SLURM tasks) log nothing: Hydra set up its
    console handler in every process. Warnings and errors still reach stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


def main() -> None:
    # Outside the training loop (start-up, export) SIGTERM acts as Ctrl-C, so a pre-empted job still
    # ends with summary.json saying `interrupted`; the loop installs its own finish-the-step handler.
    stop_as_interrupt()
    os.environ.setdefault("SPEEDRUN_ORIG_CWD", os.getcwd())
    register_configs()
    sys.argv += _torchrun_overrides(sys.argv[1:])
    if problem := precheck(sys.argv[1:]):
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
