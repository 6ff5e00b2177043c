"""`python -m speedrun.data.fineweb` against a fake Hugging Face Hub on 127.0.0.1, never the network.

The fake serves what hf_hub_download asks for: HEAD/GET {endpoint}/datasets/{repo}/resolve/{revision}/{path}
with X-Repo-Commit, ETag and Content-Length, and 404 + X-Error-Code: EntryNotFound for missing files. The real
huggingface_hub client runs in a real subprocess with HF_ENDPOINT pointing at it. Every case runs for both
layouts: parameter-golf's export (sp1024: a manifest, a tokenizer, shards under datasets/) and
modded-nanogpt's GPT-2 tokens (gpt2: shards at the repo's root, train shards numbered from 1).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from speedrun.config import compose
from speedrun.data.shards import list_shards, read_shard_header, write_shard
from speedrun.data.tokenizer_sentencepiece import train_sentencepiece
from tests.conftest import cli_env, read_summary

REPO = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass(frozen=True)
class Layout:
    """One variant's published layout, and where its files land."""

    variant: str
    repo_id: str
    remote_dir: str  # the shards' folder in the repo
    config: str  # the data option that reads them
    train_indices: tuple[int, ...]  # the train shards the fake hub holds, in order

    def remote(self, name: str) -> str:
        return f"{self.remote_dir}/{name}" if self.remote_dir else name

    def train_name(self, position: int) -> str:
        return f"fineweb_train_{self.train_indices[position]:06d}.bin"

    @property
    def local_dir(self) -> str:
        return f"data/datasets/fineweb10B_{self.variant}"


SP1024 = Layout(
    "sp1024", "someone/parameter-golf", "datasets/datasets/fineweb10B_sp1024", "fineweb_sp1024", (0, 1, 2)
)
GPT2 = Layout("gpt2", "someone/fineweb10B-gpt2", "", "fineweb_gpt2", (1, 2, 3))

pytestmark = pytest.mark.timeout(120)


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes], repo_id: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.repo_id = repo_id
        self.requests: list[tuple[str, str]] = []
        self.cut_once: set[str] = set()  # GET sends half the body, then drops the connection (once)
        self.stall: str | None = None  # GET sends half the body, then waits for `release`
        self.half_sent = threading.Event()
        self.release = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHub

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _serve(self, send_body: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.server.requests.append((self.command, path))
        prefix = f"/datasets/{self.server.repo_id}/resolve/main/"
        name = path.removeprefix(prefix)
        if not path.startswith(prefix) or name not in self.server.files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if path.startswith(prefix) else "RepoNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.server.files[name]
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if not send_body:
            return
        if name in self.server.cut_once or name == self.server.stall:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if name == self.server.stall:
                self.server.half_sent.set()
                self.server.release.wait(timeout=60)
            self.server.cut_once.discard(name)
            self.close_connection = True  # the client sees the body end early
            return
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def shard_bytes(folder: Path, seed: int, num_tokens: int = 3000) -> bytes:
    path = folder / f"{seed}.bin"
    write_shard(path, np.random.default_rng(seed).integers(0, 1024, num_tokens))
    return path.read_bytes()


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> dict[str, bytes]:
    """A real 1024-piece SentencePiece model, trained on a few hundred KB of the stdlib's own source."""
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts, size = [], 0
    for source in sources:
        texts.append(source.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1])
        if size > 600_000:
            break
    prefix = tmp_path_factory.mktemp("tok") / "fineweb_1024_bpe"
    model = train_sentencepiece(texts, prefix, 1024, threads=1)
    return {
        "datasets/tokenizers/fineweb_1024_bpe.model": model.read_bytes(),
        "datasets/tokenizers/fineweb_1024_bpe.vocab": model.with_suffix(".vocab").read_bytes(),
    }


@pytest.fixture(params=[SP1024, GPT2], ids=["sp1024", "gpt2"])
def layout(request) -> Layout:
    return request.param


