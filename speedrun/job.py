"""What every rank runs: build the components from the resolved config, train, report.

Called in-process for one rank, or in each process the elastic launcher (or an external torchrun)
starts. Rank 0 alone writes logs, metrics, checkpoints, artifacts and `summary.json`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import random
import signal
import sys
import traceback
from pathlib import Path

from speedrun.launch import INTERNAL_LAUNCH_ENV

log = logging.getLogger("speedrun")


def _configure_rank_logging(run_dir: Path, rank: int) -> None:
    """A rank started by a launcher has no logging set up: rank 0 logs to stdout and train.log."""
    root = logging.getLogger()
    if root.handlers:  # in-process: Hydra already logs to stdout and train.log
        return
    root.setLevel(logging.INFO)
    if rank == 0:
        formatter = logging.Formatter("%(message)s")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "train.log")):
            handler.setFormatter(formatter)
            root.addHandler(handler)


def resolve_max_steps(trainer_cfg, flops_per_token: float, params: int) -> int | None:
    """The step horizon: max_steps, else nanochat's target FLOPs, else its data:param ratio."""
    batch = trainer_cfg["train_batch_tokens"]
    if trainer_cfg["max_steps"] > 0:
        return int(trainer_cfg["max_steps"])
    if trainer_cfg["target_flops"] > 0:
        return max(round(trainer_cfg["target_flops"] / (flops_per_token * batch)), 1)
    if trainer_cfg["target_param_data_ratio"] > 0:
        return max(int(trainer_cfg["target_param_data_ratio"] * params) // batch, 1)
    return None


def run_rank(config: dict, info: dict) -> dict | None:
    """Train on this rank; rank 0 returns (and writes) the summary."""
    run_dir = Path(info["run_dir"])
    rank = int(os.environ.get("RANK", "0"))
    _configure_rank_logging(run_dir, rank)
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        # Fewer fragmentation stalls on long runs (nanochat's setting); must precede CUDA init.
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    from speedrun.distributed import cleanup, init_distributed

    ctx = init_distributed(config["trainer"]["device"])
    # If _train raises, the process group is left to process exit: tearing it down here would break
    # the other ranks' collectives before the launcher has recorded this rank's error, hiding which
    # rank failed first; and NCCL's teardown can hang while a peer is dead.
    summary = _train(config, info, ctx, run_dir)
    cleanup(ctx)
    if summary["status"] == "interrupted" and os.environ.get(INTERNAL_LAUNCH_ENV):
        # A rank of our elastic launcher that returns waits for the launcher to collect every
        # rank's result, which a launcher shutting down on a signal never does: it would SIGKILL
        # the rank 30 s later. Stopped by a signal, the rank exits at once, as killed by SIGTERM.
        sys.exit(128 + signal.SIGTERM)
    return summary if ctx.is_main else None


def _log_failure(run_dir: Path, rank: int, exc: BaseException) -> None:
    """Any rank's traceback goes to train.log (the only file a non-zero rank ever writes)."""
    text = "".join(traceback.format_exception(exc))
    with open(run_dir / "train.log", "a") as f:
        f.write(f"[rank {rank}] {text}")
    if rank == 0:
        print(text, file=sys.stderr)


def _train(config: dict, info: dict, ctx, run_dir: Path) -> dict:
    """Build the trainer and fit; however the run ends, rank 0 reports it in summary.json."""
    from speedrun.distributed import first_failure
    from speedrun.summary import error_message
    from speedrun.trainer import signals_held

    trainer = None
    summary = {"status": "failed", "error": None}
    try:
        trainer = _build_trainer(config, info, ctx, run_dir)
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
    from speedrun.summary import write_summary

    summary.update(seed=int(config["seed"]), overrides=info["overrides"], world_size=ctx.world_size)
    summary.setdefault("error", None)
    if ctx.is_main:
        if sinks is not None:
            sinks.finish(summary)
        write_summary(run_dir, summary)
        log.info("summary: %s", run_dir / "summary.json")


def _build_trainer(config: dict, info: dict, ctx, run_dir: Path):
    """Every component from the resolved config, seeded, on this rank's device."""
    import numpy as np
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from speedrun.config.validate import parse_compile, split_batch
    from speedrun.sinks import build_sinks
    from speedrun.trainer import Trainer, TrainerSettings

    cfg = OmegaConf.create(config)
    tc = config["trainer"]
    seed = int(config["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    data = instantiate(cfg.data)
    model = instantiate(cfg.model).to(ctx.device)
    if ctx.device.type == "cuda":
        model.cast_for_cuda_training()
        # The reference's fast-math knobs: fp32 matmuls (outside autocast) may use TF32.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data.check_model_vocab(config["model"]["vocab_size"])
    seq_len = config["data"]["seq_len"]
    params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.flops_per_token(seq_len)
    max_steps = resolve_max_steps(tc, flops_per_token, params)
    max_wallclock_ms = 1000.0 * tc["max_wallclock_seconds"] if tc["max_wallclock_seconds"] > 0 else None
    grad_accum, micro_tokens = split_batch(
        tc["train_batch_tokens"], tc["micro_batch_tokens"], ctx.world_size, seq_len
    )

    compile_model = parse_compile(tc["compile"], ctx.device.type == "cuda")
    optimizer_factory = instantiate(cfg.optimizer)
    if "compile_newtonschulz" in inspect.signature(optimizer_factory.func).parameters:
        # Muon's Newton-Schulz is compiled whenever the model is (the reference compiles both).
        optimizer_factory = functools.partial(optimizer_factory, compile_newtonschulz=compile_model)
    optimizer = optimizer_factory(model)
    schedule = instantiate(cfg.schedule)(max_steps=max_steps, max_wallclock_ms=max_wallclock_ms)
    # run_job picked the checkpoint once, in the parent, for every rank (None when driven directly).
    resume = info.get("resume") or str(tc["resume"])
    settings = TrainerSettings(
        run_dir=run_dir, seq_len=seq_len, train_batch_tokens=tc["train_batch_tokens"],
        grad_accum_steps=grad_accum, micro_batch_tokens=micro_tokens, max_steps=max_steps,
        max_wallclock_ms=max_wallclock_ms, warmup_steps=tc["warmup_steps"], val_every=tc["val_every"],
        val_batch_tokens=tc["val_batch_tokens"], log_every=tc["log_every"],
        checkpoint_every=tc["checkpoint_every"], checkpoint_every_seconds=tc["checkpoint_every_seconds"],
        keep_checkpoints=tc["keep_checkpoints"], resume=resume, resume_force=tc["resume_force"],
        max_loss=tc["max_loss"], export=tc["export"], compile=compile_model,
    )  # fmt: skip
    if ctx.is_main:
        log.info("model_params:%d flops_per_token:%.3e", params, flops_per_token)
        log.info(
            "world_size:%d grad_accum_steps:%d micro_batch_tokens:%d",
            ctx.world_size,
            grad_accum,
            micro_tokens,
        )
        log.info(
            "train_batch_tokens:%d seq_len:%d max_steps:%s max_wallclock_seconds:%s device:%s compile:%s",
            tc["train_batch_tokens"], seq_len, max_steps, tc["max_wallclock_seconds"], ctx.device, settings.compile,
        )  # fmt: skip
    sinks = build_sinks(
        logger_cfg=config["logger"], run_dir=run_dir, config=config, run_info=info, is_rank0=ctx.is_main,
        total_steps=max_steps, max_wallclock_ms=max_wallclock_ms, log=log,
    )  # fmt: skip
    return Trainer(model, optimizer, schedule, data, sinks, settings, ctx, config, flops_per_token)
