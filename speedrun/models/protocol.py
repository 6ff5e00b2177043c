"""What the rest of speedrun needs from a model: a small protocol, with defaults for models that say nothing.

A model is any `nn.Module` whose `forward(input_ids, target_ids)` returns the mean next-token
cross-entropy (a scalar). A model may also define, and speedrun then uses:

- `parameter_roles() -> dict[str, str]`: each parameter's name -> its role, one of `ROLES`:
  `embed` (token embeddings), `head` (an untied output projection), `matrix` (2-D weights inside
  the network, what Muon orthogonalises) and `scalar` (vectors, gains, mixes: small control tensors
  that get their own Adam, stay fp32 in mixed precision and are stored unquantised in the
  artifact). Optimizers receive their parameters grouped by role; the export keeps `scalar`
  tensors in fp32. Without it: embedding-module weights are `embed`, other tensors of 2 or more
  dimensions `matrix`, the rest `scalar`.
- `flops_per_token(seq_len) -> float`: training FLOPs per token, for MFU and the FLOPs horizon.
  Without it: 6 x the parameters in `matrix` and `head` roles (no attention term).
- `cast_for_mixed_precision() -> None`: the precision recipe for bf16 autocast training, called once
  when a job trains in bf16 (`trainer.precision`), after the model is on its device and before the
  optimizer is built (parameter-golf's keeps its embedding in bf16 and the rest in fp32).
  Without it: every parameter stays fp32 and autocast alone casts.
- `set_progress(fraction) -> None`: how far training is through its horizon, in [0, 1] (steps done /
  max_steps, or training time / the wallclock cap, whichever is further along), told before every
  training step and every evaluation; for models that change with training (modded-nanogpt's
  attention windows grow). Without it: nothing is told.
- `logits(input_ids) -> Tensor`: the next-token logits at every position, (batch, seq, vocab), as
  `forward` computes them before its loss. Sampling (`speedrun.generate`) needs it; without it a model
  trains and evaluates but cannot be sampled from (the trainer's samples are skipped with one note).
- `new_kv_cache(max_len) -> cache`: an empty key/value cache of `max_len` positions for generation (see
  `speedrun/models/kv_cache.py`). A model that has it also accepts `logits(input_ids, kv_cache=cache)`:
  input_ids are then the continuation of the positions the cache holds; their keys and values are added
  to it and only their logits are computed, so each generated token costs one position's work. Without
  it generation recomputes the whole sequence for every token (same tokens, slower).

Targets equal to `IGNORE_INDEX` (-100, `F.cross_entropy`'s default `ignore_index`) are not scored: the
mean `forward` returns is over the other targets. Sliding-window evaluation (speedrun/eval.py) marks the
targets a window does not score that way, so a model's loss must honour it (every shipped model's does).

No other module names a model's attributes: optimizers, export and the trainer go through the
functions below.
"""

from __future__ import annotations

from torch import nn

ROLES = ("embed", "head", "matrix", "scalar")
# Targets with this id are left out of the loss (torch's default ignore_index for cross_entropy).
IGNORE_INDEX = -100


def default_roles(model: nn.Module) -> dict[str, str]:
    """Roles for a model that does not declare them (see the module docstring)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    roles = {}
    for name, param in model.named_parameters():
        if id(param) in embedding_weights:
            roles[name] = "embed"
        else:
            roles[name] = "matrix" if param.ndim >= 2 else "scalar"
    return roles


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Every trainable, non-empty parameter's name -> role, checked: each in exactly one known role."""
    declared = getattr(model, "parameter_roles", None)
    roles = declared() if callable(declared) else default_roles(model)
    params = {name: p for name, p in model.named_parameters() if p.numel() > 0}
    unknown = sorted(name for name, role in roles.items() if role not in ROLES)
    if unknown:
        raise ValueError(
            f"parameters {unknown} have roles outside {ROLES}; fix {type(model).__name__}.parameter_roles"
        )
    missing = sorted(set(params) - set(roles))
    if missing:
        raise ValueError(
            f"parameters {missing} have no role; add them to {type(model).__name__}.parameter_roles"
        )
    extra = sorted(set(roles) - set(params))
    if extra:
        raise ValueError(
            f"{type(model).__name__}.parameter_roles names {extra}, which are not its parameters"
        )
    return roles


def parameter_groups(model: nn.Module) -> list[dict]:
    """Torch-style param groups, one per non-empty role, in `ROLES` order: `{"name": role, "params": [...]}`.

    Within a role, parameters keep the order `parameter_roles` lists them in (Muon shares its work out
    over the ranks by that order). Any torch optimizer accepts this list, extra `name` key included.
    """
    params = dict(model.named_parameters())
    roles = parameter_roles(model)
    groups = []
    for role in ROLES:
        members = [params[name] for name, r in roles.items() if r == role]
        if members:
            groups.append({"name": role, "params": members})
    return groups


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters in total and by role (`embed`, `head`, `matrix`, `scalar`), each counted once."""
    params = dict(model.named_parameters())
    roles = parameter_roles(model)
    counts = {role: 0 for role in ROLES}
    for name, role in roles.items():
        counts[role] += params[name].numel()
    return {"total": sum(p.numel() for p in model.parameters()), **counts}


def scalar_parameter_names(model: nn.Module) -> set[str]:
    """Names of the `scalar` role: the control tensors the artifact stores in fp32."""
    return {name for name, role in parameter_roles(model).items() if role == "scalar"}


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: the model's own count, else 6 per matmul weight (matrix and head roles)."""
    declared = getattr(model, "flops_per_token", None)
    if callable(declared):
        return float(declared(seq_len))
    counts = parameter_counts(model)
    return float(6 * (counts["matrix"] + counts["head"]))


def cast_for_mixed_precision(model: nn.Module) -> None:
    """Apply the model's bf16 training recipe, if it has one."""
    declared = getattr(model, "cast_for_mixed_precision", None)
    if callable(declared):
        declared()


def set_progress(model: nn.Module, fraction: float) -> None:
    """Tell the model how far through its horizon training is, if it wants to know."""
    declared = getattr(model, "set_progress", None)
    if callable(declared):
        declared(fraction)


def can_generate(model: nn.Module) -> bool:
    """Whether the model computes logits, which sampling needs."""
    return callable(getattr(model, "logits", None))


def has_kv_cache(model: nn.Module) -> bool:
    """Whether the model keeps a key/value cache for generation (else each token recomputes the sequence)."""
    return callable(getattr(model, "new_kv_cache", None))


def new_kv_cache(model: nn.Module, max_len: int) -> object | None:
    """An empty key/value cache for `max_len` positions, or None when the model has no cache."""
    declared = getattr(model, "new_kv_cache", None)
    return declared(max_len) if callable(declared) else None