@pytest.fixture
def hub_files(layout, tokenizer_files, tmp_path_factory) -> dict[str, bytes]:
    """The published layout: parameter-golf's export under datasets/ with its manifest schema, or
    modded-nanogpt's shards at the repo's root (one val shard, train shards from 1)."""
    folder = tmp_path_factory.mktemp("shards")
    files: dict[str, bytes] = {}
    if layout is SP1024:
        manifest = {
            "datasets": [
                {
                    "name": "fineweb10B_sp1024",
                    "tokenizer_name": "sp_bpe_1024",
                    "stats": {"files_train": 3, "files_val": 2},
                }
            ],
            "tokenizers": [
                {
                    "name": "sp_bpe_1024",
                    "model_path": "tokenizers/fineweb_1024_bpe.model",
                    "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
                }
            ],
        }
        files = {"datasets/manifest.json": json.dumps(manifest).encode(), **tokenizer_files}
    for i in range(2 if layout is SP1024 else 1):
        files[layout.remote(f"fineweb_val_{i:06d}.bin")] = shard_bytes(folder, 100 + i)
    for i in layout.train_indices:
        files[layout.remote(f"fineweb_train_{i:06d}.bin")] = shard_bytes(folder, i)
    return files


@pytest.fixture
def hub(hub_files, layout) -> Iterator[FakeHub]:
    server = FakeHub(hub_files, layout.repo_id)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def fetch_command(layout: Layout, *args: str) -> list[str]:
    return [sys.executable, "-m", "speedrun.data.fineweb", "--variant", layout.variant,
            "--repo-id", layout.repo_id, *args]  # fmt: skip


def hub_env(hub: FakeHub, tmp_path: Path) -> dict:
    env = {
        k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith("HF_")
    }
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        PYTHONPATH=str(REPO),
    )
    return env


def run_fetch(hub: FakeHub, layout: Layout, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        fetch_command(layout, *args),
        cwd=tmp_path,
        env=hub_env(hub, tmp_path),
        capture_output=True,
        text=True,
        timeout=90,
    )


def resolve_path(layout: Layout, name: str) -> str:
    return f"/datasets/{layout.repo_id}/resolve/main/{layout.remote(name)}"


def error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], stderr
    return lines[-1]


