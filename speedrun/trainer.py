"""The training loop and nothing else.

The trainer receives built components (model, optimizer set, schedule, data source, sinks) and
plain settings; it knows nothing of Hydra, so it can be driven from Python. Its loop follows the
reference train_gpt.py: validation at step 0, every `val_every` steps and at the end; a wallclock
cap measured on training time only; gradient accumulation to a global batch fixed in tokens.
The loss is read back from the device only when it is logged, so the hot loop has no per-step
host-device sync on GPU.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import resource
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from speedrun import distributed as dist_utils
from speedrun.checkpoint import CheckpointManager, rng_state, select_checkpoint, set_rng_state
from speedrun.distributed import DistContext
from speedrun.eval import evaluate
from speedrun.export import load_artifact, save_artifact
from speedrun.flops import mfu

log = logging.getLogger("speedrun")


@dataclass
class TrainerSettings:
    run_dir: Path
    seq_len: int
    train_batch_tokens: int
    grad_accum_steps: int
    micro_batch_tokens: int  # per rank, per micro-step
    max_steps: int | None
    max_wallclock_ms: float | None
    warmup_steps: int = 0
    val_every: int = 0
    val_batch_tokens: int = 65536
    log_every: int = 10
    checkpoint_every: int = 0
    checkpoint_every_seconds: float = 0.0
    keep_checkpoints: int = 2
    resume: str = "auto"
    resume_force: bool = False
    max_loss: float = 0.0
    export: bool = True
    compile: bool = False


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, checkpoints and stops.

    A second Ctrl-C means "now": it raises KeyboardInterrupt without waiting for the step.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __call__(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def signals_held():
    """Hold SIGTERM / SIGINT while the body runs, then deliver what arrived to the usual handler.

    A failing rank's report (which rank failed first, its traceback, summary.json) must not be cut
    short: the moment one rank dies, torchrun sends SIGTERM to the others, which otherwise becomes a
    KeyboardInterrupt in the middle of the report. A signal that arrived still takes effect after it.
    """
    held = StopRequest()
    with held.installed():
        yield
    if held.signal_name is not None:
        signal.raise_signal(signal.Signals[held.signal_name])


def code_bytes() -> int:
    """Bytes of the framework source this run imported: the reference counts its training script
    as the submission's code, so tools a run never loads (compare, bench, prepare) do not count."""
    files = {
        Path(module.__file__)
        for name, module in list(sys.modules.items())
        if (name == "speedrun" or name.startswith("speedrun.")) and getattr(module, "__file__", None)
    }
    return sum(f.stat().st_size for f in files)


