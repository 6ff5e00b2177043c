"""Typed schemas for every config option, registered in Hydra's ConfigStore.

Each YAML option extends its schema through its defaults list (`/schema/<group>/<name>@_here_`), so
an unknown key or a value of the wrong type -- in a file or on the command line -- is refused by
OmegaConf while the config is composed, before any work starts. Nothing here imports torch: a
bad config must be reported in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# --------------------------------------------------------------------------- model


@dataclass
class GPTConfig:
    """parameter-golf's GPT (see speedrun/models/gpt.py)."""

    _target_: str = "speedrun.models.GPT"
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    qk_gain_init: float = 1.5


# --------------------------------------------------------------------------- optimizer
# Optimizers are partials: the trainer completes them with the model.


@dataclass
class MuonAdamConfig:
    """Muon for block matrices, Adam for embeddings, head and control parameters."""

    _target_: str = "speedrun.optim.MuonAdam"
    _partial_: bool = True
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    embed_lr: float = 0.05
    head_lr: float = 0.008
    momentum: float = 0.95
    momentum_warmup_start: float = 0.85
    momentum_warmup_steps: int = 500
    backend_steps: int = 5
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 0.0


@dataclass
class AdamWConfig:
    """Plain AdamW with the same per-group learning-rate names as muon_adam."""

    _target_: str = "speedrun.optim.AdamW"
    _partial_: bool = True
    matrix_lr: float = 0.003
    scalar_lr: float = 0.003
    embed_lr: float = 0.01
    head_lr: float = 0.003
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 0.0


# --------------------------------------------------------------------------- schedule
# Schedules are partials: the trainer completes them with the horizon (max_steps, max_wallclock_ms).


@dataclass
class WallclockWarmdownConfig:
    """The reference's schedule: full LR, then a linear decay to 0 over the last `warmdown_iters`.

    With a wallclock cap the decay is timed (warmdown_iters x the running step time). Set
    `warmdown_fraction` > 0 to decay over that fraction of the horizon instead, which stays
    correct on hardware slower than the reference's.
    """

    _target_: str = "speedrun.schedules.WallclockWarmdown"
    _partial_: bool = True
    warmdown_iters: int = 1200
    warmdown_fraction: float = 0.0


@dataclass
class WSDConfig:
    """nanochat's warmup / stable / decay, as fractions of the horizon, ending at final_lr_frac."""

    _target_: str = "speedrun.schedules.WSD"
    _partial_: bool = True
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.4
    final_lr_frac: float = 0.0


# --------------------------------------------------------------------------- data


@dataclass
class StdlibDataConfig:
    """The embedded corpus: the Python standard library's own source, built once and cached."""

    _target_: str = "speedrun.data.StdlibCorpus"
    seq_len: int = 256
    val_tokens: int = 0
    vocab_size: int = 1024
    cache_dir: str | None = None


@dataclass
class ShardDataConfig:
    """Any folder prepared by `python -m speedrun.prepare` (or laid out the same way).

    `tokenizer`: a SentencePiece `.model`, a tiktoken `.tiktoken` rank file, a Hugging Face `.json`,
    `gpt2`, or null (no tokenizer: val_loss only, val_bpb null).
    """

    _target_: str = "speedrun.data.ShardDataset"
    path: str = MISSING
    tokenizer: str | None = None
    seq_len: int = 1024
    val_tokens: int = 0
    train_pattern: str = "*_train_*.bin"
    val_pattern: str = "*_val_*.bin"
    # Evaluate with a tokenizer other than the one the folder's manifest.json records (val_bpb then
    # measures something else: not comparable with runs that used the recorded one).
    allow_tokenizer_mismatch: bool = False


@dataclass
class FinewebDataConfig:
    """parameter-golf's FineWeb export (fetch it with `python -m speedrun.data.fineweb --variant sp1024`)."""

    _target_: str = "speedrun.data.FinewebSP1024"
    path: str = "data/datasets/fineweb10B_sp1024"
    tokenizer: str | None = "data/tokenizers/fineweb_1024_bpe.model"
    seq_len: int = 1024
    val_tokens: int = 0
    allow_tokenizer_mismatch: bool = False


@dataclass
class FinewebGPT2DataConfig:
    """modded-nanogpt's GPT-2-tokenized FineWeb (`python -m speedrun.data.fineweb --variant gpt2`).

    Its task is the loss on the first 10,485,760 validation tokens; no tokenizer needed (`gpt2` adds bpb).
    """

    _target_: str = "speedrun.data.FinewebGPT2"
    path: str = "data/datasets/fineweb10B_gpt2"
    tokenizer: str | None = None
    seq_len: int = 1024
    val_tokens: int = 10_485_760
    allow_tokenizer_mismatch: bool = False


# --------------------------------------------------------------------------- trainer


@dataclass
class TrainerConfig:
    # The global batch in tokens: ranks x accumulation x micro-batch. 0 micro_batch_tokens means
    # the reference's split (accumulation = 8 // ranks), so 1 and N ranks compute the same thing.
    train_batch_tokens: int = 8192
    micro_batch_tokens: int = 0
    # Horizon: the first limit reached wins; 0 means "no limit from this one".
    max_steps: int = 200
    max_wallclock_seconds: float = 0.0
    target_flops: float = 0.0
    target_param_data_ratio: float = 0.0
    # Untimed steps that warm up compilation, after which weights and optimizer state are restored.
    warmup_steps: int = 0
    val_every: int = 50
    val_batch_tokens: int = 65536
    log_every: int = 10
    # "auto" = every visible GPU, 1 on CPU; or an int.
    nproc_per_node: Any = "auto"
    # "auto" = compile on CUDA only; or true / false.
    compile: Any = "auto"
    device: str = "auto"
    checkpoint_every: int = 0
    checkpoint_every_seconds: float = 0.0
    keep_checkpoints: int = 2
    # "auto" resumes from the newest valid checkpoint in the run folder; "never"; or a path.
    resume: str = "auto"
    resume_force: bool = False
    # Stop as diverged when the training loss exceeds this (0 = only non-finite losses stop).
    max_loss: float = 0.0
    # Write the int8+zlib artifact and evaluate its round trip at the end.
    export: bool = True


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | none
    project: str = "speedrun"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    tags: list[str] = field(default_factory=list)
    notes: str | None = None


# --------------------------------------------------------------------------- top level


@dataclass
class Config:
    model: Any = MISSING
    optimizer: Any = MISSING
    schedule: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 1337


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"gpt": GPTConfig},
    "optimizer": {"muon_adam": MuonAdamConfig, "adamw": AdamWConfig},
    "schedule": {"wallclock_warmdown": WallclockWarmdownConfig, "wsd": WSDConfig},
    "data": {
        "stdlib": StdlibDataConfig,
        "shards": ShardDataConfig,
        "fineweb": FinewebDataConfig,
        "fineweb_gpt2": FinewebGPT2DataConfig,
    },
    "trainer": {"trainer": TrainerConfig},
    "logger": {"logger": LoggerConfig},
}


def register_configs() -> None:
    """Store the schemas under `schema/<group>/<name>` (out of the way of the user-facing groups)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