def test_fetch_lays_out_what_the_data_config_reads_and_a_rerun_skips_everything(
    hub, hub_files, layout, tmp_path
):
    proc = run_fetch(hub, layout, tmp_path, "--train-shards", "2")
    assert proc.returncode == 0, proc.stderr

    config = compose([f"data={layout.config}"]).data
    dataset_dir = tmp_path / config["path"]
    assert config["path"] == layout.local_dir
    val_names = ["fineweb_val_000000.bin", "fineweb_val_000001.bin"][: 2 if layout is SP1024 else 1]
    assert [p.name for p in list_shards(dataset_dir, "val")] == val_names
    assert [p.name for p in list_shards(dataset_dir, "train")] == [layout.train_name(0), layout.train_name(1)]
    for path in [*list_shards(dataset_dir, "val"), *list_shards(dataset_dir, "train")]:
        assert path.read_bytes() == hub_files[layout.remote(path.name)]
    if layout is SP1024:
        tokenizer = tmp_path / config["tokenizer"]
        assert tokenizer.read_bytes() == hub_files["datasets/tokenizers/fineweb_1024_bpe.model"]
        assert tokenizer.with_suffix(".vocab").is_file()
        assert (
            json.loads((tmp_path / "data" / "manifest.json").read_text())["datasets"][0]["name"]
            == "fineweb10B_sp1024"
        )
    else:
        assert config["tokenizer"] is None and config["val_tokens"] == 10_485_760
        assert sorted(p.name for p in (tmp_path / "data").rglob("*") if p.is_file()) == sorted(
            val_names + [layout.train_name(0), layout.train_name(1)]
        ), "no manifest, no tokenizer: only the shards"
        assert "data.tokenizer=gpt2" in proc.stderr
    assert not (tmp_path / "data" / ".fineweb-download").exists(), "staging is cleaned up after success"
    assert ("GET", resolve_path(layout, layout.train_name(2))) not in hub.requests

    hub.requests.clear()
    again = run_fetch(hub, layout, tmp_path, "--train-shards", "2")
    assert again.returncode == 0, again.stderr
    assert hub.requests == [], "complete files are recognised locally, without asking the hub"
    expected = 6 if layout is SP1024 else 3  # sp1024: 2 tokenizer files, 2 val and 2 train shards
    assert again.stderr.count(": already complete\n") == expected

    # A local shard damaged after the fact is noticed and fetched again, alone.
    damaged = dataset_dir / layout.train_name(1)
    damaged.write_bytes(damaged.read_bytes()[:-2])
    hub.requests.clear()
    third = run_fetch(hub, layout, tmp_path, "--train-shards", "2")
    assert third.returncode == 0, third.stderr
    assert (
        f"{damaged.relative_to(tmp_path)}: size" in third.stderr and "; downloading it again" in third.stderr
    )
    assert {path for _, path in hub.requests} == {resolve_path(layout, damaged.name)}
    assert damaged.read_bytes() == hub_files[layout.remote(damaged.name)]


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_broken_shard_on_the_hub_is_retried_once_then_reported_and_not_kept(hub, layout, tmp_path, damage):
    name = layout.train_name(1)
    # Zero-byte files are a known failure of the published dataset; a truncated one has a valid header.
    remote = layout.remote(name)
    hub.files[remote] = b"" if damage == "empty" else hub.files[remote][:-100]
    proc = run_fetch(hub, layout, tmp_path, "--train-shards", "3")
    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert name in line and "rerun" in line and layout.repo_id in line
    assert ("0 bytes is shorter" if damage == "empty" else "does not match its header") in line
    assert "retrying once" in proc.stderr
    assert hub.requests.count(("HEAD", resolve_path(layout, name))) == 2, "two attempts"
    dataset_dir = tmp_path / layout.local_dir
    assert [p.name for p in list_shards(dataset_dir, "train")] == [layout.train_name(0), layout.train_name(2)]
    assert list((tmp_path / "data").rglob(name)) == [], "the broken download was deleted"


def _rejected(path: Path) -> bool:
    try:
        read_shard_header(path)
    except ValueError:
        return True
    return False


def test_a_connection_dropped_mid_body_ends_with_an_intact_shard(hub, hub_files, layout, tmp_path):
    name = "fineweb_val_000000.bin"
    hub.cut_once.add(layout.remote(name))
    proc = run_fetch(hub, layout, tmp_path, "--train-shards", "1")
    assert proc.returncode == 0, proc.stderr
    assert hub.requests.count(("GET", resolve_path(layout, name))) == 2, "one cut, one resume"
    local = tmp_path / layout.local_dir / name
    assert local.read_bytes() == hub_files[layout.remote(name)]


