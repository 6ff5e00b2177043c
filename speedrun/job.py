"""What every rank runs: build the components from the resolved config, train, report.

Called in-process for one rank, or in each process the elastic launcher (or an external torchrun)
starts. Rank 0 alone writes logs, metrics, checkpoints, artifacts and `summary.json`. This is the
one place that turns config into components (lightning-hydra-template's `train()`): everything
after it (the trainer, the sinks) receives built objects.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import traceback
from pathlib import Path

from speedrun.launch import launched_internally

log = logging.getLogger("speedrun")


def _configure_rank_logging(run_dir: Path, rank: int) -> None:
    """A rank started by a launcher has no logging set up: rank 0 logs to stdout and train.log."""
    root = logging.getLogger()
    if root.handlers:  # in-process: the entry point already logs to stdout and train.log
        return
    root.setLevel(logging.INFO)
    if rank == 0:
        formatter = logging.Formatter("%(message)s")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "train.log")):
            handler.setFormatter(formatter)
            root.addHandler(handler)


def resolve_max_steps(trainer_cfg, flops_per_token: float, scaling_params: int) -> int | None:
    """The step horizon: max_steps, else nanochat's target FLOPs, else its data:param ratio, which counts
    nanochat's "scaling parameters": the weights of the `matrix` and `head` roles (embedding lookups
    and scalars excluded; see `_plan`)."""
    batch = trainer_cfg.train_batch_tokens
    if trainer_cfg.max_steps > 0:
        return int(trainer_cfg.max_steps)
    if trainer_cfg.target_flops > 0:
        return max(round(trainer_cfg.target_flops / (flops_per_token * batch)), 1)
    if trainer_cfg.target_param_data_ratio > 0:
        return max(int(trainer_cfg.target_param_data_ratio * scaling_params) // batch, 1)
    return None


def run_rank(config: dict, info: dict) -> dict | None:
    """Train on this rank; rank 0 returns (and writes) the summary.

    `info` holds `run_dir` and `overrides` (and, from the entry point, `resume` and the sweep names);
    called directly it runs the whole job in this process, as one rank (see the README's Python section).
    """
    run_dir = Path(info["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    _configure_rank_logging(run_dir, rank)
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        # Fewer fragmentation stalls on long runs (nanochat's setting); must precede CUDA init.
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    from speedrun.distributed import cleanup, init_distributed
    from speedrun.signals import exit_as_signalled

    ctx = init_distributed(config["trainer"]["device"])
    # If _train raises, the process group is left to process exit: tearing it down here would break
    # the other ranks' collectives before the launcher has recorded this rank's error, hiding which
    # rank failed first; and NCCL's teardown can hang while a peer is dead.
    summary = _train(config, info, ctx, run_dir)
    cleanup(ctx)
    if summary["status"] == "interrupted" and launched_internally():
        exit_as_signalled()
    return summary if ctx.is_main else None


def _log_failure(run_dir: Path, rank: int, exc: BaseException) -> None:
    """Any rank's traceback goes to train.log (the only file a non-zero rank ever writes)."""
    text = "".join(traceback.format_exception(exc))
    with open(run_dir / "train.log", "a") as f:
        f.write(f"[rank {rank}] {text}")


def _train(config: dict, info: dict, ctx, run_dir: Path) -> dict:
    """Build the trainer and fit; however the run ends, rank 0 reports it in summary.json."""
    from speedrun.distributed import first_failure
    from speedrun.signals import signals_held
    from speedrun.summary import error_message

    trainer = None
    summary = {"status": "failed", "error": None}
    try:
        trainer = build_trainer(config, info, ctx, run_dir)
        summary = trainer.fit()
    except BaseException as exc:
        with signals_held():
            summary["error"] = error_message(exc)
            if isinstance(exc, KeyboardInterrupt):
                summary["status"] = "interrupted"
            else:
                # Rank 0 reports the rank that failed first (maybe itself), not its own broken collective.
                summary["error"] = first_failure(ctx, summary["error"])
                _log_failure(run_dir, ctx.rank, exc)
            _report(summary, config, info, ctx, run_dir, trainer.sinks if trainer else None)
        raise
    _report(summary, config, info, ctx, run_dir, trainer.sinks)
    return summary


def _report(summary: dict, config: dict, info: dict, ctx, run_dir: Path, sinks) -> None:
    from speedrun.summary import record_end

    summary.setdefault("world_size", ctx.world_size)
    if ctx.is_main:
        summary["provenance"] = info.get("provenance")
        summary["rules"] = _check_rules(config, summary)
        if sinks is not None:
            sinks.finish({**summary, "seed": int(config["seed"])})
        record_end(run_dir, summary, seed=int(config["seed"]), overrides=info["overrides"])
        log.info("summary: %s", run_dir / "summary.json")


def _checked_instance(node):
    """instantiate(node), raising the constructor's own error: it names the key and the fix, while
    Hydra's InstantiationException wrapping it would make the run's one error line say only
    "Error in call to target"."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as e:
        raise (e.__cause__ or e) from None


def _check_rules(config: dict, summary: dict) -> dict | None:
    """summary.json's `rules` block (null without a track); the console names each failed check."""
    from speedrun.rules import failure_lines

    if config.get("rules") is None:
        return None
    block = _checked_instance(config["rules"]).check(summary, config)
    log.info("rules %s: %s", block["preset"], "pass" if block["pass"] else "FAIL")
    for line in failure_lines(block):
        log.warning("rules %s: %s", block["preset"], line)
    return block


def build_trainer(config: dict, info: dict, ctx, run_dir: Path):
    """Every component from the resolved config, seeded, on this rank's device, handed to a Trainer."""
    import numpy as np
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from speedrun.config.schema import TrainerConfig
    from speedrun.models import protocol
    from speedrun.provenance import collect_provenance, provenance_lines
    from speedrun.sinks import build_sinks
    from speedrun.trainer import Trainer

    cfg = OmegaConf.create(config)
    settings = TrainerConfig(**config["trainer"])
    seed = int(config["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    data = instantiate(cfg.data)
    if ctx.is_main:  # rank 0 only: it alone reports, and git and hashing are not free
        info["provenance"] = collect_provenance(data, ctx.device, ctx.world_size)
        for line in provenance_lines(info["provenance"]):
            log.info(line)
    artifact_format = _checked_instance(cfg.export) if cfg.get("export") is not None else None
    model = instantiate(cfg.model).to(ctx.device)
    plan = _plan(config, info, settings, ctx, run_dir, model)
    if plan.autocast_dtype is not None:
        protocol.cast_for_mixed_precision(model)
    if ctx.device.type == "cuda":
        # The reference's fast-math knobs: fp32 matmuls (outside autocast) may use TF32.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config["model"].get("vocab_size") is not None:
        data.check_model_vocab(config["model"]["vocab_size"])
    optimizer = instantiate(cfg.optimizer)(protocol.parameter_groups(model))
    if callable(getattr(optimizer, "set_horizon", None)):
        optimizer.set_horizon(plan.max_steps)  # for schedules the optimizer owns (nanochat's weight decay)
    schedule = instantiate(cfg.schedule)(max_steps=plan.max_steps, max_wallclock_ms=plan.max_wallclock_ms)
    if ctx.is_main:
        _log_plan(plan, settings, ctx, model)
    sinks = build_sinks(
        logger_factory=instantiate(cfg.logger) if cfg.logger is not None else None, run_dir=run_dir,
        # The logger's config carries the provenance; the trainer's (saved in checkpoints) does not, so
        # a resume compares only what changes the numbers.
        config={**config, "provenance": info.get("provenance")}, run_info=info, is_rank0=ctx.is_main,
        total_steps=plan.max_steps, max_wallclock_ms=plan.max_wallclock_ms,
        tokens_per_step=settings.train_batch_tokens, log=log,
    )  # fmt: skip
    return Trainer(model, optimizer, schedule, data, sinks, ctx, settings, plan, config, artifact_format)


def _plan(config: dict, info: dict, settings, ctx, run_dir: Path, model):
    """The RunPlan: this rank's batch split, horizon, precision and the checkpoint to resume from."""
    import torch

    from speedrun.config.validate import parse_compile, split_batch
    from speedrun.models import protocol
    from speedrun.trainer import RunPlan

    seq_len = config["data"]["seq_len"]
    flops_per_token = protocol.flops_per_token(model, seq_len)
    counts = protocol.parameter_counts(model)
    grad_accum, micro_tokens = split_batch(
        settings.train_batch_tokens, settings.micro_batch_tokens, ctx.world_size, seq_len
    )
    precision = settings.precision
    bf16 = precision == "bf16" or (precision == "auto" and ctx.device.type == "cuda")
    resume = info.get("resume", "never")  # the parent chose it (train.py), the same for every rank
    return RunPlan(
        run_dir=run_dir, seq_len=seq_len, grad_accum_steps=grad_accum, micro_batch_tokens=micro_tokens,
        max_steps=resolve_max_steps(settings, flops_per_token, counts["matrix"] + counts["head"]),
        max_wallclock_ms=1000.0 * settings.max_wallclock_seconds if settings.max_wallclock_seconds > 0 else None,
        compile=parse_compile(settings.compile, ctx.device.type == "cuda"),
        autocast_dtype=torch.bfloat16 if bf16 else None, flops_per_token=flops_per_token,
        resume_from=None if resume == "never" else Path(resume),
    )  # fmt: skip


def _log_plan(plan, settings, ctx, model) -> None:
    from speedrun.models.protocol import parameter_counts

    counts = parameter_counts(model)
    log.info(
        "model_params:%d (embed %d, head %d, matrix %d, scalar %d) flops_per_token:%.3e",
        counts["total"], counts["embed"], counts["head"], counts["matrix"], counts["scalar"], plan.flops_per_token,
    )  # fmt: skip
    log.info(
        "world_size:%d grad_accum_steps:%d micro_batch_tokens:%d",
        ctx.world_size, plan.grad_accum_steps, plan.micro_batch_tokens,
    )  # fmt: skip
    log.info(
        "train_batch_tokens:%d seq_len:%d max_steps:%s max_wallclock_seconds:%s device:%s compile:%s precision:%s",
        settings.train_batch_tokens, plan.seq_len, plan.max_steps, settings.max_wallclock_seconds, ctx.device,
        plan.compile, "bf16" if plan.autocast_dtype is not None else "fp32",
    )  # fmt: skip
    # A job given its own share of the machine (hydra/launcher=parallel) says which.
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < (os.cpu_count() or len(cpus)):
        log.info("devices: CPUs %s", ",".join(map(str, cpus)))
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        log.info("devices: CUDA_VISIBLE_DEVICES=%s", os.environ["CUDA_VISIBLE_DEVICES"])
