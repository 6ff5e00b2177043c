"""Sweeps end to end: `python -m speedrun.train +sweep=...` as real subprocesses, each job's offline wandb
run read back from disk, the end-of-sweep failure report, and `python -m speedrun.compare` on the result."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import setup_globals
from omegaconf import OmegaConf, open_dict

from speedrun.callbacks import natural_key
from speedrun.config import register_configs, validate_config
from speedrun.config.resolvers import MAX_SHORT_NAME_CHARS, register_resolvers, safe_name
from speedrun.sinks.wandb_reader import find_offline_runs, read_offline_run
from tests.conftest import REPO, TINY, cli_env, read_summary

pytestmark = pytest.mark.usefixtures("corpus")

register_configs()
register_resolvers()

# TINY without the keys a sweep sets: a plain `data.seq_len=64` on the command line would replace the
# preset's seq_len values (the command line wins over `hydra.sweeper.params`, key by key).
SWEEP_TINY = [o for o in TINY if not o.startswith(("data.seq_len=", "logger="))]
SHORT = ["trainer.max_steps=4", "trainer.export=false", "logger=wandb", "logger.mode=offline"]
SWEEP_DIR_NAME = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d")
HASHED_NAME = re.compile(r"(?P<head>.+)_[0-9a-f]{8}")
UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


def run_cli(module: str, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


def job_folders(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name))


def job_overrides(job: Path) -> dict[str, str]:
    lines = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return dict(line.split("=", 1) for line in lines)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.timeout(200)
def test_lr_x_seq_len_sweep_logs_every_job_to_wandb_and_compares(tmp_path, corpus):
    # Run from an empty folder so that the default `multirun_outputs/<date>_<time>/` lands in tmp_path.
    # The preset's seq_len values (128, 256) need micro-batches of 256 tokens: 1024 / 8 would be 128.
    # data.cache_dir holds `/`s, and with TINY the override summary is far too long for a folder name.
    proc = run_cli(
        "speedrun.train", "+sweep=lr_x_seq_len", *SWEEP_TINY, *SHORT, "trainer.micro_batch_tokens=256",
        f"data.cache_dir={corpus}", cwd=tmp_path, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    sweeps = list((tmp_path / "multirun_outputs").iterdir())
    assert len(sweeps) == 1 and SWEEP_DIR_NAME.fullmatch(sweeps[0].name), sweeps
    sweep = sweeps[0]
    assert "4/4 jobs completed" in proc.stdout

    jobs = job_folders(sweep)
    assert [job.name.split("_")[0] for job in jobs] == ["0", "1", "2", "3"]
    assert len({job.name for job in jobs}) == 4
    swept = set()
    for job in jobs:
        overrides = job_overrides(job)
        lr, seq_len = overrides["optimizer.matrix_lr"], overrides["data.seq_len"]
        swept.add((lr, seq_len))
        # A folder name that is safe (no `/` from the path, so no nested folders), in the short form (keys by
        # their last part) since the whole is long, cut only between two items of overrides the preset does
        # not sweep: every item left in it is one of the job's overrides, whole, swept keys first.
        assert (job / "summary.json").is_file()
        assert len(job.name) <= len("0_") + MAX_SHORT_NAME_CHARS
        head = HASHED_NAME.fullmatch(job.name.split("_", 1)[1])
        name = head["head"] if head else job.name.split("_", 1)[1]
        short = {UNSAFE.sub("_", f"{key.rsplit('.', 1)[-1]}={value}") for key, value in overrides.items()}
        assert set(name.split(",")) <= short, job.name
        assert name.startswith(f"matrix_lr={lr},seq_len={seq_len}")  # swept keys first
        summary = read_summary(job)
        assert summary["status"] == "completed" and summary["error"] is None
        assert f"seq_len:{seq_len} " in (job / "train.log").read_text()

        run = read_offline_run(job)
        assert (run["group"], run["name"], run["job_type"]) == (sweep.name, job.name, "lr_x_seq_len")
        assert run["exit_code"] == 0
        assert run["config"]["optimizer"]["matrix_lr"] == float(lr)
        assert run["config"]["data"]["seq_len"] == int(seq_len)
        assert {"train/loss", "val/bpb", "tokens", "train_time_s"} <= set().union(*run["history"])
        vals = [row for row in run["history"] if "val/bpb" in row]
        assert [row["tokens"] for row in vals] == [0, 4 * 1024]
        assert run["summary"]["val/bpb"]["min"] == pytest.approx(min(row["val/bpb"] for row in vals))
    assert swept == {("0.02", "128"), ("0.02", "256"), ("0.04", "128"), ("0.04", "256")}
    # Every job of the sweep (run one after another in this process) reports the same code_bytes.
    assert len({read_summary(job)["code_bytes"] for job in jobs}) == 1

    proc = run_cli("speedrun.compare", sweep, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, explain(proc)
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| job"))
    assert "optimizer.matrix_lr" in header and "data.seq_len" in header
    assert "data.cache_dir" not in header  # the same in every job: not a column
    rows = read_csv(sweep / "comparison.csv")
    assert {(row["optimizer.matrix_lr"], row["data.seq_len"]) for row in rows} == swept
    for row in rows:
        assert row["status"] == "completed"
        assert float(row["val_bpb"]) == pytest.approx(read_summary(sweep / row["job"])["val_bpb"])
    assert (sweep / "comparison.md").read_text().count("| completed") == 4
    assert (sweep / "comparison.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.timeout(150)
def test_failed_and_diverged_jobs_do_not_stop_the_sweep(tmp_path):
    # Command-line sweeps replace the preset's seq_len values and add an embedding-LR sweep:
    # seq_len 96 does not divide TINY's 128-token micro-batches (fails before training), and an
    # embedding LR of 1e6 diverges at step 2 (loss far above trainer.max_loss).
    sweep = tmp_path / "my_sweep"
    proc = run_cli(
        "speedrun.train", "+sweep=seq_len", "data.seq_len=64,96", "optimizer.embed_lr=1e6,0.05",
        "trainer.max_loss=10", *SWEEP_TINY, *SHORT, f"hydra.sweep.dir={sweep}", cwd=REPO, timeout=130,
    )  # fmt: skip
    assert proc.returncode == 1, explain(proc)
    assert "1/4 jobs completed" in proc.stdout, explain(proc)

    jobs = job_folders(sweep)
    assert len(jobs) == 4
    expected = {}
    for job in jobs:
        overrides = job_overrides(job)
        if overrides["data.seq_len"] == "96":
            expected[job.name] = "failed"
        elif float(overrides["optimizer.embed_lr"]) > 1:
            expected[job.name] = "diverged"
        else:
            expected[job.name] = "completed"
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("did not complete"))
    report = list(itertools.takewhile(lambda line: line.startswith("  "), lines[start + 1 :]))
    assert len(report) == 3
    for job in jobs:
        summary = read_summary(job)
        status = expected[job.name]
        assert summary["status"] == status
        runs = find_offline_runs(job)
        if status == "completed":
            assert summary["error"] is None
            assert len(runs) == 1 and read_offline_run(job)["exit_code"] == 0
            continue
        assert summary["error"] and "\n" not in summary["error"]
        assert summary["error"] in next(line for line in report if line.strip().startswith(job.name))
        if status == "failed":
            assert "data.seq_len=96" in summary["error"]
        else:
            assert "diverged at step 2" in summary["error"]
            assert len(runs) == 1  # it ran: its wandb run exists
        if runs:  # finished, and marked as failed, so that the next job's run is its own
            run = read_offline_run(job)
            assert (
                run["exit_code"] not in (None, 0) and run["name"] == job.name and run["group"] == sweep.name
            )
    assert sorted(expected.values()) == ["completed", "diverged", "failed", "failed"]

    proc = run_cli("speedrun.compare", sweep, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, explain(proc)
    assert "error" in next(line for line in proc.stdout.splitlines() if line.startswith("| job"))
    rows = read_csv(sweep / "comparison.csv")
    assert {row["job"]: row["status"] for row in rows} == expected
    assert rows[0]["status"] == "completed"  # the jobs that did not complete come last
    assert all(row["error"] for row in rows[1:])


@pytest.mark.timeout(150)
def test_optuna_preset_searches_learning_rates_and_survives_diverged_trials(tmp_path):
    """`hydra/sweeper=optuna_lr` (the optional plugin, installed with the dev extra): every trial is a
    job folder, a diverged trial scores +inf instead of crashing the study (hydra#2237), and the
    study's best is the completed trial with the lowest val_bpb."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the `optuna` extra is not installed")
    sweep = tmp_path / "search"
    # An embedding LR of 1e6 diverges at step 2; the sampler seed is one whose 3 trials draw both values.
    proc = run_cli(
        "speedrun.train", "-m", "hydra/sweeper=optuna_lr", "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.seed=2", "optimizer.embed_lr=choice(0.05,1e6)", "trainer.max_loss=10",
        *SWEEP_TINY, "data.seq_len=64", "logger=none", "trainer.max_steps=3", "trainer.export=false",
        f"hydra.sweep.dir={sweep}", cwd=REPO, timeout=130,
    )  # fmt: skip
    jobs = job_folders(sweep)
    assert len(jobs) == 3, explain(proc)
    val_bpb = {}
    for job in jobs:
        summary = read_summary(job)
        diverges = float(job_overrides(job)["optimizer.embed_lr"]) > 1
        assert summary["status"] == ("diverged" if diverges else "completed"), (job.name, summary)
        if not diverges:
            val_bpb[job.name] = summary["val_bpb"]
    assert 0 < len(val_bpb) < 3, "this sampler seed should draw both embedding LRs"
    assert proc.returncode == 1, explain(proc)  # the sweep reports its diverged trials
    assert f"{len(val_bpb)}/3 jobs completed" in proc.stdout
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = min(val_bpb, key=val_bpb.get)
    assert results["best_value"] == pytest.approx(val_bpb[best])
    assert {k: str(v) for k, v in results["best_params"].items()} == {
        k: v for k, v in job_overrides(sweep / best).items() if k in results["best_params"]
    }


def compose_sweep(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_default_sweep_folders_are_dated_claimed_once_and_safe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # multirun_outputs/ is relative to where the sweep starts
    first = compose_sweep("+sweep=seeds", "model=gpt_tiny", "data.cache_dir=/data/my corpus", "seed=5")
    second = compose_sweep("+sweep=seeds", "model=gpt_tiny", "data.cache_dir=/data/my corpus")
    # A preset combines with further overrides: still a multirun over the preset's seeds, on gpt_tiny.
    assert first.hydra.mode.name == "MULTIRUN" and first.hydra.sweeper.params.seed == "1337,1338,1339"
    assert first.model.num_layers == 2
    # Two sweeps started in the same second: freeze Hydra's `now` so that both see the same time
    # (composing already cached the real time in each config: forget it).
    frozen = datetime(2026, 1, 2, 3, 4, 5)
    OmegaConf.clear_cache(first)
    OmegaConf.clear_cache(second)
    OmegaConf.register_new_resolver(
        "now", lambda pattern: frozen.strftime(pattern), use_cache=True, replace=True
    )
    try:
        dirs = [Path(first.hydra.sweep.dir), Path(second.hydra.sweep.dir)]
        assert Path(first.hydra.sweep.dir) == dirs[0]  # one answer per sweep, however often asked
    finally:
        setup_globals()  # Hydra's own `now` back
    assert dirs == [
        Path("multirun_outputs/2026-01-02_03-04-05"),
        Path("multirun_outputs/2026-01-02_03-04-05-2"),
    ]
    assert all((tmp_path / d).is_dir() for d in dirs)

    with open_dict(first):
        first.hydra.job.num = 7
    # The preset's swept key first, then the others in Hydra's (sorted) order; no `/` or space.
    assert first.hydra.sweep.subdir == "7_seed=5,data.cache_dir=_data_my_corpus,model=gpt_tiny"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml")))
def test_every_job_of_every_preset_fits_the_default_job(preset):
    """`python -m speedrun.train +sweep=<preset>` as documented: no job may be refused (a seq_len that does
    not divide the default micro-batch would fail only once the sweep reaches it)."""
    params = compose_sweep(f"+sweep={preset}").hydra.sweeper.params
    sweeps = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    grid = [[f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()] for o in sweeps]
    jobs = list(itertools.product(*grid))
    assert len(jobs) > 1
    for job in jobs:
        validate_config(compose_sweep(f"+sweep={preset}", *job))


def test_job_folders_name_every_swept_value_of_the_lr_preset():
    """+sweep=lr sweeps three keys; with a few other overrides the name is long, but no value is dropped."""
    swept = {"optimizer.matrix_lr": None, "optimizer.scalar_lr": None, "optimizer.embed_lr": None}
    names = set()
    for matrix in ("0.02", "0.04", "0.06"):
        for scalar in ("0.02", "0.04"):
            for embed in ("0.03", "0.05"):
                summary = (
                    f"data.cache_dir=/a/long/cache/path/that/goes/on,model=gpt_tiny,optimizer.embed_lr={embed},"
                    f"optimizer.matrix_lr={matrix},optimizer.scalar_lr={scalar},trainer.max_steps=300"
                )
                name = safe_name(summary, swept)
                assert name.startswith(f"matrix_lr={matrix},scalar_lr={scalar},embed_lr={embed}"), name
                names.add(HASHED_NAME.sub(r"\g<head>", name))
    assert len(names) == 12  # told apart by their values, not by a hash


@pytest.mark.timeout(300)
def test_ctrl_c_stops_the_whole_sweep_and_the_printed_command_resumes_it(tmp_path, corpus):
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=1,2,3", *TINY, "trainer.max_steps=20", "trainer.val_every=0", "trainer.log_every=1",
            "trainer.export=false", f"data.cache_dir={corpus}", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "speedrun.train", *args], cwd=tmp_path, env=cli_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120

    def first_job_trained() -> bool:
        folders = list(sweep.glob("0_*")) if sweep.is_dir() else []
        metrics = folders[0] / "metrics.jsonl" if folders else None
        return metrics is not None and metrics.exists() and metrics.read_text().count("train/loss") >= 2

    while not first_job_trained():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole foreground group
    proc.wait(timeout=60)
    output = (tmp_path / "out.txt").read_text()
    assert proc.returncode == 1, output
    (first,) = job_folders(sweep)  # no later job started
    assert first.name.startswith("0_") and read_summary(first)["status"] == "interrupted"
    assert "0/3 jobs completed" in output
    not_run = next(line for line in output.splitlines() if line.startswith("not run (interrupted): "))
    assert [name.split("_")[0] for name in not_run.split(": ", 1)[1].split(", ")] == ["1", "2"]
    resume = next(line for line in output.splitlines() if line.startswith("resume the sweep: "))
    command = shlex.split(resume.removeprefix("resume the sweep: "))
    proc = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=cli_env(), capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    assert "3/3 jobs completed" in proc.stdout
    assert f"resumed from {first / 'checkpoints'}" in (first / "train.log").read_text()
    assert all(read_summary(job)["steps"] == 20 for job in job_folders(sweep))


def test_a_second_sweep_into_the_same_folder_is_refused(tmp_path, corpus):
    """A folder that holds another sweep (its sweep.json says which) is refused before any job starts."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"overrides": ["model=gpt_tiny", "seed=1,2"]}))
    (sweep / "0_seed=1").mkdir()
    other = run_cli("speedrun.train", "-m", "seed=3,4", *TINY, "trainer.max_steps=2", f"data.cache_dir={corpus}",
                    f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=100)  # fmt: skip
    assert other.returncode != 0 and f"sweep folder {sweep} holds another sweep" in other.stderr, explain(
        other
    )
    assert sorted(p.name for p in sweep.iterdir()) == [".lock", "0_seed=1", "sweep.json"]  # nothing started
