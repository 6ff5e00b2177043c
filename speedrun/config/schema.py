"""Typed schemas for every shipped config option: the one place each default is written.

Each YAML option extends its schema through its defaults list (`/speedrun_schema/<group>/<name>@_here_`)
and states only what differs from it, so an unknown key or a value of the wrong type -- in a file
or on the command line -- is refused by OmegaConf while the config is composed, before any work
starts. The classes the schemas instantiate (`_target_`) carry the same defaults in their
signatures, for use from Python; `tests/test_config.py` fails when the two disagree or when an
option repeats a schema value. Nothing here imports torch: a bad config must be reported in well
under a second.

A component outside speedrun needs no schema: a YAML with a `_target_` is enough (untyped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

# --------------------------------------------------------------------------- model


@dataclass
class GPTConfig:
    """parameter-golf's GPT (speedrun/models/gpt.py); the defaults are the record's 9x512 layout."""

    _target_: str = "speedrun.models.GPT"
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0  # 0 = no soft cap
    rope_base: float = 10000.0
    qk_gain_init: float = 1.5
    # The record's tricks, each a switch (README "Models"; +sweep=ablate turns them off one at a time).
    unet_skips: bool = True
    x0_mix: bool = True
    q_gain: bool = True
    qk_norm: bool = True
    zero_init_projections: bool = True
    mlp_activation: str = "relu2"  # relu2 | gelu | swiglu
    # Name fragments of the blocks' 2-D control tensors: scalar Adam, fp32 in training and artifact.
    control_patterns: list[str] = field(
        default_factory=lambda: [
            "attn_scale",
            "attn_scales",
            "mlp_scale",
            "mlp_scales",
            "resid_mix",
            "resid_mixes",
            "q_gain",
            "skip_weight",
            "skip_weights",
        ]
    )


@dataclass
class NanochatModelConfig:
    """nanochat's GPT (speedrun/models/nanochat.py, karpathy/nanochat 07c4dd4): every shape follows
    `depth` (width = depth x aspect_ratio rounded up to a multiple of head_dim); defaults are nanochat's
    own (base_train.py's depth 20, 896,535,720 parameters)."""

    _target_: str = "speedrun.models.nanochat.NanochatGPT"
    vocab_size: int = 32768
    depth: int = 20
    aspect_ratio: int = 64
    head_dim: int = 128
    sequence_len: int = 2048
    window_pattern: str = "SSSL"  # tiled over the layers: L = full context, S = half; the last layer is L
    logit_softcap: float = 15.0
    rope_base: float = 10000.0
    pad_vocab_to: int = 64
    attention: str = "auto"  # auto (flex when compiled on CUDA, masked SDPA elsewhere) | sdpa | flex


@dataclass
class ModdedGPTConfig:
    """modded-nanogpt's record-#20 model (speedrun/models/modded.py); the defaults are the record's."""

    _target_: str = "speedrun.models.ModdedGPT"
    vocab_size: int = 50257
    num_layers: int = 12
    model_dim: int = 768
    num_heads: int = 6
    mlp_mult: int = 4
    # The head's rows are the vocabulary rounded up to this multiple (50,257 -> 50,304).
    vocab_pad_multiple: int = 128
    # Value embeddings: the first n and the last n layers use embeddings 0..n-1 ("012 ... 012"), or
    # value_embed_layers lists one embedding index (-1: none) per layer.
    num_value_embeds: int = 3
    value_embed_layers: list[int] | None = None
    # Long (L) or short (S) window per layer of the first half, tiled and mirrored onto the second half.
    window_pattern: str = "LSSSLS"
    skip_attention_layers: list[int] = field(default_factory=lambda: [7])
    # The window is counted in blocks of this many tokens; the long one grows with training progress
    # to ceil(max_window_tokens / window_block_size) blocks, the short one is half of it (at least 1).
    window_block_size: int = 128
    max_window_tokens: int = 1728
    attn_scale: float = 0.12
    logit_softcap: float = 15.0
    # Documents start at this token (GPT-2's <|endoftext|>); attention never crosses one. -1: no documents.
    bos_id: int = 50256
    # FP8 head matmul in bf16 training on GPUs with FP8 tensor cores (compute capability >= 8.9).
    fp8_head: bool = True


# --------------------------------------------------------------------------- optimizer
# Optimizers are partials: the trainer completes them with the model's parameter groups
# (speedrun.models.protocol.parameter_groups).


@dataclass
class MuonAdamConfig:
    """Muon for block matrices, Adam for embeddings, head and control parameters (the reference's)."""

    _target_: str = "speedrun.optim.MuonAdam"
    _partial_: bool = True
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    embed_lr: float = 0.05  # the token embedding when it is also the head (the reference's TIED_EMBED_LR)
    untied_embed_lr: float = 0.6  # ... and when the model has its own head (the reference's EMBED_LR)
    head_lr: float = 0.008
    momentum: float = 0.95
    momentum_warmup_start: float = 0.85
    momentum_warmup_steps: int = 500
    backend_steps: int = 5
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 0.0
    # "auto" = run Newton-Schulz through torch.compile when the parameters are on CUDA.
    compile_newtonschulz: Any = "auto"
    # Not in the reference (the defaults reproduce it): Muon's look-ahead momentum, and decoupled
    # weight decay on the Muon matrices, optionally cautious (only where update and weight agree in sign).
    nesterov: bool = True
    weight_decay: float = 0.0
    cautious_weight_decay: bool = False


@dataclass
class AdamWConfig:
    """Plain AdamW with the same per-group learning-rate names as muon_adam."""

    _target_: str = "speedrun.optim.AdamW"
    _partial_: bool = True
    matrix_lr: float = 0.003
    scalar_lr: float = 0.003
    embed_lr: float = 0.01
    untied_embed_lr: float = 0.12
    head_lr: float = 0.003
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 0.0


@dataclass
class NanochatOptimizerConfig:
    """nanochat's AdamW + Muon (speedrun/optim/nanochat.py) with base_train.py's defaults: LRs tuned at
    width 768 and 2^19 tokens per step and rescaled to the model and batch; Muon's cautious weight decay
    tuned at depth 12, scaled by (12/depth)^2 and decayed linearly to 0 over the run."""

    _target_: str = "speedrun.optim.nanochat.NanochatMuonAdamW"
    _partial_: bool = True
    matrix_lr: float = 0.02
    embed_lr: float = 0.3
    head_lr: float = 0.004
    scalar_lr: float = 0.5
    resid_lr_scale: float = 0.01  # the residual lambdas' LR as a fraction of scalar_lr
    x0_beta1: float = 0.96  # the x0 lambdas' Adam beta1
    beta1: float = 0.8
    beta2: float = 0.95
    eps: float = 1e-10
    weight_decay: float = 0.2
    depth: int = 12  # the model's depth, for the weight-decay scaling
    batch_tokens: int = 524288  # the global batch, for the LR scaling
    momentum: float = 0.95
    momentum_warmup_start: float = 0.85
    momentum_warmup_steps: int = 300
    muon_beta2: float = 0.95  # the EMA rate of Muon's factored second moment
    ns_steps: int = 5  # Polar Express iterations (1-5)


@dataclass
class ModdedMuonAdamConfig:
    """modded-nanogpt record #20's optimizers: batched Muon on matrices, one Adam (eps 1e-10) for the rest."""

    _target_: str = "speedrun.optim.ModdedMuonAdam"
    _partial_: bool = True
    matrix_lr: float = 0.05
    scalar_lr: float = 0.04
    embed_lr: float = 0.6
    head_lr: float = 0.008
    momentum: float = 0.95
    momentum_warmup_start: float = 0.85
    momentum_warmup_steps: int = 300
    backend_steps: int = 5
    beta1: float = 0.8
    beta2: float = 0.95
    eps: float = 1e-10
    # "auto" = run Newton-Schulz through torch.compile when the parameters are on CUDA.
    compile_newtonschulz: Any = "auto"


# --------------------------------------------------------------------------- schedule
# Schedules are partials: the trainer completes them with the horizon (max_steps, max_wallclock_ms).


@dataclass
class WallclockWarmdownConfig:
    """The reference's schedule: full LR, then linear to final_lr_frac (0) over the last `warmdown_iters`."""

    _target_: str = "speedrun.schedules.WallclockWarmdown"
    _partial_: bool = True
    warmdown_iters: int = 1200
    warmdown_fraction: float = 0.0
    # The decay ends at this fraction of the peak LR (0: parameter-golf's decay to zero).
    final_lr_frac: float = 0.0


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


# --------------------------------------------------------------------------- logger
# Loggers are partials: the job completes them with (run_dir, config, run_info) and adds the
# console and metrics.jsonl sinks itself. `logger=none` sets the group to null.


@dataclass
class WandbLoggerConfig:
    """wandb on rank 0, offline by default (speedrun/sinks/wandb_sink.py)."""

    _target_: str = "speedrun.sinks.WandbSink"
    _partial_: bool = True
    project: str = "speedrun"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    tags: list[str] = field(default_factory=list)
    notes: str | None = None


# --------------------------------------------------------------------------- trainer


@dataclass
class TrainerConfig:
    """How a job trains: batch, horizon, cadence, launch, checkpoints. The defaults are a laptop-sized
    run: batches of 8192 tokens for up to 1000 steps or 100 s of training time, whichever comes first.

    `speedrun.trainer.Trainer` takes this dataclass as it is, so a script builds it the same way.
    """

    # The global batch in tokens: ranks x accumulation x micro-batch. 0 micro_batch_tokens means
    # the reference's split (accumulation = 8 // ranks), so 1 and N ranks compute the same thing.
    train_batch_tokens: int = 8192
    micro_batch_tokens: int = 0
    # Horizon: the first limit reached wins; 0 means "no limit from this one".
    max_steps: int = 1000
    max_wallclock_seconds: float = 100.0
    target_flops: float = 0.0
    target_param_data_ratio: float = 0.0
    # Untimed steps that warm up compilation, after which weights and optimizer state are restored.
    warmup_steps: int = 0
    val_every: int = 100
    val_batch_tokens: int = 65536
    # Validation windows of val_seq_len tokens (0 = data.seq_len) that advance by val_stride (0 = the
    # window: no overlap, the reference's). Each target is scored once, after at least
    # val_seq_len - val_stride tokens of context; a smaller stride costs val_seq_len / val_stride the compute.
    val_seq_len: int = 0
    val_stride: int = 0
    log_every: int = 10
    # "auto" = every visible GPU, 1 on CPU; or an int.
    nproc_per_node: Any = "auto"
    # "auto" = compile on CUDA only; or true / false.
    compile: Any = "auto"
    device: str = "auto"  # auto | cpu | cuda
    # auto = the model's mixed-precision recipe with bf16 autocast on CUDA, plain fp32 elsewhere;
    # fp32 turns both off on CUDA too (to measure what bf16 buys).
    precision: str = "auto"  # auto | bf16 | fp32
    checkpoint_every: int = 0
    checkpoint_every_seconds: float = 0.0
    keep_checkpoints: int = 2
    # "auto" resumes from the newest valid checkpoint in the run folder; "never"; or a path.
    resume: str = "auto"
    resume_force: bool = False
    # Stop as diverged when the training loss exceeds this (0 = only non-finite losses stop).
    max_loss: float = 0.0
    # Write the artifact (its format: the `export` group) and evaluate its round trip at the end.
    export: bool = True
    # Every sample_every steps (0 = never) and at the end, rank 0 continues each prompt by sample_tokens
    # tokens, greedily and at sample_temperature (seeded), into train.log, metrics.jsonl and wandb.
    sample_every: int = 0
    sample_tokens: int = 64
    sample_temperature: float = 0.8
    sample_prompts: list[str] = field(
        default_factory=lambda: ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
    )
    # End training once the validation metric (val_loss or val_bpb) reaches target_value; once it is
    # within target_margin of it, validate every target_val_every steps (0: only every val_every).
    stop_at_target: bool = False
    target_metric: str = "val_loss"  # val_loss | val_bpb
    target_value: float = 0.0
    target_margin: float = 0.0
    target_val_every: int = 0


# --------------------------------------------------------------------------- export


@dataclass
class ArtifactFormatConfig:
    """The artifact's format (speedrun/export.py); the defaults are the reference's int8 + zlib."""

    _target_: str = "speedrun.export.ArtifactFormat"
    scheme: str = "int8"  # int8 | int6 (int6 matrices, int8 embeddings)
    compressor: str = "zlib"  # zlib | lzma | zstd | brotli
    level: int | None = None  # null: the compressor's strongest (zlib 9, lzma 9, zstd 22, brotli 11)
    keep_float_max_numel: int = 65536  # float tensors this small are kept (fp16, or fp32 for scalars)
    # The file(s) that stand for the submission's code in code_bytes (relative to where you launch);
    # empty: the speedrun modules the run imported.
    code_files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- rules


@dataclass
class TrackRulesConfig:
    """A track's limits (speedrun/rules.py), checked once per run; null = no such limit."""

    _target_: str = "speedrun.rules.TrackRules"
    name: str = "custom"
    max_artifact_bytes: int | None = None  # model bytes + code bytes
    max_train_seconds: float | None = None
    max_eval_seconds: float | None = None  # the final score's evaluation (eval_time_ms)
    max_val_loss: float | None = None
    val_tokens: int | None = None  # validation tokens the score covers: 0 = the whole split
    gpu_count: int | None = None
    gpu_name: str | None = None  # matched as a substring of the device name, e.g. H100


# --------------------------------------------------------------------------- top level


@dataclass
class Config:
    model: Any = MISSING
    optimizer: Any = MISSING
    schedule: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Any = None
    seed: int = 1337
    export: Any = None
    rules: Any = None


SCHEMA_GROUP = "speedrun_schema"

SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"gpt": GPTConfig, "nanochat": NanochatModelConfig, "modded": ModdedGPTConfig},
    "optimizer": {
        "muon_adam": MuonAdamConfig,
        "adamw": AdamWConfig,
        "nanochat": NanochatOptimizerConfig,
        "modded": ModdedMuonAdamConfig,
    },
    "schedule": {"wallclock_warmdown": WallclockWarmdownConfig, "wsd": WSDConfig},
    "data": {
        "stdlib": StdlibDataConfig,
        "shards": ShardDataConfig,
        "fineweb": FinewebDataConfig,
        "fineweb_gpt2": FinewebGPT2DataConfig,
    },
    "trainer": {"trainer": TrainerConfig},
    "logger": {"wandb": WandbLoggerConfig},
    "export": {"artifact": ArtifactFormatConfig},
    "rules": {"track": TrackRulesConfig},
}


def register_configs() -> None:
    """Store the schemas under `speedrun_schema/<group>/<name>` (out of the way of the option groups).

    Idempotent. Hydra's plugin discovery also calls it (hydra_plugins/speedrun_schemas), so Hydra's
    own `initialize_config_dir` + `compose` over speedrun's config folder works without this call.
    """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="speedrun_config_schema", node=Config)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"{SCHEMA_GROUP}/{group}", name=name, node=node)
