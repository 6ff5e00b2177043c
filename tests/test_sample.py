"""Generation: the GPT's key/value cache against recomputing the whole sequence, sampling, the trainer's
samples and `python -m speedrun.sample` on a real trained run (checkpoint and artifact)."""

from __future__ import annotations

import importlib
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speedrun.generate import generate, pick_token
from speedrun.models import GPT
from speedrun.models.nanochat import NanochatGPT
from speedrun.models.protocol import cast_for_mixed_precision
from speedrun.sample import main as sample_main
from speedrun.samples import build_sampler, prompt_ids
from speedrun.sinks.wandb_reader import read_offline_run
from tests.conftest import REPO, cli_env, read_metrics

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]  # the trainer's defaults

# Every switch of the GPT that changes what attention or the residual stream sees.
SWITCHES = [
    {},
    {"num_kv_heads": 4},
    {"unet_skips": False, "x0_mix": False},
    {"q_gain": False, "qk_norm": False, "logit_softcap": 0.0},
    {"tie_embeddings": False, "mlp_activation": "swiglu"},
    {"mlp_activation": "gelu", "num_layers": 1},
]


def random_gpt(seed: int = 0, **switches) -> GPT:
    """A small GPT with every weight random (none zero-initialised), so that every path carries signal."""
    torch.manual_seed(seed)
    model = GPT(
        **{"vocab_size": 96, "num_layers": 3, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, **switches}
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize(
    "switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "record"
)
def test_the_cache_gives_the_logits_and_tokens_of_recomputing_the_sequence(switches: dict) -> None:
    model = random_gpt(**switches)
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        whole = model.logits(ids)
        cache = model.new_kv_cache(40)
        # A prompt, one token, then several at once after cached ones (the offset causal mask).
        pieces = [model.logits(ids[:, a:b], kv_cache=cache) for a, b in ((0, 9), (9, 10), (10, 40))]
    assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=1e-5)
    prompt = ids[0, :5].tolist()
    assert generate(model, prompt, 48) == generate(model, prompt, 48, use_cache=False)
    sampled = generate(model, prompt, 48, temperature=1.0, seed=7)
    assert sampled == generate(model, prompt, 48, temperature=1.0, seed=7, use_cache=False)


def test_the_cache_follows_the_mixed_precision_recipe() -> None:
    # bf16 embedding and RoPE frequencies (the record's recipe): the cache's positions are rounded as the
    # whole sequence's are, so the two agree to bf16 precision.
    model = random_gpt()
    cast_for_mixed_precision(model)
    ids = torch.randint(0, 96, (1, 300))  # past 256, where bf16 positions start to round
    with torch.no_grad():
        whole = model.logits(ids).float()
        cache = model.new_kv_cache(300)
        stepped = torch.cat([model.logits(ids[:, :200], kv_cache=cache)] + [
            model.logits(ids[:, i : i + 1], kv_cache=cache) for i in range(200, 300)
        ], dim=1).float()  # fmt: skip
    assert (stepped - whole).abs().max() < 0.05 * whole.abs().max()


def test_a_full_cache_is_refused() -> None:
    model = random_gpt()
    cache = model.new_kv_cache(8)
    with torch.no_grad(), pytest.raises(ValueError, match="holds 8 positions; 9 were asked"):
        model.logits(torch.zeros(1, 9, dtype=torch.int64), kv_cache=cache)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone() -> None:
    model = random_gpt()
    rng = torch.get_rng_state()
    first = generate(model, [1, 2, 3], 32, temperature=1.0, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # a resumed run's RNG state is not disturbed
    assert first == generate(model, [1, 2, 3], 32, temperature=1.0, seed=1)
    assert first != generate(model, [1, 2, 3], 32, temperature=1.0, seed=2)


def test_pick_token_greedy_and_top_k() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0, 2.9]])
    assert pick_token(logits, 0.0, None, None).item() == 1
    generator = torch.Generator().manual_seed(0)
    draws = {pick_token(logits, 5.0, 3, generator).item() for _ in range(300)}
    assert draws == {1, 3, 5}  # the three largest logits; a high temperature reaches each of them
    draws = {pick_token(logits, 5.0, None, generator).item() for _ in range(300)}
    assert draws == set(range(6))