class Trainer:
    def __init__(self, model: nn.Module, optimizer, schedule, data, sinks, settings: TrainerSettings,
                 ctx: DistContext, config: dict, flops_per_token: float | None = None):  # fmt: skip
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.data = data
        self.sinks = sinks
        self.s = settings
        self.ctx = ctx
        self.config = config
        self.flops_per_token = flops_per_token
        self.device = ctx.device
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.checkpoints = CheckpointManager(settings.run_dir / "checkpoints", settings.keep_checkpoints)
        self.stop = StopRequest()
        # Loop state, all of it saved in checkpoints.
        self.step = 0
        self.train_time_ms = 0.0
        self.records_logged = 0
        self.min_val_bpb = math.inf
        self.last_val: tuple[float, float] | None = None
        self.checkpointed_step = -1  # the step of the newest checkpoint on disk, so none is written twice

    # ------------------------------------------------------------------ set-up

    def _wrap(self) -> tuple[nn.Module, nn.Module]:
        """(model for training steps, model for evaluation): compiled, then DDP when distributed."""
        forward_model = self.model
        if self.s.compile:
            forward_model = torch.compile(self.model, dynamic=False, fullgraph=True)
        train_model = forward_model
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            device_ids = [self.ctx.local_rank] if self.device.type == "cuda" else None
            # The buffers (rotary caches) are the same on every rank: no broadcast each forward.
            # Torch 2.13 renamed the flag (forward_sync_buffers); the old name works on every
            # supported torch (>= 2.4), so its deprecation notice is silenced rather than followed.
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning
                )
                train_model = DDP(forward_model, device_ids=device_ids, broadcast_buffers=False)
        return train_model, forward_model

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ steps

    def _train_step(self, train_model: nn.Module, loader, step: int, elapsed_ms: float) -> torch.Tensor:
        """One optimizer step over the whole global batch; returns the mean loss (on device)."""
        self.optimizer.prepare_step(step, self.schedule.lr_scale(step, elapsed_ms))
        accum = self.s.grad_accum_steps
        train_loss = torch.zeros((), device=self.device)
        for micro_step in range(accum):
            if self.ctx.distributed:
                # Gradients are all-reduced once, on the last micro-step.
                train_model.require_backward_grad_sync = micro_step == accum - 1
            x, y = loader.next_batch(self.s.micro_batch_tokens)
            with self._autocast():
                loss = train_model(x, y)
            train_loss += loss.detach()
            (loss / accum).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return train_loss / accum

    def _warmup(self, train_model: nn.Module, loader) -> None:
        """Untimed steps that compile and warm every kernel, then restore the initial state so
        measured training starts from the true initialisation (as the reference)."""
        initial_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        initial_optim = copy.deepcopy(self.optimizer.state_dict())
        initial_loader = loader.state_dict()
        for i in range(self.s.warmup_steps):
            self._train_step(train_model, loader, 0, 0.0)
            log.info("warmup_step:%d/%d", i + 1, self.s.warmup_steps)
        self.model.load_state_dict(initial_model, strict=True)
        self.optimizer.load_state_dict(initial_optim)
        self.optimizer.zero_grad()
        loader.load_state_dict(initial_loader)

    def _evaluate(self, eval_model: nn.Module, val_tokens, luts) -> tuple[float, float]:
        per_rank_batch = self.s.val_batch_tokens // (self.ctx.world_size * self.s.grad_accum_steps)
        per_rank_batch = max(per_rank_batch // self.s.seq_len, 1) * self.s.seq_len
        return evaluate(
            eval_model, val_tokens, luts, seq_len=self.s.seq_len, batch_tokens=per_rank_batch,
            rank=self.ctx.rank, world_size=self.ctx.world_size, device=self.device,
            autocast_dtype=self.autocast_dtype,
        )  # fmt: skip

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ logging

    def _record(self, metrics: dict) -> None:
        record = {
            "step": self.step,
            "tokens": self.step * self.s.train_batch_tokens,
            "train_time_ms": round(self.train_time_ms, 3),
            **metrics,
        }
        self.sinks.log(record)
        self.records_logged += 1

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_state(self, loader) -> dict:
        return {
            "step": self.step,
            "train_time_ms": self.train_time_ms,
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
        """Continue from the checkpoint `settings.resume` selects (see select_checkpoint), and cut
        metrics.jsonl back to the records written before it, so it holds exactly this run's history
        (an empty file on a fresh start in a reused folder)."""
        found = select_checkpoint(
            self.checkpoints, self.s.resume, self.config, self.s.resume_force, warn=self.ctx.is_main
        )
        if found is not None:
            state, path = found
            self.model.load_state_dict(state["model"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
            loader.load_state_dict(state["loader"])
            set_rng_state(state["rng"])
            self.step = self.checkpointed_step = int(state["step"])
            self.train_time_ms = float(state["train_time_ms"])
            self.records_logged = int(state["records_logged"])
            self.min_val_bpb = float(state["min_val_bpb"])
            log.info(
                "resumed from %s at step %d (%.0f ms of training used)", path, self.step, self.train_time_ms
            )
        if self.ctx.is_main:
            truncate_lines(self.s.run_dir / "metrics.jsonl", self.records_logged)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train, evaluate, export; return the summary fields this run knows."""
        s = self.s
        train_model, eval_model = self._wrap()
        val_tokens = self.data.load_val_tokens()
        luts = self.data.byte_luts(self.device)
        loader = self.data.train_loader(self.ctx.rank, self.ctx.world_size, self.device)
        self.model.train()
        if s.warmup_steps:
            self._warmup(train_model, loader)
        self._resume(loader)
        # Everything allocated so far lives until the end: keep the collector from rescanning it.
        gc.collect()
        gc.freeze()
        try:
            with self.stop.installed():
                outcome = self._loop(train_model, eval_model, loader, val_tokens, luts)
        finally:
            # Collectable again once the loop ends: a sweep runs job after job in one process, and
            # the model's DDP wrapper must be freed before its process group is destroyed (cleanup).
            gc.unfreeze()
        return self._finish(outcome, eval_model, loader, val_tokens, luts)

    def _loop(self, train_model, eval_model, loader, val_tokens, luts) -> dict:
        s = self.s
        outcome = {"status": "completed"}
        last_finite: tuple[int, float] | None = None  # (step, loss) of the last loss within bounds
        # A resumed run counts the training time already used: past the cap it only finishes.
        stopping = s.max_wallclock_ms is not None and self.train_time_ms >= s.max_wallclock_ms
        last_log_time, last_log_step = self.train_time_ms, self.step
        last_checkpoint_wall = time.monotonic()
        warned = False
        self._sync()
        t0 = time.perf_counter()
        while True:
            last_step = stopping or (s.max_steps is not None and self.step >= s.max_steps)
            if last_step:
                # The end checkpoint precedes the final validation, so resuming a finished run
                # repeats only that validation and the export, and rewrites the same files.
                self._accumulate_time(t0)
                self._save_checkpoint(loader)
                t0 = time.perf_counter()
            if last_step or (s.val_every > 0 and self.step % s.val_every == 0):
                self._sync()
                self.train_time_ms += 1000.0 * (time.perf_counter() - t0)
                val_loss, val_bpb = self._evaluate(eval_model, val_tokens, luts)
                self.last_val = (val_loss, val_bpb)
                if val_bpb is not None:  # None: data without a tokenizer
                    self.min_val_bpb = min(self.min_val_bpb, val_bpb)
                self._record({"val/loss": val_loss, "val/bpb": val_bpb})
                self._sync()
                t0 = time.perf_counter()
            if last_step:
                break

            elapsed_ms = self.train_time_ms + 1000.0 * (time.perf_counter() - t0)
            train_loss = self._train_step(train_model, loader, self.step, elapsed_ms)
            self.step += 1
            elapsed_ms = self.train_time_ms + 1000.0 * (time.perf_counter() - t0)
            if not warned and self.step == 10:
                warned = True
                message = self.schedule.warning(self.step, elapsed_ms)
                if message:
                    log.warning("warning: %s", message)

            # The loss is read back only when logged (and every step on CPU, where it is free).
            should_log = s.log_every > 0 and (self.step <= 10 or self.step % s.log_every == 0)
            loss_value = None
            if should_log or self.device.type == "cpu":
                if should_log:
                    # Log the global batch's loss, not rank 0's share of it, so N ranks log what
                    # 1 rank does (the reference logs rank 0's share). All ranks agree on should_log.
                    train_loss = dist_utils.mean_over_ranks(self.ctx, train_loss)
                loss_value = train_loss.item()
                if math.isfinite(loss_value) and not (s.max_loss > 0 and loss_value > s.max_loss):
                    last_finite = (self.step, loss_value)
                elif outcome["status"] != "diverged":
                    outcome = self._diverged(loss_value, last_finite)
            if should_log:
                interval_ms = max(elapsed_ms - last_log_time, 1e-9)
                tok_per_sec = (self.step - last_log_step) * s.train_batch_tokens / (interval_ms / 1000.0)
                self._record({
                    "train/loss": loss_value,
                    "train/tok_per_sec": tok_per_sec,
                    "train/mfu": self._mfu(tok_per_sec),
                    "lr_scale": self.schedule.lr_scale(self.step, elapsed_ms),
                    "step_ms": interval_ms / max(self.step - last_log_step, 1),
                    "train_time_ms": round(elapsed_ms, 3),
                })  # fmt: skip
                last_log_time, last_log_step = elapsed_ms, self.step

            cap_reached = s.max_wallclock_ms is not None and elapsed_ms >= s.max_wallclock_ms
            cap_reached, signalled, diverged = dist_utils.any_rank(
                self.ctx, [cap_reached, self.stop.signal_name is not None, outcome["status"] == "diverged"]
            )
            if diverged:
                # Stop before any checkpoint: the weights of this step may already be ruined.
                if outcome["status"] != "diverged":  # another rank saw it first
                    outcome = self._diverged(loss_value, last_finite)
                log.error("error: %s", outcome["error"])
                break
            due = (s.checkpoint_every > 0 and self.step % s.checkpoint_every == 0) or (
                s.checkpoint_every_seconds > 0
                and time.monotonic() - last_checkpoint_wall >= s.checkpoint_every_seconds
            )
            if signalled:
                self._accumulate_time(t0)
                self._save_checkpoint(loader)
                name = self.stop.signal_name or "a signal on another rank"
                log.warning(
                    "interrupted at step %d by %s; run the same command again to resume", self.step, name
                )
                interrupted = {"status": "interrupted", "error": f"interrupted by {name} at step {self.step}"}
                return {**outcome, **interrupted}
            if due:
                self._accumulate_time(t0)
                self._save_checkpoint(loader)
                last_checkpoint_wall = time.monotonic()
                t0 = time.perf_counter()
            if cap_reached and not stopping:
                stopping = True
                log.info("stopping_early: wallclock_cap train_time:%.0fms step:%d", elapsed_ms, self.step)
        self._accumulate_time(t0)
        return outcome

    def _diverged(self, loss: float | None, last_finite: tuple[int, float] | None) -> dict:
        """The summary fields of a diverged run: where, with what loss, and the last good one."""
        last_step, last_loss = last_finite if last_finite else (None, None)
        if loss is not None and math.isfinite(loss):
            what = f"loss {loss:.4f} exceeds trainer.max_loss={self.s.max_loss}"
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

    def _accumulate_time(self, t0: float) -> None:
        """Fold the time since t0 into train_time_ms (evaluation excluded, as the reference)."""
        self._sync()
        self.train_time_ms += 1000.0 * (time.perf_counter() - t0)

    def _mfu(self, tok_per_sec: float) -> float | None:
        if self.flops_per_token is None or self.device.type != "cuda":
            return None
        return mfu(
            tok_per_sec, self.flops_per_token, self.ctx.world_size, torch.cuda.get_device_name(self.device)
        )

    # ------------------------------------------------------------------ the end

    def _finish(self, outcome: dict, eval_model, loader, val_tokens, luts) -> dict:
        s = self.s
        steps = self.step
        tokens_seen = steps * s.train_batch_tokens
        tok_per_sec = tokens_seen / (self.train_time_ms / 1000.0) if self.train_time_ms > 0 else None
        summary = {
            **outcome,
            "val_loss": self.last_val[0] if self.last_val else None,
            "val_bpb": self.last_val[1] if self.last_val else None,
            "min_val_bpb": self.min_val_bpb if math.isfinite(self.min_val_bpb) else None,
            "params": sum(p.numel() for p in self.model.parameters()),
            "steps": steps,
            "tokens_seen": tokens_seen,
            "train_time_ms": round(self.train_time_ms, 3),
            "step_avg_ms": self.train_time_ms / steps if steps else None,
            "tok_per_sec": tok_per_sec,
            "mfu": self._mfu(tok_per_sec) if tok_per_sec else None,
            "peak_mem_mib": peak_memory_mib(self.device),
            "world_size": self.ctx.world_size,
        }
        if outcome["status"] != "completed":
            return summary
        if s.export:
            summary.update(self._export(eval_model, val_tokens, luts))
        return summary

    def _export(self, eval_model, val_tokens, luts) -> dict:
        """Write the int8+zlib artifact (rank 0), then every rank evaluates its round trip."""
        path = self.s.run_dir / "final_model.int8.ptz"
        if self.ctx.is_main:
            save_artifact(self.model.state_dict(), path)
        dist_utils.barrier(self.ctx)
        self.model.load_state_dict(load_artifact(path), strict=True)
        quant_loss, quant_bpb = self._evaluate(eval_model, val_tokens, luts)
        self._record({"quant/val_loss": quant_loss, "quant/val_bpb": quant_bpb})
        model_bytes = path.stat().st_size
        code = code_bytes()
        log.info("final_int8_zlib_roundtrip val_loss:%.8f val_bpb:%s", quant_loss,
                 "null" if quant_bpb is None else f"{quant_bpb:.8f}")  # fmt: skip
        log.info("artifact: model %d bytes + code %d bytes = %d bytes", model_bytes, code, model_bytes + code)
        return {
            "quant_val_loss": quant_loss,
            "quant_val_bpb": quant_bpb,
            "model_bytes": model_bytes,
            "code_bytes": code,
            "artifact_bytes": model_bytes + code,
        }


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
