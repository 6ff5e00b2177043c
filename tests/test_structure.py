"""The structure a newcomer relies on: a component is one module plus one YAML, each default has one
home, each behaviour one module, and the package works installed, from anywhere and from Python."""

from __future__ import annotations

import ast
import csv
import importlib
import inspect
import re
import shutil
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from speedrun.checkpoint import load_checkpoint
from speedrun.config import CONF_DIR, compose
from speedrun.config.schema import SCHEMA_GROUP, SCHEMAS
from tests.conftest import REPO, TINY, cli_env, read_summary, run_train

PACKAGE = REPO / "speedrun"

# ------------------------------------------------------------------ a component outside the package

OUTSIDE_MODEL = '''
import torch
import torch.nn.functional as F
from torch import nn


class BigramMLP(nn.Module):
    """Nothing speedrun-specific: an embedding, a norm gain, an MLP and a head."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.gain = nn.Parameter(torch.ones(dim))
        self.hidden = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, input_ids, target_ids):
        x = F.rms_norm(self.embed(input_ids), (self.gain.numel(),)) * self.gain
        x = x + self.out(torch.relu(self.hidden(x)))
        logits = self.head(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target_ids.reshape(-1))
'''

OUTSIDE_SINK = '''
import csv

from speedrun.sinks import Sink


class CsvSink(Sink):
    """Every training record as a CSV row: the whole logger, in one class."""

    def __init__(self, run_dir, config, run_info, filename="train.csv"):
        self.file = open(run_dir / filename, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(["step", "train_loss"])

    def log(self, record):
        if "train/loss" in record:
            self.writer.writerow([record["step"], record["train/loss"]])

    def finish(self, summary):
        self.file.close()
'''

