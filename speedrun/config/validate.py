"""Checks that types alone cannot express: shapes that must divide, values that must be in range.

Run before any work (and before torch is imported), each failure is one line naming the key and
the fix.
"""

from __future__ import annotations

from omegaconf import DictConfig

# The reference splits every global batch into 8 micro-batches, spread over the ranks.
REFERENCE_MICRO_STEPS = 8


class ConfigError(ValueError):
    """A config that composes but cannot run."""


def split_batch(
    train_batch_tokens: int, micro_batch_tokens: int, world_size: int, seq_len: int
) -> tuple[int, int]:
    """Return (grad_accum_steps, micro_batch_tokens per rank) for a global batch fixed in tokens.

    ranks x accumulation x micro-batch = train_batch_tokens, so 1 rank and N ranks compute the
    same gradient. micro_batch_tokens=0 follows the reference: accumulation = 8 // ranks.
    """
    if train_batch_tokens <= 0:
        raise ConfigError(f"trainer.train_batch_tokens={train_batch_tokens} must be positive")
    if micro_batch_tokens:
        per_rank, rem = divmod(train_batch_tokens, world_size * micro_batch_tokens)
        if rem or per_rank == 0:
            raise ConfigError(
                f"trainer.train_batch_tokens={train_batch_tokens} is not a multiple of "
                f"{world_size} ranks x trainer.micro_batch_tokens={micro_batch_tokens}; "
                "pick a micro-batch that divides the per-rank batch"
            )
        grad_accum = per_rank
    else:
        if REFERENCE_MICRO_STEPS % world_size:
            raise ConfigError(
                f"{world_size} ranks do not divide the reference's {REFERENCE_MICRO_STEPS} micro-steps; "
                "set trainer.micro_batch_tokens explicitly"
            )
        grad_accum = REFERENCE_MICRO_STEPS // world_size
        micro_batch_tokens, rem = divmod(train_batch_tokens, REFERENCE_MICRO_STEPS)
        if rem:
            raise ConfigError(
                f"trainer.train_batch_tokens={train_batch_tokens} is not divisible into "
                f"{REFERENCE_MICRO_STEPS} micro-batches; use a multiple of {REFERENCE_MICRO_STEPS * seq_len} "
                "or set trainer.micro_batch_tokens"
            )
    if micro_batch_tokens % seq_len:
        raise ConfigError(
            f"trainer.train_batch_tokens={train_batch_tokens} gives micro-batches of {micro_batch_tokens} "
            f"tokens per rank, not a whole number of data.seq_len={seq_len} sequences; make it a multiple of "
            f"{world_size * grad_accum * seq_len} (ranks x accumulation x seq_len)"
        )
    return grad_accum, micro_batch_tokens


def parse_nproc(value: object, cuda_devices: int | None = None) -> int:
    """`auto` = every visible GPU (1 on CPU), else a positive int."""
    if value == "auto":
        return max(cuda_devices or 0, 1)
    if isinstance(value, bool) or not str(value).isdigit() or int(str(value)) < 1:
        raise ConfigError(f"trainer.nproc_per_node={value!r} must be 'auto' or a positive integer")
    return int(str(value))


def parse_compile(value: object, on_cuda: bool) -> bool:
    """`auto` = compile on CUDA only."""
    if value == "auto":
        return on_cuda
    if isinstance(value, bool):
        return value
    raise ConfigError(f"trainer.compile={value!r} must be auto, true or false")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(cfg: DictConfig, world_size: int = 1) -> None:
    """Refuse, with the fix named, a config whose shapes or values cannot run."""
    model, trainer, data = cfg.model, cfg.trainer, cfg.data
    if "num_heads" in model:
        _require(
            model.model_dim % model.num_heads == 0,
            f"model.model_dim={model.model_dim} is not divisible by model.num_heads={model.num_heads}; "
            "change one so that model_dim / num_heads is an integer head size",
        )
        _require(
            model.num_heads % model.num_kv_heads == 0,
            f"model.num_heads={model.num_heads} is not divisible by model.num_kv_heads={model.num_kv_heads}; "
            "grouped-query attention needs num_kv_heads to divide num_heads",
        )
        _require(
            (model.model_dim // model.num_heads) % 2 == 0,
            f"head size model.model_dim/model.num_heads={model.model_dim // model.num_heads} must be even "
            "for rotary embeddings; change model_dim or num_heads",
        )
    _require(data.seq_len > 0, f"data.seq_len={data.seq_len} must be positive")
    split_batch(trainer.train_batch_tokens, trainer.micro_batch_tokens, world_size, data.seq_len)
    _require(
        trainer.val_batch_tokens >= data.seq_len * world_size,
        f"trainer.val_batch_tokens={trainer.val_batch_tokens} must hold at least one sequence per rank "
        f"({data.seq_len} x {world_size}); raise it",
    )
    for key in (
        "max_steps",
        "val_every",
        "log_every",
        "warmup_steps",
        "checkpoint_every",
        "keep_checkpoints",
        "target_val_every",
    ):
        _require(trainer[key] >= 0, f"trainer.{key}={trainer[key]} must be >= 0")
    for key in (
        "max_wallclock_seconds",
        "target_flops",
        "target_param_data_ratio",
        "max_loss",
        "target_margin",
    ):
        _require(trainer[key] >= 0, f"trainer.{key}={trainer[key]} must be >= 0 (0 = off)")
    _require(
        any(
            trainer[k] > 0
            for k in ("max_steps", "max_wallclock_seconds", "target_flops", "target_param_data_ratio")
        ),
        "no training horizon: set trainer.max_steps, trainer.max_wallclock_seconds, trainer.target_flops "
        "or trainer.target_param_data_ratio",
    )
    if trainer.stop_at_target:
        _require(
            trainer.target_metric in ("val_loss", "val_bpb"),
            f"trainer.target_metric={trainer.target_metric!r} must be val_loss or val_bpb",
        )
        _require(trainer.target_value > 0, "trainer.stop_at_target needs trainer.target_value, e.g. 3.28")
        _require(
            trainer.val_every > 0,
            "trainer.stop_at_target needs validations during training: set trainer.val_every",
        )
    parse_nproc(trainer.nproc_per_node, cuda_devices=1)
    parse_compile(trainer.compile, on_cuda=False)
    _require(
        trainer.device in ("auto", "cpu", "cuda"),
        f"trainer.device={trainer.device!r} must be auto, cpu or cuda",
    )
    if cfg.logger is not None and "mode" in cfg.logger:
        _require(
            cfg.logger.mode in ("offline", "online", "disabled"),
            f"logger.mode={cfg.logger.mode!r} must be offline, online or disabled",
        )
    _require(
        trainer.precision in ("auto", "bf16", "fp32"),
        f"trainer.precision={trainer.precision!r} must be auto, bf16 or fp32",
    )
    schedule = cfg.schedule
    for key in ("warmup_ratio", "warmdown_ratio", "final_lr_frac", "warmdown_fraction"):
        if key in schedule:
            _require(0.0 <= schedule[key] <= 1.0, f"schedule.{key}={schedule[key]} must be between 0 and 1")
