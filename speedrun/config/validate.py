"""Checks that types alone cannot express: keys the schema lacks, values outside their domain,
shapes that must divide.

Run before any work (and before torch is imported), each failure is one line naming the key and
the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

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


# --------------------------------------------------------------------------- domains
# Every numeric key has a domain. Keys are matched by their last name, so a model or optimizer of
# any family (ours or a user's) gets the same rules for the same kind of value; every float must be
# finite whatever its name.

Domain = tuple[Callable[[float], bool], str]
AT_LEAST_1: Domain = (lambda v: v >= 1, "an integer >= 1")
AT_LEAST_0: Domain = (lambda v: v >= 0, "a number >= 0")
POSITIVE: Domain = (lambda v: v > 0, "a number > 0")
FRACTION: Domain = (lambda v: 0 <= v <= 1, "a fraction between 0 and 1")
MOMENTUM: Domain = (lambda v: 0 <= v < 1, "in [0, 1)")

DOMAINS: dict[str, Domain] = {
    **dict.fromkeys(("momentum", "momentum_warmup_start", "beta1", "beta2"), MOMENTUM),
    **dict.fromkeys(("eps", "rope_base", "tied_embed_init_std"), POSITIVE),
    **dict.fromkeys(("warmup_ratio", "warmdown_ratio", "final_lr_frac", "warmdown_fraction"), FRACTION),
    **dict.fromkeys(
        (
            "num_layers",
            "model_dim",
            "num_heads",
            "num_kv_heads",
            "mlp_mult",
            "vocab_size",
            "depth",
            "head_dim",
            "backend_steps",
            "seq_len",
            "train_batch_tokens",
            "val_batch_tokens",
            "keep_checkpoints",
            "sample_tokens",
        ),
        AT_LEAST_1,
    ),  # fmt: skip
    **dict.fromkeys(
        (
            "weight_decay",
            "grad_clip_norm",
            "logit_softcap",
            "val_tokens",
            "momentum_warmup_steps",
            "warmdown_iters",
            "micro_batch_tokens",
            "max_steps",
            "max_wallclock_seconds",
            "target_flops",
            "target_param_data_ratio",
            "warmup_steps",
            "val_every",
            "log_every",
            "checkpoint_every",
            "checkpoint_every_seconds",
            "max_loss",
            "val_seq_len",
            "val_stride",
            "sample_every",
            "sample_temperature",
        ),
        AT_LEAST_0,
    ),  # fmt: skip
}
# Learning rates, whatever the group: `lr`, `matrix_lr`, `embed_lr`, ...
LEARNING_RATE: Domain = (lambda v: v >= 0, "a learning rate >= 0")
CHECKED_GROUPS = ("model", "optimizer", "schedule", "data", "trainer")


def _domain(name: str) -> Domain | None:
    if name == "lr" or name.endswith("_lr"):
        return LEARNING_RATE
    return DOMAINS.get(name)


def _check_numbers(node: object, path: str) -> None:
    """Every number under `node`: finite, and within its key's domain."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_numbers(value, f"{path}.{key}")
        return
    if isinstance(node, list):
        for index, value in enumerate(node):
            _check_numbers(value, f"{path}[{index}]")
        return
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return
    _require(math.isfinite(node), f"{path}={node} must be a finite number")
    domain = _domain(path.rsplit(".", 1)[-1])
    if domain is not None:
        check, wanted = domain
        _require(check(node), f"{path}={node} must be {wanted}")


def _check_known_keys(node: DictConfig, path: str) -> None:
    """Keys a typed schema does not have, added with `+key=value` (which bypasses the schema)."""
    # Hydra's own node (present when composed with it) is Hydra's business.
    keys = [key for key in node if not (path == "" and key == "hydra")]
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = [f.name for f in dataclasses.fields(schema)]
        for key in keys:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {path}{close[0]}?" if close else f"the keys are: {', '.join(known)}"
                raise ConfigError(
                    f"{path}{key} is not a setting of {path.rstrip('.') or 'the config'}; {hint}"
                )
    for key in keys:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _check_known_keys(child, f"{path}{key}.")