def test_a_killed_download_leaves_nothing_the_loader_accepts_and_a_rerun_completes(
    hub, hub_files, layout, tmp_path
):
    name = layout.remote(layout.train_name(0))
    hub.stall = name
    proc = subprocess.Popen(
        fetch_command(layout, "--train-shards", "1"),
        cwd=tmp_path,
        env=hub_env(hub, tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert hub.half_sent.wait(timeout=60), "the download never started"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    hub.release.set()
    dataset_dir = tmp_path / layout.local_dir
    assert list_shards(dataset_dir, "train") == []
    # The killed client's temporary file is there (the download really was cut mid-body) under a name no
    # loader globs for; no file anywhere under data/ looks like a train shard.
    assert list((tmp_path / "data" / ".fineweb-download").rglob("*.incomplete"))
    assert list((tmp_path / "data").rglob("*_train_[0-9]*.bin")) == []

    hub.stall = None
    again = run_fetch(hub, layout, tmp_path, "--train-shards", "1")
    assert again.returncode == 0, again.stderr
    assert (dataset_dir / layout.train_name(0)).read_bytes() == hub_files[name]
    assert not (tmp_path / "data" / ".fineweb-download").exists(), "the killed run's partial file is gone"


def test_asking_for_more_train_shards_than_published_is_a_usage_error(hub, layout, tmp_path):
    # parameter-golf's manifest says 3 here; modded-nanogpt publishes 103 (no manifest to ask).
    asked, message = (
        (4, "fineweb10B_sp1024 has only 3 train shards")
        if layout is SP1024
        else (104, "fineweb10B_gpt2 has 103 train shards")
    )
    proc = run_fetch(hub, layout, tmp_path, "--train-shards", str(asked))
    assert proc.returncode == 2
    assert f"--train-shards {asked}: {message}" in error_line(proc.stderr)
    assert not (tmp_path / "data" / "datasets").exists()


@pytest.mark.parametrize("layout", [SP1024], ids=["sp1024"])
def test_a_variant_missing_from_the_manifest_is_named(hub, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "speedrun.data.fineweb", "--repo-id", SP1024.repo_id, "--variant", "sp4096",
         "--train-shards", "1"],
        cwd=tmp_path, env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "fineweb10B_sp4096 is not in" in error_line(proc.stderr) and "fineweb10B_sp1024" in error_line(
        proc.stderr
    )


def test_without_huggingface_hub_the_error_says_what_to_install(tmp_path):
    code = (
        "import sys; sys.modules['huggingface_hub'] = None\n"  # makes `import huggingface_hub` fail
        "from speedrun.data.fineweb import main; raise SystemExit(main(['--train-shards', '1']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        error_line(proc.stderr) == "error: huggingface_hub is not installed; pip install 'speedrun[fineweb]'"
    )


@pytest.mark.parametrize("layout", [GPT2], ids=["gpt2"])
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--variant", "bogus", "--train-shards", "1"], 2, "--variant 'bogus' is neither gpt2 nor"),
        (["--variant", "gpt2", "--train-shards", "-1"], 2, "--train-shards: must be 0 or more"),
        (
            ["--variant", "gpt2", "--train-shards", "1", "--data-dir", "a_file"],
            2,
            "--data-dir a_file is a file",
        ),
    ],
)
def test_bad_input_is_one_error_line(hub, tmp_path, args, code, message):
    (tmp_path / "a_file").write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, "-m", "speedrun.data.fineweb", "--repo-id", GPT2.repo_id, *args],
        cwd=tmp_path, env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert proc.returncode == code
    assert message in error_line(proc.stderr) and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("layout", [GPT2], ids=["gpt2"])
def test_modded_nanogpts_data_trains_with_val_loss_and_a_null_val_bpb(hub, layout, tmp_path):
    """The GPT-2 layout as fetched, through the real CLI with modded-nanogpt's preset (experiment=mn_record20,
    whose data is data=fineweb_gpt2) at a tiny size: no tokenizer, so the run reports val_loss and a null
    val_bpb, with the record's padded vocabulary (50,304 rows)."""
    assert run_fetch(hub, layout, tmp_path, "--train-shards", "2").returncode == 0
    run_dir = tmp_path / "run"
    tiny_record = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_value_embeds=1",
                   "model.skip_attention_layers=[]", "model.window_block_size=32", "model.max_window_tokens=96",
                   "data.seq_len=128", "data.val_tokens=512", "trainer.train_batch_tokens=512",
                   "trainer.micro_batch_tokens=256", "trainer.val_batch_tokens=512",
                   "trainer.warmup_steps=0", "trainer.val_every=0"]  # fmt: skip
    command = [sys.executable, "-m", "speedrun.train", "experiment=mn_record20", *tiny_record, "logger=none",
               f"data.path={tmp_path / layout.local_dir}", "trainer.max_steps=3", f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["val_bpb"] is None and summary["val_loss"] > 0
    assert "no data.tokenizer: val_bpb will be null" in (run_dir / "train.log").read_text()
