"""The training loop and nothing else.

The trainer receives built components (model, optimizer, schedule, data source, sinks), the
`TrainerConfig` and the plan derived from it for this rank (`RunPlan`); it knows nothing of Hydra,
so it can be driven from Python. Its loop follows the reference train_gpt.py: validation at step 0,
every `val_every` steps and at the end; a wallclock cap measured on training time only; gradient
accumulation to a global batch fixed in tokens. The loss is read back from the device only when it
is logged, so the hot loop has no per-step host-device sync on GPU.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from speedrun import distributed as dist_utils
from speedrun.checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state
from speedrun.config.schema import TrainerConfig
from speedrun.distributed import DistContext
from speedrun.eval import Evaluation, evaluate
from speedrun.export import ArtifactFormat, load_artifact
from speedrun.flops import mfu
from speedrun.models.protocol import parameter_counts, parameter_roles, set_progress
from speedrun.samples import build_sampler, sample_log_lines
from speedrun.signals import StopRequest

log = logging.getLogger("speedrun")


@dataclass(frozen=True)
class RunPlan:
    """What this rank derives from the config before training: nothing here repeats a config key."""

    run_dir: Path
    seq_len: int
    grad_accum_steps: int
    micro_batch_tokens: int  # per rank, per micro-step
    max_steps: int | None  # the step horizon (max_steps, or from target FLOPs / data ratio)
    max_wallclock_ms: float | None
    compile: bool
    autocast_dtype: torch.dtype | None  # bf16 mixed precision, or None for plain fp32
    flops_per_token: float | None = None
    resume_from: Path | None = None  # the checkpoint to continue from, chosen by the caller


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timestamp taken next charges it to the right side."""
    if device.type == "cuda":
        torch.cuda.synchronize()


class TrainingClock:
    """Training time in ms, evaluation and checkpoints excluded: it runs between start() and pause().

    Both synchronise the device, so queued GPU work is charged to the right side; `elapsed_ms()`
    reads the host clock only, so the hot loop never waits for the GPU to ask the time.
    """

    def __init__(self, device: torch.device, used_ms: float = 0.0):
        self.device = device
        self.used_ms = used_ms
        self._started: float | None = None

    def start(self) -> None:
        synchronize(self.device)
        self._started = time.perf_counter()

    def pause(self) -> None:
        synchronize(self.device)
        self.used_ms = self.elapsed_ms()
        self._started = None

    def elapsed_ms(self) -> float:
        running = 0.0 if self._started is None else time.perf_counter() - self._started
        return self.used_ms + 1000.0 * running


@dataclass
class LoopWatch:
    """What the loop tracks between steps (none of it needed to resume)."""

    outcome: dict
    stopping: bool  # the wallclock cap was reached: the next iteration is the last
    log_time_ms: float  # training time and step of the previous train log line
    log_step: int
    checkpoint_wall: float  # time.monotonic() of the previous checkpoint
    last_finite: tuple[int, float] | None = None  # (step, loss) of the last loss within bounds
    warned: bool = False


