"""`python -m speedrun.sample RUN_DIR --prompt TEXT`: what a trained run writes after a prompt.

The weights come from the run's newest valid checkpoint (with the exact config it was trained with), or
with `--artifact` from its int8 + zlib artifact, the file a parameter-golf submission is judged by (with
the config in `.hydra/config.yaml`). The prompt is read as the opening of a document (the tokenizer's
document token first, as in the shards) and continued by `--max-new-tokens` tokens, greedily by default
or at `--temperature` (seeded), with the model's key/value cache when it has one (`--no-cache`
recomputes the whole sequence for every token: the same tokens, to compare speed). The text goes to
stdout, one block per prompt; timings go to stderr.

torch and the models are imported only once the arguments are read, so `--help` and bad flags answer
at once; every error a user can cause is one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from speedrun.cli import Parser

ARTIFACT_NAME = "final_model.int8.ptz"


class SampleError(Exception):
    """A run folder, file or flag that cannot be sampled from; the message names it and the fix."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m speedrun.sample",
        description="Generate text from a run's newest checkpoint or its int8 artifact.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (outputs/<date>/<time>)")
    parser.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (default): greedy; above 0: sample at this temperature",
    )
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling (default 1337)")
    parser.add_argument(
        "--artifact", nargs="?", const="", default=None, metavar="PATH",
        help=f"use the int8 artifact (RUN_DIR/{ARTIFACT_NAME}, or PATH) instead of the newest checkpoint",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer", default=None, metavar="SPEC",
        help="tokenizer to use instead of the run's data.tokenizer (a .model, .tiktoken or .json file, or gpt2)",
    )  # fmt: skip
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute the whole sequence for every token"
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available"
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise SampleError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    if args.temperature < 0 or args.temperature != args.temperature:
        raise SampleError(f"--temperature={args.temperature} must be 0 (greedy) or above")
    if args.top_k is not None and args.top_k < 1:
        raise SampleError(f"--top-k={args.top_k} must be at least 1")
    if not args.run_dir.is_dir():
        raise SampleError(f"{args.run_dir} is not a folder; give a run folder (outputs/<date>/<time>)")


def newest_checkpoint(run_dir: Path) -> tuple[dict, Path]:
    """The newest checkpoint that loads (a corrupt one is skipped with a warning, and left where it is:
    sampling never changes a run folder)."""
    from speedrun.checkpoint import CheckpointError, CheckpointManager, load_checkpoint

    manager = CheckpointManager(run_dir / "checkpoints")
    for path in manager.paths():
        try:
            return load_checkpoint(path, mmap=True), path  # mmap: the optimizer's tensors are never read
        except CheckpointError as exc:
            print(f"warning: {exc}; trying the previous checkpoint", file=sys.stderr)
    raise SampleError(
        f"no valid checkpoint in {manager.folder}; sample from the artifact (--artifact), or train with "
        "checkpoints (the end of every run writes one)"
    )


def run_config(run_dir: Path) -> dict:
    """The run's composed config, `.hydra/config.yaml`, resolved."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise SampleError(f"{path} not found: {run_dir} is not a run folder written by speedrun.train")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def load_weights(args: argparse.Namespace) -> tuple[dict, dict, str]:
    """(model state dict, the config of the run that made it, where it came from)."""
    from speedrun.export import load_artifact

    if args.artifact is None:
        state, path = newest_checkpoint(args.run_dir)
        return state["model"], state["config"], f"checkpoint {path}"
    path = Path(args.artifact) if args.artifact else args.run_dir / ARTIFACT_NAME
    if not path.is_file():
        raise SampleError(
            f"artifact {path} not found (a run writes it when it completes with trainer.export=true); "
            "leave out --artifact to sample from the newest checkpoint"
        )
    return load_artifact(path), run_config(args.run_dir), f"artifact {path}"


def load_model(model_config: dict, state: dict, device):
    from hydra.utils import instantiate

    from speedrun.models.protocol import can_generate, set_progress

    model = instantiate(model_config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise SampleError(f"the weights do not fit the run's model.* config ({first_line})") from None
    if not can_generate(model):
        raise SampleError(f"{type(model).__name__} has no logits() method (speedrun/models/protocol.py)")
    # Models that change with training progress (modded-nanogpt's windows) sample as at the end of it.
    set_progress(model, 1.0)
    return model.to(device).eval()


def load_run_tokenizer(args: argparse.Namespace, config: dict, model_vocab: int | None):
    from hydra.utils import instantiate

    from speedrun.data.tokenizer_kinds import load_tokenizer

    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        tokenizer = instantiate(config["data"]).tokenizer()
        if tokenizer is None:
            raise SampleError(
                "the run's data has no tokenizer (data.tokenizer is null) to read the prompt and write text; "
                "name one with --tokenizer PATH (or gpt2)"
            )
    if model_vocab is not None and tokenizer.vocab_size > model_vocab:
        raise SampleError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocabulary of {model_vocab}; "
            "use the tokenizer the run was trained with"
        )
    return tokenizer


def sample(args: argparse.Namespace) -> int:
    check_args(args)
    import torch

    from speedrun.models.protocol import has_kv_cache
    from speedrun.samples import continuation

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SampleError("--device cuda: no CUDA device is visible; use --device cpu")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    state, config, source = load_weights(args)
    model = load_model(config["model"], state, device)
    tokenizer = load_run_tokenizer(args, config, config["model"].get("vocab_size"))
    use_cache = has_kv_cache(model) and not args.no_cache
    how = "key/value cache" if use_cache else "recomputing the whole sequence for every token"
    if not has_kv_cache(model):
        how += f" ({type(model).__name__} has no key/value cache)"
    print(f"sampling from {source} on {device}, {how}", file=sys.stderr)
    for index, prompt in enumerate(args.prompt):
        started = time.perf_counter()
        text = continuation(
            model, tokenizer, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            seed=args.seed + index, use_cache=use_cache,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        print(f"{prompt}{text}\n", flush=True)
        print(f"{args.max_new_tokens} tokens in {seconds:.2f} s ({args.max_new_tokens / seconds:.1f} tokens/s)",
              file=sys.stderr)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from speedrun.checkpoint import CheckpointError
    from speedrun.data import DataError
    from speedrun.data.tokenizer import TokenizerError
    from speedrun.export import ArtifactError

    try:
        return sample(args)
    except (SampleError, CheckpointError, ArtifactError, DataError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