CONFIGS = {
    "model/bigram.yaml": "_target_: outside_model.BigramMLP\nvocab_size: 1024\ndim: 48\n",
    "optimizer/torch_adamw.yaml": "_target_: torch.optim.AdamW\n_partial_: true\nlr: 0.003\n",
    "logger/csv.yaml": "_target_: outside_sink.CsvSink\n_partial_: true\nfilename: steps.csv\n",
}


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder holding a model module, a logger module and their YAMLs: nothing in the package."""
    root = tmp_path_factory.mktemp("outside")
    (root / "outside_model.py").write_text(OUTSIDE_MODEL)
    (root / "outside_sink.py").write_text(OUTSIDE_SINK)
    for name, text in CONFIGS.items():
        (root / "conf" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "conf" / name).write_text(text)
    return root


def run_outside(outside: Path, run_dir: Path, *overrides: str):
    env = cli_env(PYTHONPATH=str(outside))
    search = f"hydra.searchpath=[file://{outside / 'conf'}]"
    steps = ["trainer.max_steps=10", "trainer.val_every=5", "trainer.checkpoint_every=10"]
    return run_train(run_dir, search, "model=bigram", *steps, *overrides, env=env)


@pytest.mark.usefixtures("corpus")
@pytest.mark.parametrize("optimizer", ["muon_adam", "adamw"])
def test_a_model_outside_the_package_trains_exports_and_logs(outside, tmp_path, optimizer):
    run_dir = tmp_path / "run"
    run_outside(outside, run_dir, f"optimizer={optimizer}", "logger=csv")
    summary = read_summary(run_dir)
    assert summary["status"] == "completed", summary
    assert summary["val_loss"] < 6.5  # below the uniform 6.93 nats: it learned
    # Export and round trip went through the model's (default) roles: its one vector stays fp32.
    assert summary["quant_val_loss"] == pytest.approx(summary["val_loss"], abs=0.05)
    assert summary["model_bytes"] == (run_dir / "final_model.int8.ptz").stat().st_size
    # The logger from outside wrote its own file, one row per logged step.
    rows = list(csv.reader((run_dir / "steps.csv").open()))
    assert rows[0] == ["step", "train_loss"] and [int(r[0]) for r in rows[1:]] == list(range(1, 11))


@pytest.mark.usefixtures("corpus")
def test_any_torch_optimizer_is_one_yaml_and_follows_the_schedule(outside, tmp_path):
    run_dir = tmp_path / "run"
    run_outside(outside, run_dir, "optimizer=torch_adamw", "schedule=wsd", "trainer.export=false")
    assert read_summary(run_dir)["status"] == "completed"
    groups = load_checkpoint(run_dir / "checkpoints" / "step_000000010.pt")["optimizer"]["param_groups"]
    # One group per role of the model's default roles, each at lr x the last step's scale: WSD over 10
    # steps decays over the last round(0.4 * 10) = 4, and the last step taken (index 9) is at 1/4.
    assert [g["name"] for g in groups] == ["embed", "matrix", "scalar"]
    assert all(g["initial_lr"] == 0.003 and g["lr"] == pytest.approx(0.003 * 0.25) for g in groups)


# ------------------------------------------------------------------ one source of truth per default


def schema_defaults(schema: type) -> dict:
    out = {}
    for f in fields(schema):
        if f.name.startswith("_"):
            continue
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = "???"
    return out


def target_parameters(schema: type) -> dict[str, inspect.Parameter]:
    module, _, name = schema._target_.rpartition(".")
    return dict(inspect.signature(getattr(importlib.import_module(module), name)).parameters)


@pytest.mark.parametrize(
    "schema", [s for options in SCHEMAS.values() for s in options.values() if hasattr(s, "_target_")]
)
def test_schema_defaults_are_the_signature_defaults_of_what_they_build(schema):
    params = target_parameters(schema)
    for key, default in schema_defaults(schema).items():
        assert key in params, f"{schema.__name__}.{key} is not a parameter of {schema._target_}"
        expected = inspect.Parameter.empty if default == "???" else default
        actual = params[key].default
        if isinstance(actual, tuple):  # an immutable default in a signature, a list in a schema
            actual = list(actual)
        assert actual == expected, (
            f"{schema._target_}({key}={actual!r}) but {schema.__name__}.{key}={expected!r}"
        )


def option_files() -> list[Path]:
    return sorted(p for group in SCHEMAS for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("path", option_files(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_options_state_only_what_differs_from_their_schema(path):
    text = yaml.safe_load(path.read_text()) or {}
    extends = [
        d for d in text.get("defaults", []) if isinstance(d, str) and d.startswith(f"/{SCHEMA_GROUP}/")
    ]
    if not extends:  # logger=none and rules=none set their group to null
        assert text == {path.parent.name: None}
        return
    group, name = extends[0].split("/")[2:4]
    defaults = schema_defaults(SCHEMAS[group][name.split("@")[0]])
    for key, value in text.items():
        if key == "defaults":
            continue
        assert key in defaults, f"{path.name}: {key} is not in the schema"
        assert value != defaults[key], f"{path.name} repeats the schema's {key}={value!r}"


@pytest.mark.parametrize("path", sorted((CONF_DIR / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_experiments_state_only_what_differs_from_the_options_they_pick(path):
    experiment = yaml.safe_load(path.read_text())
    picked = compose([f"experiment={path.stem}"])
    body = {k: v for k, v in experiment.items() if k != "defaults"}
    # The same options without this experiment's own values.
    choices = [f"{k.removeprefix('override /')}={v}" for d in experiment["defaults"] if isinstance(d, dict)
               for k, v in d.items()]  # fmt: skip
    parents = [d for d in experiment["defaults"] if isinstance(d, str) and d != "_self_"]
    base = compose([f"experiment={parents[0]}"] if parents else choices)
    for group, values in body.items():
        for key, value in values.items():
            assert OmegaConf.select(picked, f"{group}.{key}") == value
            assert OmegaConf.select(base, f"{group}.{key}") != value, f"{path.name} repeats {group}.{key}"


# ------------------------------------------------------------------ one home per behaviour


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """speedrun modules `path` imports anywhere in its body (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from speedrun.x import y` imports speedrun.x.y when y is a module, else speedrun.x.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]  # fmt: skip
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def test_the_import_graph_has_no_cycles():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imported_modules(path, set(paths)) - {name} for name, path in paths.items()}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]  # fmt: skip


def test_no_function_of_the_trainer_is_longer_than_60_lines():
    long = [(name, n) for name, n in functions(PACKAGE / "trainer.py") if n > 60]
    assert not long, long


def callers(pattern: str) -> set[str]:
    regex = re.compile(pattern)
    return {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if regex.search(p.read_text())}


def test_summary_json_is_written_by_one_module_and_signals_handled_by_one():
    assert callers(r"\bwrite_summary\(") == {"summary.py"}
    assert callers(r"\bsignal\.signal\(") == {"signals.py"}


def test_no_optimizer_export_or_trainer_code_names_a_models_attributes():
    model_attributes = (
        r"\bmodel\.(blocks|tok_emb|lm_head|skip_weights|cast_for_mixed_precision|flops_per_token)\b"
    )
    for name in (
        "trainer.py",
        "export.py",
        "job.py",
        "optim/muon_adam.py",
        "optim/adamw.py",
        "optim/multi.py",
    ):
        assert not re.search(model_attributes, (PACKAGE / name).read_text()), name


# ------------------------------------------------------------------ installed, and from Python


def test_readme_python_example_runs(tmp_path, corpus):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Using it from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "completed" in proc.stdout


@pytest.mark.slow
def test_a_non_editable_install_runs_from_an_unrelated_folder(tmp_path, corpus):
    """`pip install .` (not -e) into a fresh venv: console scripts find their configs, caches go to the
    user's cache folder. The new venv borrows this venv's third-party packages (a .pth file) instead of
    downloading them again; speedrun itself comes only from the install."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "borrowed.pth").write_text("\n".join(ours) + "\n")
    # From a copy of what the package is made of: pip builds in the source folder (build/, *.egg-info).
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("speedrun", "hydra_plugins"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    install = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
               "--no-build-isolation", "--no-index", str(source)]  # fmt: skip
    proc = subprocess.run(install, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    installed = subprocess.run([str(venv / "bin" / "python"), "-c", "import speedrun; print(speedrun.__file__)"],
                               capture_output=True, text=True, cwd=tmp_path).stdout  # fmt: skip
    assert str(site) in installed  # not the checkout

    home = tmp_path / "home"
    env = cli_env(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    env.pop("SPEEDRUN_CACHE", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    train = str(venv / "bin" / "speedrun-train")
    shown = subprocess.run([train, "--cfg", "job", "model=pg_9x512"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert shown.returncode == 0 and "num_layers: 9" in shown.stdout, shown.stderr
    cache = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "from speedrun.data.stdlib_corpus import default_cache_dir; print(default_cache_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert cache.startswith(str(home / ".cache")), cache
    # A tiny run from here, on the corpus the suite already built (so the test does not rebuild it).
    run = subprocess.run([train, *TINY, "trainer.max_steps=3", f"data.cache_dir={corpus}", "hydra.run.dir=run"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert read_summary(elsewhere / "run")["status"] == "completed"


def test_a_single_torch_import_is_not_needed_to_compose():
    """`compose` and the schemas import no torch (config errors stay fast)."""
    code = "import sys; from speedrun.config import compose; compose(['model=pg_9x512']); print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, cwd=REPO
    )
    assert out.stdout.strip() == "False", out.stderr