def validate_config(cfg: DictConfig, world_size: int = 1, require_all: bool = True) -> None:
    """Refuse, with the fix named, a config whose keys, values or shapes cannot run. `require_all=False`
    lets mandatory values (`???`) stay unset, for a config that is only printed (`--cfg job`)."""
    _check_known_keys(cfg, "")
    for group in CHECKED_GROUPS:
        try:
            values = OmegaConf.to_container(cfg[group], resolve=True, throw_on_missing=require_all)
        except MissingMandatoryValue as exc:
            key = exc.full_key or "a value"
            raise ConfigError(f"{key} is required: set {key}=... on the command line") from None
        _check_numbers(values, group)
    _check_shapes(cfg, world_size)
    _check_trainer(cfg.trainer, cfg.data.seq_len, world_size)
    val_tokens = cfg.data.get("val_tokens") or 0  # 0: the whole split, whose length only the data knows
    val_targets = val_tokens // cfg.data.seq_len * cfg.data.seq_len  # cut to whole training sequences
    _require(
        val_tokens == 0 or cfg.trainer.val_seq_len <= val_targets,
        f"trainer.val_seq_len={cfg.trainer.val_seq_len} is longer than the {val_targets} validation targets "
        f"data.val_tokens={val_tokens} leaves; lower it or raise data.val_tokens",
    )
    if cfg.logger is not None and "mode" in cfg.logger:
        _require(
            cfg.logger.mode in ("offline", "online", "disabled"),
            f"logger.mode={cfg.logger.mode!r} must be offline, online or disabled",
        )


def _check_shapes(cfg: DictConfig, world_size: int) -> None:
    model = cfg.model
    if "num_heads" in model and "model_dim" in model:
        _require(
            model.model_dim % model.num_heads == 0,
            f"model.model_dim={model.model_dim} is not divisible by model.num_heads={model.num_heads}; "
            "change one so that model_dim / num_heads is an integer head size",
        )
        _require(
            (model.model_dim // model.num_heads) % 2 == 0,
            f"head size model.model_dim/model.num_heads={model.model_dim // model.num_heads} must be even "
            "for rotary embeddings; change model_dim or num_heads",
        )
    if "num_heads" in model and "num_kv_heads" in model:
        _require(
            model.num_heads % model.num_kv_heads == 0,
            f"model.num_heads={model.num_heads} is not divisible by model.num_kv_heads={model.num_kv_heads}; "
            "grouped-query attention needs num_kv_heads to divide num_heads",
        )
    if "window_block_size" in model:  # block-wise sliding windows (model=modded)
        _require(
            cfg.data.seq_len % model.window_block_size == 0,
            f"data.seq_len={cfg.data.seq_len} is not a whole number of model.window_block_size="
            f"{model.window_block_size} token blocks; make seq_len a multiple of it",
        )
    split_batch(cfg.trainer.train_batch_tokens, cfg.trainer.micro_batch_tokens, world_size, cfg.data.seq_len)


def _check_trainer(trainer: DictConfig, seq_len: int, world_size: int) -> None:
    _require(
        trainer.val_batch_tokens >= seq_len * world_size,
        f"trainer.val_batch_tokens={trainer.val_batch_tokens} must hold at least one sequence per rank "
        f"({seq_len} x {world_size}); raise it",
    )
    val_seq_len = trainer.val_seq_len or seq_len
    _require(
        trainer.val_stride <= val_seq_len,
        f"trainer.val_stride={trainer.val_stride} is longer than the validation window of {val_seq_len} "
        "tokens (trainer.val_seq_len, or data.seq_len when 0); windows would skip tokens: lower it",
    )
    horizons = ("max_steps", "max_wallclock_seconds", "target_flops", "target_param_data_ratio")
    _require(
        any(trainer[k] > 0 for k in horizons),
        "no training horizon: set trainer.max_steps, trainer.max_wallclock_seconds, trainer.target_flops "
        "or trainer.target_param_data_ratio",
    )
    _require(
        trainer.max_steps == 0 or trainer.warmup_steps <= trainer.max_steps,
        f"trainer.warmup_steps={trainer.warmup_steps} is longer than the horizon trainer.max_steps="
        f"{trainer.max_steps}; warm-up steps are untimed compile warm-ups, a few are enough",
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
    _require(
        trainer.precision in ("auto", "bf16", "fp32"),
        f"trainer.precision={trainer.precision!r} must be auto, bf16 or fp32",
    )
    _require(
        trainer.resume in ("auto", "never") or bool(str(trainer.resume).strip()),
        "trainer.resume must be auto, never or the path of a checkpoint or run folder",
    )
