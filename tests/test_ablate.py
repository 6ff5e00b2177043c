"""The ablation sweep (`+sweep=ablate`): the record GPT's tricks switched off one at a time next to the
baseline, run through the real CLI; what each switch does to the model's parameters as the run
reports it; the untied-embedding learning rate; control patterns reaching the artifact; parameter
accounting per preset."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate

from speedrun.config import CONF_DIR, compose
from speedrun.models.protocol import parameter_counts, parameter_groups
from tests.conftest import TINY, cli_env, read_summary, run_train

OPTIONS = sorted(path.stem for path in (CONF_DIR / "ablate").glob("*.yaml"))
SEEDS = ("1337", "1338")
# gpt_tiny: 2 layers x 64, 2 heads, vocab 1024; its MLP is 128 wide (SwiGLU: 2/3 of it, to 88).
LAYERS, DIM, HEADS, VOCAB = 2, 64, 2, 1024
# What each option does to the parameter count of each role, against the baseline.
ROLE_DELTAS = {
    "baseline": {},
    "no_unet_skips": {"scalar": -(LAYERS // 2) * DIM},
    "no_x0_mix": {"scalar": -LAYERS * 2 * DIM},
    "no_q_gain": {"scalar": -LAYERS * HEADS},
    "no_qk_norm": {},
    "no_softcap": {},
    "no_zero_init": {},
    "no_tied_embeddings": {"head": VOCAB * DIM},
    "gelu": {},
    "swiglu": {"matrix": LAYERS * (3 * DIM * 88 - 2 * DIM * 128)},
}


def run_cli(module: str, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


def test_every_switch_of_the_gpt_has_an_ablate_option_and_the_sweep_runs_them_all():
    sweep = yaml.safe_load((CONF_DIR / "sweep" / "ablate.yaml").read_text())
    swept = sweep["hydra"]["sweeper"]["params"]["+ablate"].split(",")
    assert sorted(swept) == OPTIONS and swept[0] == "baseline"
    assert set(OPTIONS) == set(ROLE_DELTAS)
    # Every option but the baseline changes one model key, to a value other than the schema's.
    baseline = compose(["model=gpt_tiny", "+ablate=baseline"]).model
    for option in OPTIONS:
        model = compose(["model=gpt_tiny", f"+ablate={option}"]).model
        changed = [key for key in baseline if model[key] != baseline[key]]
        assert len(changed) == (0 if option == "baseline" else 1), (option, changed)


@pytest.fixture(scope="module")
def ablate_sweep(tmp_path_factory, corpus) -> tuple[Path, subprocess.CompletedProcess]:
    """`+sweep=ablate` on the tiny GPT, two seeds, three steps: 20 jobs of a second or two each."""
    cwd = tmp_path_factory.mktemp("ablate")
    proc = run_cli(
        "speedrun.train", "+sweep=ablate", *TINY, f"seed={','.join(SEEDS)}", "trainer.max_steps=3",
        "trainer.val_every=3", "trainer.export=false", f"data.cache_dir={corpus}",
        # One micro-batch per step and a short validation: 20 jobs in one process, a second or so each.
        "trainer.micro_batch_tokens=1024", "data.val_tokens=2048", "trainer.val_batch_tokens=2048",
        cwd=cwd, timeout=170,
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    (sweep,) = (cwd / "multirun_outputs").iterdir()
    return sweep, proc


@pytest.mark.timeout(200)
def test_ablate_sweep_runs_every_switch_over_the_seeds(ablate_sweep):
    sweep, proc = ablate_sweep
    assert f"{len(OPTIONS) * len(SEEDS)}/{len(OPTIONS) * len(SEEDS)} jobs completed" in proc.stdout
    runs: dict[tuple[str, str], dict] = {}
    for job in (p for p in sweep.iterdir() if p.is_dir()):
        overrides = dict(
            line.split("=", 1) for line in yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        )
        option, seed = overrides["+ablate"], overrides["seed"]
        assert job.name.split("_", 1)[1].startswith(f"+ablate={option},seed={seed}")  # swept keys first
        summary = read_summary(job)
        assert summary["status"] == "completed" and summary["val_bpb"] is not None, (job.name, summary)
        assert summary["seed"] == int(seed)
        runs[option, seed] = summary
    assert set(runs) == {(option, seed) for option in OPTIONS for seed in SEEDS}
    # Each job ran its switch: the parameter counts it reports differ from the baseline's by exactly
    # what the switch removes or adds.
    base = runs["baseline", SEEDS[0]]["params_by_role"]
    for (option, _), summary in runs.items():
        expected = {role: count + ROLE_DELTAS[option].get(role, 0) for role, count in base.items()}
        assert summary["params_by_role"] == expected, option
        assert summary["params"] == sum(expected.values())
    # Switches that keep the parameters still change the run (the same seed, another loss).
    for option in ("no_qk_norm", "no_softcap", "no_zero_init", "gelu"):
        assert runs[option, SEEDS[0]]["val_bpb"] != runs["baseline", SEEDS[0]]["val_bpb"], option


def compare_has_baseline_option() -> bool:
    proc = run_cli("speedrun.compare", "--help", cwd=Path.cwd(), timeout=60)
    return "--baseline" in proc.stdout


@pytest.mark.timeout(260)
def test_compare_shows_each_switchs_delta_against_the_baseline(ablate_sweep):
    if not compare_has_baseline_option():
        pytest.skip("speedrun.compare has no --baseline option in this checkout (the Δ table lands with it)")
    sweep, _ = ablate_sweep
    proc = run_cli("speedrun.compare", sweep, "--baseline", "ablate=baseline", cwd=sweep.parent, timeout=60)
    assert proc.returncode == 0, explain(proc)
    lines = proc.stdout.splitlines()
    # One row per switch: its name, two seeds, a signed Δ and the confidence interval of Δ.
    for option in OPTIONS:
        if option == "baseline":
            continue
        rows = [line for line in lines if f"ablate={option} " in line and "[" in line]
        assert len(rows) == 1, (option, proc.stdout[-3000:])
        assert re.search(r"\| 2 +\|.*[+-]\d+\.\d+.*\[[+-]\d+\.\d+, [+-]\d+\.\d+\]", rows[0]), rows[0]
    assert "Welch" in proc.stdout


# ------------------------------------------------------------------ the untied embedding's learning rate


@pytest.mark.parametrize("optimizer, tied_lr, untied_lr", [("muon_adam", 0.05, 0.6), ("adamw", 0.01, 0.12)])
def test_untied_embedding_uses_its_own_learning_rate(optimizer, tied_lr, untied_lr):
    def embed_lr(*overrides: str) -> float:
        cfg = compose(["model=gpt_tiny", f"optimizer={optimizer}", *overrides])
        built = instantiate(cfg.optimizer)(parameter_groups(instantiate(cfg.model)))
        (lr,) = [group["lr"] for group in built.param_groups if group["name"] == "embed"]
        return lr

    assert embed_lr() == tied_lr
    assert embed_lr("+ablate=no_tied_embeddings") == untied_lr
    # Each key serves its own case only.
    assert embed_lr("optimizer.untied_embed_lr=0.3") == tied_lr
    assert embed_lr("+ablate=no_tied_embeddings", "optimizer.embed_lr=0.3") == untied_lr
    assert embed_lr("+ablate=no_tied_embeddings", "optimizer.untied_embed_lr=0.3") == 0.3


# ------------------------------------------------------------------ control patterns, end to end


@pytest.mark.usefixtures("corpus")
@pytest.mark.timeout(120)
def test_control_patterns_reach_the_artifact_and_the_summary_counts_the_roles(tmp_path):
    # c_q joins the control tensors; resid_mix leaves them.
    patterns = "[attn_scale,mlp_scale,q_gain,skip_weight,c_q]"
    run_dir = tmp_path / "run"
    run_train(run_dir, f"model.control_patterns={patterns}", "trainer.max_steps=2", "trainer.val_every=2")
    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    # c_q (64 x 64) moves from matrix to scalar, resid_mix (2 x 64) the other way.
    default = parameter_counts(instantiate(compose(["model=gpt_tiny"]).model))
    moved = LAYERS * (DIM * DIM - 2 * DIM)
    assert summary["params_by_role"] == {
        "embed": default["embed"], "head": 0, "matrix": default["matrix"] - moved,
        "scalar": default["scalar"] + moved,
    }  # fmt: skip
    raw = zlib.decompress((run_dir / "final_model.int8.ptz").read_bytes())
    kept = torch.load(io.BytesIO(raw), weights_only=True)["passthrough"]
    assert kept["blocks.0.attn.c_q.weight"].dtype == torch.float32  # a control tensor: fp32
    assert kept["blocks.0.resid_mix"].dtype == torch.float16  # no longer one: fp16, like other small tensors


# ------------------------------------------------------------------ parameter accounting per preset


def test_record_preset_counts_17_059_912_parameters_by_role():
    model = instantiate(compose(["experiment=pg_seq4096_v1"]).model)
    blocks, dim, kv_dim, hidden = 9, 512, 256, 1024
    embed = 1024 * dim
    matrix = blocks * (2 * dim * dim + 2 * dim * kv_dim + 2 * dim * hidden)  # q, proj; k, v; fc, proj
    scalar = blocks * (2 * dim + 2 * dim + 8) + (blocks // 2) * dim  # scales, resid_mix, q_gain; skips
    assert parameter_counts(model) == {
        "total": 17_059_912, "embed": embed, "head": 0, "matrix": matrix, "scalar": scalar,
    }  # fmt: skip


@pytest.mark.usefixtures("corpus")
@pytest.mark.timeout(120)
def test_a_bad_switch_value_is_one_error_line_naming_the_key(tmp_path):
    proc = run_train(tmp_path / "run", "model.mlp_activation=tanh", check=False)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and "Traceback" not in output
    assert len(errors) == 1 and "model.mlp_activation='tanh'" in errors[0] and "swiglu" in errors[0], errors
    assert read_summary(tmp_path / "run")["status"] == "failed"