def test_vocab_size_keeps_padded_ids_out() -> None:
    model = random_gpt()
    with torch.no_grad():
        model.tok_emb.weight[90:] = model.tok_emb.weight[90:] * 0 + 5.0  # the padded rows win every argmax
    assert max(generate(model, [1, 2], 16)) >= 90
    assert max(generate(model, [1, 2], 16, vocab_size=90)) < 90


class NoLogits(torch.nn.Module):
    def forward(self, x, y):
        return torch.zeros(())


def test_samples_are_skipped_with_one_note_when_the_run_cannot_sample(
    caplog, stdlib_corpus_dir: Path
) -> None:
    from speedrun.data.tokenizer_sentencepiece import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(stdlib_corpus_dir / "stdlib_1024_bpe.model")
    with caplog.at_level(logging.INFO, logger="speedrun"):
        assert build_sampler(random_gpt(), None, PROMPTS, 8, 0.8, seed=0) is None
        assert build_sampler(NoLogits(), tokenizer, PROMPTS, 8, 0.8, seed=0) is None
        assert build_sampler(random_gpt(), tokenizer, PROMPTS, 8, 0.8, seed=0) is not None  # nothing to say
        # A model without a cache samples by recomputing the sequence, and says so once.
        nanochat = NanochatGPT(vocab_size=1024, depth=2, aspect_ratio=16, head_dim=16, sequence_len=32)
        sampler = build_sampler(nanochat, tokenizer, PROMPTS[:1], 4, 0.8, seed=0)
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("samples:")]
    assert len(notes) == 3 and "no tokenizer" in notes[0] and "no logits()" in notes[1]
    assert "NanochatGPT has no key/value cache" in notes[2]
    assert [row["temperature"] for row in sampler.samples()] == [0.0, 0.8]
    assert prompt_ids(tokenizer, "x = 1")[0] == tokenizer.document_start_id  # a prompt opens a document


# ------------------------------------------------------------------ a trained run


def test_the_trainer_writes_samples_to_the_log_metrics_and_wandb(trained_run: Path) -> None:
    records = [r for r in read_metrics(trained_run) if "samples" in r]
    assert [r["step"] for r in records] == [20, 40]  # every sample_every steps, the last one at the end
    for record in records:
        rows = record["samples"]
        assert [(r["prompt"], r["temperature"]) for r in rows] == [
            (p, t) for p in PROMPTS for t in (0.0, 0.8)
        ]
        assert all(isinstance(r["text"], str) and r["text"] for r in rows)
    log = (trained_run / "train.log").read_text()
    assert (
        log.count("samples step 40 | greedy | ") == 3
        and log.count("samples step 20 | temperature 0.8 | ") == 3
    )
    run = read_offline_run(trained_run)
    tables = [row["samples.path"] for row in run["history"] if "samples.path" in row]
    assert len(tables) == 2
    table = (next((trained_run / "wandb").glob("offline-run-*")) / "files" / tables[-1]).read_text()
    content = json.loads(table)
    assert content["columns"] == ["step", "prompt", "temperature", "text"]
    # The latest table holds every sample so far, as metrics.jsonl does.
    assert content["data"] == [
        [r["step"], s["prompt"], s["temperature"], s["text"]] for r in records for s in r["samples"]
    ]


def sample_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "speedrun.sample", *args], cwd=REPO, env=cli_env(), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


def test_the_cli_samples_a_checkpoint_as_the_trainer_did_with_and_without_the_cache(
    trained_run: Path,
) -> None:
    final = [r for r in read_metrics(trained_run) if "samples" in r][-1]["samples"]
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    cached = sample_cli(str(trained_run), *prompts, "--max-new-tokens", "8")
    assert cached.returncode == 0, cached.stderr
    # The end checkpoint holds the final samples' weights: the same greedy text.
    assert cached.stdout == "".join(f"{r['prompt']}{r['text']}\n\n" for r in final if r["temperature"] == 0)
    assert "key/value cache" in cached.stderr and "tokens/s" in cached.stderr
    recomputed = sample_cli(str(trained_run), *prompts, "--max-new-tokens", "8", "--no-cache")
    assert recomputed.stdout == cached.stdout
    assert "recomputing the whole sequence" in recomputed.stderr
    # Seeded sampling at the trainer's temperature: the trainer's sampled text too (seed + prompt index).
    sampled = sample_cli(str(trained_run), *prompts, "--max-new-tokens", "8", "--temperature", "0.8")
    assert sampled.stdout == "".join(
        f"{r['prompt']}{r['text']}\n\n" for r in final if r["temperature"] == 0.8
    )


