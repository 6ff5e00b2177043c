"""Every error a user can cause is one `error:` line naming the key or file, never a traceback, and never
costs an earlier result: each bad command below runs against a completed run's folder, which must come
out unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, cli_env, read_summary, run_train

pytestmark = pytest.mark.usefixtures("corpus")

TRAIN = [sys.executable, "-m", "speedrun.train", *TINY]
PREPARE = [sys.executable, "-m", "speedrun.prepare"]
COMPARE = [sys.executable, "-m", "speedrun.compare"]
FINEWEB = [sys.executable, "-m", "speedrun.data.fineweb"]

# (command after TRAIN/PREPARE/..., the text the error line must name). {run}: the completed run's folder,
# {tmp}: a scratch folder, {file}: a file that is not a folder, {empty}: an empty folder.
CASES = {
    # Values outside their domain, caught before torch is imported.
    "negative learning rate": (TRAIN, ["optimizer.matrix_lr=-1"], "optimizer.matrix_lr"),
    "learning rate nan": (TRAIN, ["optimizer.matrix_lr=nan"], "optimizer.matrix_lr"),
    "momentum above 1": (TRAIN, ["optimizer.momentum=2"], "optimizer.momentum"),
    "beta2 of 1": (TRAIN, ["optimizer.beta2=1.0"], "optimizer.beta2"),
    "zero eps": (TRAIN, ["optimizer.eps=0"], "optimizer.eps"),
    "no Newton-Schulz steps": (TRAIN, ["optimizer.backend_steps=0"], "optimizer.backend_steps"),
    "negative clipping": (TRAIN, ["optimizer.grad_clip_norm=-1"], "optimizer.grad_clip_norm"),
    "no layers": (TRAIN, ["model.num_layers=0"], "model.num_layers"),
    "no heads": (TRAIN, ["model.num_heads=0"], "model.num_heads"),
    "no MLP": (TRAIN, ["model.mlp_mult=0"], "model.mlp_mult"),
    "negative softcap": (TRAIN, ["model.logit_softcap=-1"], "model.logit_softcap"),
    "negative validation tokens": (TRAIN, ["data.val_tokens=-1"], "data.val_tokens"),
    "warmdown ratio above 1": (TRAIN, ["schedule.warmdown_ratio=1.5"], "schedule.warmdown_ratio"),
    "warm-up past the horizon": (TRAIN, ["trainer.warmup_steps=100000", "trainer.max_steps=5"], "trainer.warmup_steps"),
    "no horizon": (TRAIN, ["trainer.max_steps=0", "trainer.max_wallclock_seconds=0"], "trainer.max_steps"),
    "validation batch below a sequence": (TRAIN, ["trainer.val_batch_tokens=1"], "trainer.val_batch_tokens"),
    # Keys, types and options.
    "typo in a key": (TRAIN, ["model.nmu_layers=3"], "model.nmu_layers"),
    "typo added with +": (TRAIN, ["+trainer.max_step=5"], "trainer.max_step"),
    "unknown top-level key": (TRAIN, ["+foo=1"], "foo"),
    "text for a number": (TRAIN, ["trainer.max_steps=ten"], "trainer.max_steps"),
    "text for the seed": (TRAIN, ["seed=abc"], "seed"),
    "unknown option": (TRAIN, ["model=no_such_model"], "no_such_model"),
    "unknown nproc": (TRAIN, ["trainer.nproc_per_node=two"], "trainer.nproc_per_node"),
    "unknown compile": (TRAIN, ["trainer.compile=sometimes"], "trainer.compile"),
    "unknown device": (TRAIN, ["trainer.device=tpu"], "trainer.device"),
    "unknown precision": (TRAIN, ["trainer.precision=fp8"], "trainer.precision"),
    "unknown wandb mode": (TRAIN, ["logger=wandb", "logger.mode=sometimes"], "logger.mode"),
    "bad override syntax": (TRAIN, ["model="], "model"),
    # Shapes that do not fit.
    "heads that do not divide": (TRAIN, ["model.model_dim=100", "model.num_heads=3"], "model.num_heads=3"),
    "kv heads that do not divide": (TRAIN, ["model.num_kv_heads=3"], "model.num_kv_heads=3"),
    "batch that does not split": (TRAIN, ["trainer.train_batch_tokens=1000"], "trainer.train_batch_tokens"),
    "shards without a folder": (TRAIN, ["data=shards"], "data.path"),
    # Files and folders, found missing or wrong after the config is read.
    "missing data folder": (TRAIN, ["data=shards", "data.path={tmp}/nowhere"], "{tmp}/nowhere"),
    "data folder that is a file": (TRAIN, ["data=shards", "data.path={file}"], "{file}"),
    "data folder without shards": (TRAIN, ["data=shards", "data.path={empty}"], "{empty}"),
    "missing checkpoint": (TRAIN, ["trainer.resume={tmp}/none.pt"], "{tmp}/none.pt"),
    "vocabulary smaller than the tokenizer's": (TRAIN, ["model.vocab_size=512"], "model.vocab_size"),
    "changed config over the run": (TRAIN, ["data.seq_len=32"], "data.seq_len"),
    "fresh start over the run": (TRAIN, ["trainer.resume=never"], "trainer.resume"),
    "forced resume into another model": (TRAIN, ["model.num_layers=3", "trainer.resume_force=true"], "blocks.2."),
    # The other tools.
    "prepare: missing input": (PREPARE, ["--input", "{tmp}/none.txt", "--output", "{tmp}/out", "--vocab-size", "300"], "{tmp}/none.txt"),
    "prepare: vocabulary beyond uint16": (PREPARE, ["--input", "{file}", "--output", "{tmp}/out", "--vocab-size", "70000"], "70000"),
    "prepare: no output": (PREPARE, ["--input", "{file}", "--vocab-size", "300"], "--output"),
    "prepare: missing tokenizer": (PREPARE, ["--input", "{file}", "--output", "{tmp}/out", "--tokenizer", "{tmp}/t.model"], "{tmp}/t.model"),
    "compare: alpha above 1": (COMPARE, ["{run}", "--alpha", "2"], "--alpha"),
    "compare: target nan": (COMPARE, ["{run}", "--target", "nan"], "--target"),
    "compare: missing folder": (COMPARE, ["{tmp}/none"], "{tmp}/none"),
    "fineweb: unknown variant": (FINEWEB, ["--variant", "nope", "--train-shards", "1"], "nope"),
}  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder, but the attempts log (where a refused attempt may leave its line)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "attempts.jsonl"}  # fmt: skip


@pytest.fixture(scope="module")
def completed(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("completed") / "run"
    run_train(run_dir, "trainer.max_steps=2", "trainer.val_every=0")
    assert read_summary(run_dir)["status"] == "completed"
    return run_dir


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_bad_input_is_one_error_line_and_costs_nothing(case, completed, tmp_path):
    program, arguments, needle = CASES[case]
    (tmp_path / "file.txt").write_text("some text\n")
    (tmp_path / "empty").mkdir()
    fill = {"{run}": str(completed), "{tmp}": str(tmp_path), "{file}": str(tmp_path / "file.txt"),
            "{empty}": str(tmp_path / "empty")}  # fmt: skip

    def filled(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    command = [*program, *map(filled, arguments)]
    if program is TRAIN:
        command.append(f"hydra.run.dir={completed}")
    before = snapshot(completed)
    proc = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=50)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0, output
    assert len(errors) == 1, output
    assert filled(needle) in errors[0], errors[0]
    assert "Traceback" not in output, output
    assert snapshot(completed) == before


def test_a_bad_speedrun_cache_is_named(tmp_path):
    (tmp_path / "a-file").write_text("")
    env = cli_env(SPEEDRUN_CACHE=str(tmp_path / "a-file"))
    proc = subprocess.run([*TRAIN, f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "SPEEDRUN_CACHE" in errors[0], (
        proc.stdout + proc.stderr
    )


def test_config_errors_never_import_torch(tmp_path):
    """The reason config errors are instant: they are found before torch is imported (here, a torch that
    cannot be imported), with nproc_per_node=auto as well (which counts GPUs only afterwards)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    env = cli_env(PYTHONPATH=str(tmp_path))
    for bad in (
        ["optimizer.matrix_lr=-1"],
        ["+trainer.max_step=5"],
        ["trainer.nproc_per_node=auto", "model.num_layers=0"],
    ):
        proc = subprocess.run([*TRAIN, *bad, f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode != 0 and "torch was imported" not in proc.stdout + proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: "), proc.stderr
    assert not (tmp_path / "run").exists()