class Trainer:
    def __init__(self, model: nn.Module, optimizer, schedule, data, sinks, ctx: DistContext,
                 settings: TrainerConfig, plan: RunPlan, config: dict,
                 artifact_format: ArtifactFormat | None = None):  # fmt: skip
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.data = data
        self.sinks = sinks
        self.ctx = ctx
        self.settings = settings
        self.plan = plan
        self.config = config  # saved in checkpoints, so a resume can tell what changed
        self.artifact_format = artifact_format or ArtifactFormat()  # the reference's int8 + zlib
        self.device = ctx.device
        self.checkpoints = CheckpointManager(plan.run_dir / "checkpoints", settings.keep_checkpoints)
        self.stop = StopRequest()
        # The schedule scales each param group's starting learning rate (torch's `initial_lr`).
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        # Loop state, all of it saved in checkpoints.
        self.step = 0
        self.clock = TrainingClock(self.device)
        self.records_logged = 0
        self.min_val_bpb = math.inf
        self.last_val: Evaluation | None = None
        self.sampler = None  # rank 0's, when trainer.sample_every is on (set up in fit)
        self.checkpointed_step = -1  # the step of the newest checkpoint on disk, so none is written twice

    # ------------------------------------------------------------------ set-up

    def _wrap(self) -> tuple[nn.Module, nn.Module]:
        """(model for training steps, model for evaluation): compiled, then DDP when distributed."""
        forward_model = self.model
        if self.plan.compile:
            forward_model = torch.compile(self.model, dynamic=False, fullgraph=True)
        train_model = forward_model
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            device_ids = [self.ctx.local_rank] if self.device.type == "cuda" else None
            # The buffers (rotary caches) are the same on every rank: no broadcast each forward.
            # Torch 2.13 renamed the flag (forward_sync_buffers); the old name works on every
            # supported torch (>= 2.5), so its deprecation notice is silenced rather than followed.
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning
                )
                train_model = DDP(forward_model, device_ids=device_ids, broadcast_buffers=False)
        return train_model, forward_model

    def _autocast(self):
        if self.plan.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.plan.autocast_dtype)

    # ------------------------------------------------------------------ steps

    def _set_learning_rates(self, step: int, elapsed_ms: float) -> None:
        scale = self.schedule.lr_scale(step, elapsed_ms)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * scale

    def _tell_progress(self, step: int, elapsed_ms: float) -> None:
        """The model's optional view of the horizon (models/protocol.py): steps or time, the further along."""
        done = [step / self.plan.max_steps] if self.plan.max_steps else []
        done += [elapsed_ms / self.plan.max_wallclock_ms] if self.plan.max_wallclock_ms else []
        set_progress(self.model, min(max(done, default=0.0), 1.0))

    def _train_step(self, train_model: nn.Module, loader, step: int, elapsed_ms: float) -> torch.Tensor:
        """One optimizer step over the whole global batch; returns the mean loss (on device)."""
        self._set_learning_rates(step, elapsed_ms)
        self._tell_progress(step, elapsed_ms)
        accum = self.plan.grad_accum_steps
        train_loss = torch.zeros((), device=self.device)
        for micro_step in range(accum):
            if self.ctx.distributed:
                # Gradients are all-reduced once, on the last micro-step.
                train_model.require_backward_grad_sync = micro_step == accum - 1
            x, y = loader.next_batch(self.plan.micro_batch_tokens)
            with self._autocast():
                loss = train_model(x, y)
            train_loss += loss.detach()
            (loss / accum).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return train_loss / accum

    def _warmup(self, train_model: nn.Module, loader) -> None:
        """Untimed steps that compile and warm every kernel, then restore the initial state so
        measured training starts from the true initialisation (as the reference)."""
        initial_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        initial_optim = copy.deepcopy(self.optimizer.state_dict())
        initial_loader = loader.state_dict()
        for i in range(self.settings.warmup_steps):
            self._train_step(train_model, loader, 0, 0.0)
            log.info("warmup_step:%d/%d", i + 1, self.settings.warmup_steps)
        self.model.load_state_dict(initial_model, strict=True)
        self.optimizer.load_state_dict(initial_optim)
        self.optimizer.zero_grad(set_to_none=True)
        loader.load_state_dict(initial_loader)

    def _evaluate(self, eval_model: nn.Module, val_tokens, luts) -> Evaluation:
        """Windows of trainer.val_seq_len (0: data.seq_len) advancing by trainer.val_stride (0: no overlap)."""
        self._tell_progress(self.step, self.clock.elapsed_ms())
        seq_len = self.settings.val_seq_len or self.plan.seq_len
        per_rank_batch = self.settings.val_batch_tokens // (self.ctx.world_size * self.plan.grad_accum_steps)
        per_rank_batch = max(per_rank_batch // seq_len, 1) * seq_len
        return evaluate(
            eval_model, val_tokens, luts, seq_len=seq_len, stride=self.settings.val_stride or seq_len,
            batch_tokens=per_rank_batch, rank=self.ctx.rank, world_size=self.ctx.world_size,
            device=self.device, autocast_dtype=self.plan.autocast_dtype,
        )  # fmt: skip

    def _validate(self, eval_model: nn.Module, val_tokens, luts) -> None:
        self.last_val = result = self._evaluate(eval_model, val_tokens, luts)
        if result.bpb is not None:
            self.min_val_bpb = min(self.min_val_bpb, result.bpb)
        self._record(
            {"val/loss": result.loss, "val/bpb": result.bpb, "val/time_ms": round(result.time_ms, 3)}
        )

    def _samples_due(self) -> bool:
        every = self.settings.sample_every
        return every > 0 and self.step > 0 and self.step % every == 0

    def _write_samples(self) -> None:
        """Rank 0 writes the samples (log, metrics.jsonl, wandb); the other ranks wait, their clocks
        paused as rank 0's is, so that every rank counts the same training time."""
        if self.sampler is not None:
            with self._autocast():
                rows = self.sampler.samples()
            for line in sample_log_lines(self.step, rows):
                log.info(line)
            self._record({"samples": rows})
        dist_utils.barrier(self.ctx)

    # ------------------------------------------------------------------ logging

    def _record(self, metrics: dict, train_time_ms: float | None = None) -> None:
        record = {
            "step": self.step,
            "tokens": self.step * self.settings.train_batch_tokens,
            "train_time_ms": round(self.clock.elapsed_ms() if train_time_ms is None else train_time_ms, 3),
            **metrics,
        }
        self.sinks.log(record)
        self.records_logged += 1

    def _mfu(self, tok_per_sec: float) -> float | None:
        if self.plan.flops_per_token is None or self.device.type != "cuda":
            return None
        return mfu(
            tok_per_sec,
            self.plan.flops_per_token,
            self.ctx.world_size,
            torch.cuda.get_device_name(self.device),
        )

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_state(self, loader) -> dict:
        return {
            "step": self.step,
            "train_time_ms": self.clock.used_ms,
            "records_logged": self.records_logged,
            "min_val_bpb": self.min_val_bpb,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": loader.state_dict(),
            "rng": rng_state(),
            "config": self.config,
        }

    def _save_checkpoint(self, loader) -> None:
        """Rank 0 writes; a failed write (disk full, quota, permissions) costs a warning and
        training goes on: the previous checkpoint is untouched and still resumes the run."""
        if self.checkpointed_step == self.step:
            return
        self.checkpointed_step = self.step
        if not self.ctx.is_main:
            return
        try:
            path = self.checkpoints.save(self._checkpoint_state(loader))
            log.info("checkpoint: %s", path)
        except OSError as exc:
            reason = " ".join(str(exc).split())[:200]
            previous = self.checkpoints.paths()
            log.warning(
                "warning: checkpoint at step %d failed (%s: %s); training goes on and %s; "
                "free space or fix permissions in %s",
                self.step, type(exc).__name__, reason,
                f"{previous[0].name} is still the newest" if previous else "there is no checkpoint yet",
                self.checkpoints.folder,
            )  # fmt: skip

    def _resume(self, loader) -> None:
        """Continue from `plan.resume_from` (chosen by the caller, see checkpoint.select_checkpoint), and
        cut metrics.jsonl back to the records written before it, so it holds exactly this run's history
        (an empty file on a fresh start in a reused folder)."""
        if self.plan.resume_from is not None:
            state = load_checkpoint(self.plan.resume_from)
            self.model.load_state_dict(state["model"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
            loader.load_state_dict(state["loader"])
            set_rng_state(state["rng"])
            self.step = self.checkpointed_step = int(state["step"])
            self.clock.used_ms = float(state["train_time_ms"])
            self.records_logged = int(state["records_logged"])
            self.min_val_bpb = float(state["min_val_bpb"])
            log.info(
                "resumed from %s at step %d (%.0f ms of training used)",
                self.plan.resume_from, self.step, self.clock.used_ms,
            )  # fmt: skip
        if self.ctx.is_main:
            truncate_lines(self.plan.run_dir / "metrics.jsonl", self.records_logged)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train, evaluate, export; return the summary fields this run knows."""
        train_model, eval_model = self._wrap()
        val_tokens = self.data.load_val_tokens()
        luts = self.data.byte_luts(self.device)
        loader = self.data.train_loader(self.ctx.rank, self.ctx.world_size, self.device)
        self.model.train()
        if self.settings.sample_every > 0 and self.ctx.is_main:
            s = self.settings
            self.sampler = build_sampler(self.model, self.data.tokenizer(), s.sample_prompts, s.sample_tokens,
                                         s.sample_temperature, seed=int(self.config.get("seed", 0)))  # fmt: skip
        if self.settings.warmup_steps:
            self._warmup(train_model, loader)
        self._resume(loader)
        # Everything allocated so far lives until the end: keep the collector from rescanning it.
        gc.collect()
        gc.freeze()
        try:
            # A stop signal during the final validation or the export is honoured too (_finish).
            with self.stop.installed():
                outcome = self._loop(train_model, eval_model, loader, val_tokens, luts)
                return self._finish(outcome, eval_model, val_tokens, luts)
        finally:
            # Collectable again once the loop ends: a sweep runs job after job in one process, and
            # the model's DDP wrapper must be freed before its process group is destroyed (cleanup).
            gc.unfreeze()

    def _loop(self, train_model, eval_model, loader, val_tokens, luts) -> dict:
        """Validate, step, log, agree on stopping, checkpoint; return how the loop ended."""
        plan, clock = self.plan, self.clock
        watch = LoopWatch(
            outcome={"status": "completed"},
            # A resumed run counts the training time already used: past the cap it only finishes.
            stopping=plan.max_wallclock_ms is not None and clock.used_ms >= plan.max_wallclock_ms,
            log_time_ms=clock.used_ms,
            log_step=self.step,
            checkpoint_wall=time.monotonic(),
        )
        clock.start()
        while True:
            if watch.stopping or (plan.max_steps is not None and self.step >= plan.max_steps):
                self._end_of_training(eval_model, loader, val_tokens, luts)
                return watch.outcome
            if self._evaluate_between_steps(eval_model, loader, val_tokens, luts):
                return {**watch.outcome, "stopped_at_target": True}
            train_loss = self._train_step(train_model, loader, self.step, clock.elapsed_ms())
            self.step += 1
            elapsed_ms = clock.elapsed_ms()
            self._warn_about_schedule_once(watch, elapsed_ms)
            self._observe_loss(watch, train_loss, elapsed_ms)
            cap_reached, signalled, diverged = dist_utils.any_rank(self.ctx, [
                plan.max_wallclock_ms is not None and elapsed_ms >= plan.max_wallclock_ms,
                self.stop.signal_name is not None,
                watch.outcome["status"] == "diverged",
            ])  # fmt: skip
            if diverged:
                # Stop before any checkpoint: the weights of this step may already be ruined.
                clock.pause()
                if watch.outcome["status"] != "diverged":  # another rank saw it first
                    watch.outcome = self._diverged(None, watch.last_finite)
                log.error("error: %s", watch.outcome["error"])
                return watch.outcome
            if signalled:
                clock.pause()
                self._save_checkpoint(loader)
                return {**watch.outcome, **self._interrupted()}
            if self._checkpoint_due(watch):
                clock.pause()
                self._save_checkpoint(loader)
                watch.checkpoint_wall = time.monotonic()
                clock.start()
            if cap_reached and not watch.stopping:
                watch.stopping = True
                log.info("stopping_early: wallclock_cap train_time:%.0fms step:%d", elapsed_ms, self.step)

    def _end_of_training(self, eval_model, loader, val_tokens, luts) -> None:
        """The end checkpoint precedes the final validation, so resuming a finished run repeats only
        that validation and the export, and rewrites the same files."""
        self.clock.pause()
        self._save_checkpoint(loader)
        self._validate(eval_model, val_tokens, luts)
        if self.settings.sample_every > 0:
            self._write_samples()

    def _evaluate_between_steps(self, eval_model, loader, val_tokens, luts) -> bool:
        """The validation and samples due at this step, off the training clock; True when the validation
        reached trainer.target_value (stop_at_target: the checkpoint is then written and training ends)."""
        if self._validation_due():
            self.clock.pause()
            self._validate(eval_model, val_tokens, luts)
            if self._target_reached():
                self._save_checkpoint(loader)
                return True
            self.clock.start()
        if self._samples_due():
            self.clock.pause()
            self._write_samples()
            self.clock.start()
        return False

    def _target_metric(self) -> float | None:
        """The latest validation's value of trainer.target_metric (val_loss or val_bpb)."""
        if self.last_val is None:
            return None
        return self.last_val.loss if self.settings.target_metric == "val_loss" else self.last_val.bpb

    def _target_reached(self) -> bool:
        """stop_at_target is on and the latest validation reached the target (all ranks agree: the
        validation metric is reduced over every rank)."""
        metric = self._target_metric()
        if not self.settings.stop_at_target or metric is None or metric > self.settings.target_value:
            return False
        log.info(
            "stopping_early: target %s:%.4f <= %g step:%d train_time:%.0fms",
            self.settings.target_metric, metric, self.settings.target_value, self.step, self.clock.used_ms,
        )  # fmt: skip
        return True

    def _validation_due(self) -> bool:
        """Every val_every steps; with stop_at_target, also every target_val_every steps once the metric
        is within target_margin of the target, so the stop lands close to where it is first reached."""
        s = self.settings
        if s.val_every > 0 and self.step % s.val_every == 0:
            return True
        metric = self._target_metric()
        near = s.stop_at_target and metric is not None and metric <= s.target_value + s.target_margin
        return near and s.target_val_every > 0 and self.step % s.target_val_every == 0

    def _warn_about_schedule_once(self, watch: LoopWatch, elapsed_ms: float) -> None:
        """The schedule's own check of how it fits this hardware, once the step time is known."""
        if not watch.warned and self.step == 10:
            watch.warned = True
            if message := self.schedule.warning(self.step, elapsed_ms):
                log.warning("warning: %s", message)

    def _observe_loss(self, watch: LoopWatch, train_loss: torch.Tensor, elapsed_ms: float) -> None:
        """Read the loss back when it is logged (every step on CPU, where that is free), watch it for
        divergence, log it, and show progress."""
        s = self.settings
        should_log = s.log_every > 0 and (self.step <= 10 or self.step % s.log_every == 0)
        loss_value = None
        if should_log or self.device.type == "cpu":
            if should_log:
                # Log the global batch's loss, not rank 0's share of it, so N ranks log what
                # 1 rank does (the reference logs rank 0's share). All ranks agree on should_log.
                train_loss = dist_utils.mean_over_ranks(self.ctx, train_loss)
            loss_value = train_loss.item()
            if math.isfinite(loss_value) and not (s.max_loss > 0 and loss_value > s.max_loss):
                watch.last_finite = (self.step, loss_value)
            elif watch.outcome["status"] != "diverged":
                watch.outcome = self._diverged(loss_value, watch.last_finite)
        if should_log:
            interval_ms = max(elapsed_ms - watch.log_time_ms, 1e-9)
            steps = max(self.step - watch.log_step, 1)
            tok_per_sec = steps * s.train_batch_tokens / (interval_ms / 1000.0)
            self._record({
                "train/loss": loss_value,
                "train/tok_per_sec": tok_per_sec,
                "train/mfu": self._mfu(tok_per_sec),
                "lr_scale": self.schedule.lr_scale(self.step, elapsed_ms),
                "step_ms": interval_ms / steps,
            }, train_time_ms=elapsed_ms)  # fmt: skip
            watch.log_time_ms, watch.log_step = elapsed_ms, self.step
        self.sinks.progress(self.step, elapsed_ms, loss_value)

    def _checkpoint_due(self, watch: LoopWatch) -> bool:
        s = self.settings
        by_steps = s.checkpoint_every > 0 and self.step % s.checkpoint_every == 0
        by_time = (
            s.checkpoint_every_seconds > 0
            and time.monotonic() - watch.checkpoint_wall >= s.checkpoint_every_seconds
        )
        return by_steps or by_time

    def _interrupted(self) -> dict:
        name = self.stop.signal_name or "a signal on another rank"
        log.warning("interrupted at step %d by %s", self.step, name)
        return {"status": "interrupted", "error": f"interrupted by {name} at step {self.step}"}

    def _diverged(self, loss: float | None, last_finite: tuple[int, float] | None) -> dict:
        """The summary fields of a diverged run: where, with what loss, and the last good one."""
        last_step, last_loss = last_finite if last_finite else (None, None)
        if loss is not None and math.isfinite(loss):
            what = f"loss {loss:.4f} exceeds trainer.max_loss={self.settings.max_loss}"
        else:
            what = f"loss is {loss if loss is not None else 'non-finite on another rank'}"
        last = "none finite before"
        if last_finite:
            last = f"last finite loss {last_loss:.4f} at step {last_step}"
        message = (
            f"diverged at step {self.step}: {what} ({last}); "
            "lower the learning rates (optimizer.*_lr) or raise trainer.max_loss"
        )
        return {
            "status": "diverged", "diverged_step": self.step, "diverged_loss": loss,
            "last_finite_step": last_step, "last_finite_loss": last_loss, "error": message,
        }  # fmt: skip

    # ------------------------------------------------------------------ the end

    def _finish(self, outcome: dict, eval_model, val_tokens, luts) -> dict:
        steps = self.step
        train_time_ms = self.clock.used_ms
        tokens_seen = steps * self.settings.train_batch_tokens
        tok_per_sec = tokens_seen / (train_time_ms / 1000.0) if train_time_ms > 0 else None
        summary = {
            **outcome,
            "val_loss": self.last_val.loss if self.last_val else None,
            "val_bpb": self.last_val.bpb if self.last_val else None,
            "min_val_bpb": self.min_val_bpb if math.isfinite(self.min_val_bpb) else None,
            "params": sum(p.numel() for p in self.model.parameters()),
            "params_by_role": {k: v for k, v in parameter_counts(self.model).items() if k != "total"},
            "steps": steps,
            "tokens_seen": tokens_seen,
            "train_time_ms": round(train_time_ms, 3),
            "step_avg_ms": train_time_ms / steps if steps else None,
            "tok_per_sec": tok_per_sec,
            "mfu": self._mfu(tok_per_sec) if tok_per_sec else None,
            "peak_mem_mib": peak_memory_mib(self.device),
            "world_size": self.ctx.world_size,
            # The final validation: its wall time (the tracks' evaluation-time limit) and what it scored.
            "eval_time_ms": round(self.last_val.time_ms, 3) if self.last_val else None,
            "val_tokens_scored": self.last_val.tokens if self.last_val else None,
            # The submission's code size does not need an artifact (speedrun.export.code_bytes).
            "code_bytes": self.artifact_format.code_bytes(self.config),
        }
        if outcome["status"] == "completed" and not math.isfinite(summary["val_loss"] or math.nan):
            summary.update(status="diverged", error=f"the final validation loss is {summary['val_loss']}; "
                           "lower the learning rates (optimizer.*_lr)")  # fmt: skip
        if self.settings.stop_at_target:
            summary["stopped_at_target"] = bool(outcome.get("stopped_at_target"))
        if summary["status"] == "completed" and self.settings.export:
            summary.update(self._export(eval_model, val_tokens, luts, summary["code_bytes"]))
        if summary["status"] == "completed" and self._stop_requested():
            # The end checkpoint is on disk: resuming repeats the final validation and the export.
            summary.update(self._interrupted())
        return summary

    def _stop_requested(self) -> bool:
        """Whether a stop signal reached any rank (all ranks take part, and agree)."""
        return dist_utils.any_rank(self.ctx, [self.stop.signal_name is not None])[0]

    def _export(self, eval_model, val_tokens, luts, code: int) -> dict:
        """Write final_model.pt and the artifact (rank 0), then every rank evaluates its round trip:
        reading the artifact back counts as evaluation time, as it does for a track's evaluator. A stop
        signal before the round trip skips it (the caller reports the run interrupted)."""
        if self._stop_requested():
            return {}
        artifact = self.artifact_format
        path = self.plan.run_dir / artifact.filename
        payload = None
        if self.ctx.is_main:
            payload = artifact.write(self.model.state_dict(), self.plan.run_dir, parameter_roles(self.model))
        dist_utils.barrier(self.ctx)
        if self._stop_requested():
            return {}
        synchronize(self.device)
        started = time.perf_counter()  # the round trip's time: reading the artifact back, then evaluating
        self.model.load_state_dict(load_artifact(path), strict=True)
        quant = self._evaluate(eval_model, val_tokens, luts)
        synchronize(self.device)
        quant_eval_time_ms = 1000.0 * (time.perf_counter() - started)
        quant_loss, quant_bpb = quant.loss, quant.bpb
        sizes = (
            {f"export/{k}": payload[k] for k in ("raw_bytes", "compressed_bytes", "ratio")} if payload else {}
        )
        self._record({"quant/val_loss": quant_loss, "quant/val_bpb": quant_bpb,
                      "quant/time_ms": round(quant_eval_time_ms, 3), **sizes})  # fmt: skip
        model_bytes = path.stat().st_size
        bpb_text = "n/a" if quant_bpb is None else f"{quant_bpb:.8f}"
        log.info("final_%s_roundtrip val_loss:%.8f val_bpb:%s", artifact.name, quant_loss, bpb_text)
        if payload is not None:
            log.info(
                "export %s: tensors %d bytes -> payload %d -> serialized %d -> compressed %d bytes "
                "(ratio %.3f); final_model.pt %d bytes",
                artifact.name, payload["tensor_bytes"], payload["payload_bytes"], payload["raw_bytes"],
                payload["compressed_bytes"], payload["ratio"], payload["raw_model_bytes"],
            )  # fmt: skip
        log.info(
            "artifact: model %d bytes + code %d bytes (%s) = %d bytes",
            model_bytes, code, artifact.code_description(), model_bytes + code,
        )  # fmt: skip
        results = {
            "quant_val_loss": quant_loss,
            "quant_val_bpb": quant_bpb,
            "model_bytes": model_bytes,
            "code_bytes": code,
            "artifact_bytes": model_bytes + code,
            "code_files": [str(f) for f in artifact.code_files] or None,
            "quant_eval_time_ms": round(quant_eval_time_ms, 3),
            "export": payload,
        }
        if not math.isfinite(quant_loss):
            results.update(status="failed", error=f"the int8 round trip's validation loss is {quant_loss}")
        return results


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def truncate_lines(path: Path, keep: int) -> None:
    """Keep the first `keep` lines of a JSONL file: the records written before a checkpoint.

    Truncated in place (one syscall, nothing to tear), because the JSONL sink already holds the
    file open for appending; a torn last line from a crash is beyond `keep` and goes too."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        for _ in range(keep):
            if not f.readline():
                return
        f.truncate()