def test_the_cli_samples_the_artifact_with_and_without_the_cache(trained_run: Path) -> None:
    args = [str(trained_run), "--artifact", "--prompt", "import os\n", "--max-new-tokens", "64"]
    cached, recomputed = sample_cli(*args), sample_cli(*args, "--no-cache")
    assert cached.returncode == 0, cached.stderr
    assert "artifact" in cached.stderr.splitlines()[0]
    assert cached.stdout == recomputed.stdout and cached.stdout.startswith("import os\n")
    assert len(cached.stdout) > len("import os\n\n\n")


def bad_folders(tmp_path: Path, trained_run: Path) -> dict[str, Path]:
    empty = tmp_path / "empty"
    empty.mkdir()
    artifact_only = tmp_path / "artifact_only"
    artifact_only.mkdir()
    shutil.copy(trained_run / "final_model.int8.ptz", artifact_only)
    corrupt = tmp_path / "corrupt"
    (corrupt / "checkpoints").mkdir(parents=True)
    (corrupt / "checkpoints" / "step_000000040.pt").write_bytes(b"not a checkpoint")
    return {"empty": empty, "artifact_only": artifact_only, "corrupt": corrupt}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}", "--prompt", "x"], "is not a folder"),
        (["{empty}", "--prompt", "x"], "no valid checkpoint in"),
        (["{empty}", "--prompt", "x", "--artifact"], "final_model.int8.ptz not found"),
        (["{artifact_only}", "--prompt", "x", "--artifact"], ".hydra/config.yaml not found"),
        (["{corrupt}", "--prompt", "x"], "no valid checkpoint in"),
        (["{run}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens=0 must be at least 1"),
        (["{run}", "--prompt", "x", "--temperature", "-1"], "--temperature=-1.0 must be 0"),
        (["{run}", "--prompt", "x", "--top-k", "0"], "--top-k=0 must be at least 1"),
        (["{run}", "--prompt", "x", "--tokenizer", "{missing}/t.model"], "t.model"),
        (["{run}"], "the following arguments are required: --prompt"),
        (["{run}", "--prompt", "x", "--max-new-tokens", "many"], "invalid int value: 'many'"),
    ],
)
def test_bad_input_is_one_error_line(
    tmp_path: Path, trained_run: Path, capsys, args: list[str], message: str
) -> None:
    folders = {**bad_folders(tmp_path, trained_run), "run": trained_run, "missing": tmp_path / "missing"}
    argv = [a.format(**folders) for a in args]
    try:
        status = sample_main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        status = exit_.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not (trained_run / "checkpoints" / "step_000000040.pt.corrupt").exists()


def test_a_corrupt_checkpoint_is_skipped_for_the_previous_one_and_left_in_place(
    tmp_path: Path, trained_run: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("wandb"))
    newest = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    newest.write_bytes(b"torn")
    proc = sample_cli(str(run), "--prompt", "x", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("warning: checkpoint") and "trying the previous checkpoint" in proc.stderr
    assert newest.read_bytes() == b"torn"  # sampling never changes a run folder


def test_the_console_script_speedrun_sample_is_this_cli() -> None:
    declared = re.search(
        r'^speedrun-sample = "(.+):(.+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE
    )
    assert declared, "pyproject.toml [project.scripts] declares no speedrun-sample"
    module, function = declared.groups()
    assert getattr(importlib.import_module(module), function) is sample_main


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cache_under_bf16_autocast_on_cuda_matches_the_whole_sequence() -> None:
    model = random_gpt().cuda()
    cast_for_mixed_precision(model)
    ids = torch.randint(0, 96, (1, 64), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        whole = model.logits(ids).float()
        cache = model.new_kv_cache(64)
        pieces = [model.logits(ids[:, :32], kv_cache=cache)]
        pieces += [model.logits(ids[:, i : i + 1], kv_cache=cache) for i in range(32, 64)]
        stepped = torch.cat(pieces, dim=1).float()
        generated = generate(model, ids[0, :4].tolist(), 32)
    assert (stepped - whole).abs().max() < 0.05 * whole.abs().max()
    assert len(generated) == 32 and all(0 <= t < 96 for t in generated)
