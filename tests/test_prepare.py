"""`python -m speedrun.prepare`: tiny real corpora, a real SentencePiece, real shards read back and decoded."""

from __future__ import annotations

import base64
import fcntl
import gzip
import json
import os
import pty
import random
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from speedrun.data.prepare import main
from speedrun.data.shards import list_shards, load_shard
from speedrun.data.tokenizer import encode_documents
from speedrun.data.tokenizer_sentencepiece import SentencePieceTokenizer, train_sentencepiece
from tests.conftest import cli_env, read_summary, run_train

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "ga", "zu", "ri", "an", "el", "or", "th"]


def make_docs(count: int, seed: int = 0) -> list[str]:
    """Documents of pseudo-words with punctuation and digits: enough variety for a 300-piece BPE."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(2000)]
    docs = []
    for _ in range(count):
        sentences = [
            " ".join(rng.choices(words, k=rng.randint(4, 14))) + rng.choice([".", "!", ", 42."])
            for _ in range(6)
        ]
        docs.append("\n".join(sentences) + f" #{rng.randint(0, 999)}")
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    return path


def read_split(folder: Path, split: str) -> np.ndarray:
    shards = list_shards(folder, split)
    return np.concatenate([np.asarray(load_shard(path)) for path in shards])


def decode_docs(folder: Path, split: str) -> list[str]:
    """Cut a split's token stream at BOS and decode each document."""
    sp = SentencePieceTokenizer(folder / "tokenizer.model").processor
    tokens = read_split(folder, split).astype(np.int64)
    starts = np.flatnonzero(tokens == sp.bos_id())
    assert starts[0] == 0, "every split starts with a document's BOS"
    return [
        sp.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, [*starts[1:], len(tokens)], strict=True)
    ]


def run_main(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def error_line(stderr: str) -> str:
    """The single `error:` line, which must also be the last line."""
    lines = stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], stderr
    return lines[-1]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_docs(300)


# --- the tokenizer helpers ---------------------------------------------------------------------------------


def test_tokenizer_round_trips_text_exactly(tmp_path, docs):
    model = train_sentencepiece(docs, tmp_path / "tok", 300, threads=1)
    assert model == tmp_path / "tok.model" and (tmp_path / "tok.vocab").is_file()
    tokenizer = SentencePieceTokenizer(model)
    sp = tokenizer.processor
    assert (sp.get_piece_size(), sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (300, 0, 1, 2, 3)
    # Identity normalization, no whitespace collapsing, byte fallback: nothing is lost or rewritten.
    text = "  def f(x):\n\t\treturn  x  # é 中文 🙂 ＡＢＣ 12345\n\n"
    assert sp.decode(sp.encode(text)) == text
    assert all(len(piece.strip("▁")) <= 1 for piece in sp.encode("12345", out_type=str)), "digits are split"
    tokens = encode_documents(tokenizer, ["ka lo", "mi"])
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [1, *sp.encode("ka lo"), 1, *sp.encode("mi")]


def test_tokenizer_vocab_errors_are_one_clear_line(tmp_path, docs):
    with pytest.raises(ValueError, match=r"corpus too small for vocab 50000: .* at most \d+ .*--vocab-size"):
        train_sentencepiece(docs[:20], tmp_path / "big", 50000, threads=1)
    with pytest.raises(ValueError, match=r"vocab 200 is too small .* at least \d+.*larger --vocab-size"):
        train_sentencepiece(
            docs + ["".join(map(chr, range(0x4E00, 0x4E80)))], tmp_path / "small", 200, threads=1
        )
    assert not list(tmp_path.iterdir()), "a failed training leaves no model behind"


# --- the command --------------------------------------------------------------------------------------------


def test_cli_prepares_jsonl_into_shards_that_decode_back(tmp_path, docs):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "speedrun.prepare", "--input", str(corpus), "--output", str(out)]
    cmd += ["--vocab-size", "320", "--val-fraction", "0.1", "--workers", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab_size"] == 320 and manifest["bos_id"] == 1
    assert manifest["tokenizer"]["file"] == "tokenizer.model" and len(manifest["tokenizer"]["sha256"]) == 64
    assert manifest["command"].startswith("python -m speedrun.prepare --input")
    assert manifest["skipped"] == {} and manifest["repaired_documents"] == 0
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["documents"] + val["documents"] == len(docs)
    assert 10 <= val["documents"] <= 60, "about 10% of 300 documents"
    assert train["files"] == ["corpus_train_000000.bin"] and val["files"] == ["corpus_val_000000.bin"]
    assert train["tokens"] == len(read_split(out, "train")) and val["tokens"] == len(read_split(out, "val"))

    decoded_train, decoded_val = decode_docs(out, "train"), decode_docs(out, "val")
    assert sorted(decoded_train + decoded_val) == sorted(docs), "every document, exactly once, byte-exact"
    val_set = set(decoded_val)
    assert decoded_train == [d for d in docs if d not in val_set], "train keeps the corpus order"
    assert decoded_val == [d for d in docs if d in val_set], "val keeps the corpus order"
    assert not (out / ".prepare-partial").exists()


def test_val_docs_takes_the_first_documents_and_shards_split_at_the_size(tmp_path, capsys, docs):
    out = tmp_path / "out"
    code, err = run_main(
        capsys, "--input", write_jsonl(tmp_path / "c.jsonl", docs), "--output", out, "--vocab-size", 300,
        "--val-docs", 7, "--shard-tokens", 1000, "--workers", 1, "--prefix", "mine",
    )  # fmt: skip
    assert code == 0, err
    assert decode_docs(out, "val") == docs[:7]
    assert decode_docs(out, "train") == docs[7:]
    shards = list_shards(out, "train")
    assert all(path.name.startswith("mine_train_") for path in shards)
    sizes = [len(load_shard(path)) for path in shards]
    assert len(sizes) > 3 and set(sizes[:-1]) == {1000} and 0 < sizes[-1] <= 1000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"] == {"rule": "first_documents", "documents": 7}
    assert manifest["splits"]["train"]["files"] == [path.name for path in shards]


def test_workers_produce_the_same_shards_as_one_process(tmp_path, capsys, docs):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs * 3)
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_main(capsys, "--input", corpus, "--output", one, "--vocab-size", 300, "--workers", 1)[0] == 0
    code, err = run_main(
        capsys, "--input", corpus, "--output", two, "--tokenizer", one / "tokenizer.model", "--workers", 2
    )
    assert code == 0, err
    for split in ("train", "val"):
        first, second = list_shards(one, split), list_shards(two, split)
        assert [p.name for p in first] == [p.name for p in second]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["tokenizer"]["source"] == str(one / "tokenizer.model")
    assert (two / "tokenizer.model").read_bytes() == (one / "tokenizer.model").read_bytes()


def test_folders_of_txt_and_gzip_jsonl_are_read_in_sorted_order(tmp_path, capsys, docs):
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "2.txt").write_text(docs[2])
    (folder / "a.txt").write_text(docs[0])
    (folder / "b" / "1.txt").write_text(docs[1])
    (folder / "notes.md").write_text("not a corpus file")
    with gzip.open(folder / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in docs[3:40])
    out = tmp_path / "out"
    code, err = run_main(
        capsys, "--input", folder, "--output", out, "--vocab-size", 300, "--val-docs", 1, "--workers", 1
    )
    assert code == 0, err
    assert decode_docs(out, "val") == [docs[0]]
    assert decode_docs(out, "train") == docs[1:40]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ignored_files"] == {"count": 1, "examples": [str(folder / "notes.md")]}
    assert "ignored 1 files" in err


def test_bad_lines_are_skipped_counted_and_located(tmp_path, capsys, docs):
    corpus = tmp_path / "messy.jsonl"
    lines = [json.dumps({"text": d}).encode() for d in docs[:50]]
    lines[3] = b"this is not json"
    lines[5] = json.dumps({"title": "no text"}).encode()
    lines[8] = json.dumps({"text": 17}).encode()
    lines[9] = json.dumps({"text": "   "}).encode()
    lines[11] = b'{"text": "caf\xe9 bytes"}'  # Latin-1, not UTF-8
    lines[12] = json.dumps({"text": "lone \ud800 surrogate"}).encode()
    corpus.write_bytes(b"\n".join(lines) + b"\n\n")
    out = tmp_path / "out"
    code, err = run_main(
        capsys, "--input", corpus, "--output", out, "--vocab-size", 300, "--val-docs", 2, "--workers", 1
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"empty": 1, "no_text_field": 1, "not_json": 1, "text_not_string": 1}
    assert manifest["skipped_examples"]["not_json"] == [f"{corpus}:4"]
    assert manifest["skipped_examples"]["text_not_string"] == [f"{corpus}:9"]
    assert manifest["repaired_documents"] == 2
    assert manifest["repaired_examples"] == [f"{corpus}:12", f"{corpus}:13"]
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 50 - 4
    assert f"skipped 1 lines that are not JSON (e.g. {corpus}:4)" in err
    assert "repaired 2 documents" in err
    decoded = decode_docs(out, "train")
    assert "caf\ufffd bytes" in decoded and "lone ? surrogate" in decoded


def test_a_failure_midway_leaves_no_shards(tmp_path, capsys, docs):
    corpus = tmp_path / "cut.jsonl.gz"
    data = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    corpus.write_bytes(data[: len(data) * 3 // 4])  # a gzip stream that ends early
    out = tmp_path / "out"
    code, err = run_main(
        capsys, "--input", corpus, "--output", out, "--vocab-size", 300, "--sample-docs", 50,
        "--shard-tokens", 500, "--workers", 1,
    )  # fmt: skip
    assert code == 2
    assert str(corpus) in error_line(err) and "gzip" in error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.model", "tokenizer.vocab"]


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("empty", [], "no documents in"),
        ("corpus", ["--vocab-size", "50000"], "corpus too small for vocab 50000"),
        ("corpus", ["--val-docs", "400"], "no training documents left; lower --val-docs"),
        ("missing", [], "does not exist"),
        ("corpus", ["--tokenizer", "missing.model"], "missing.model not found"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, docs, setup, args, message):
    corpus = tmp_path / "c.jsonl"
    if setup == "corpus":
        write_jsonl(corpus, docs)
    elif setup == "empty":
        corpus.write_text('not json\n{"text": ""}\n\n')
    args = [str(tmp_path / a) if a.endswith(".model") else a for a in args]
    vocab = [] if "--vocab-size" in args or "--tokenizer" in args else ["--vocab-size", "300"]
    code, err = run_main(
        capsys, "--input", corpus, "--output", tmp_path / "out", *vocab, "--workers", 1, *args
    )
    assert code == 2
    assert message in error_line(err)
    if setup == "missing":
        assert str(corpus) in error_line(err)
    assert not list_shards(tmp_path / "out", "train") and not (tmp_path / "out" / "manifest.json").exists()


def test_usage_errors_exit_2_with_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(tmp_path), "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: give --vocab-size N") and err.count("\n") == 1


def test_an_existing_corpus_is_refused_unless_overwrite(tmp_path, capsys, docs):
    corpus, out = write_jsonl(tmp_path / "c.jsonl", docs), tmp_path / "out"
    common = ["--input", corpus, "--output", out, "--vocab-size", 300, "--val-docs", 5, "--workers", 1]
    assert run_main(capsys, *common, "--prefix", "old")[0] == 0
    code, err = run_main(capsys, *common)
    assert (
        code == 2
        and "already holds a prepared corpus" in error_line(err)
        and "--overwrite" in error_line(err)
    )
    assert run_main(capsys, *common, "--overwrite")[0] == 0
    assert {p.name.split("_")[0] for p in [*list_shards(out, "train"), *list_shards(out, "val")]} == {
        "corpus"
    }


def test_console_script_entry_point_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'speedrun-prepare = "speedrun.data.prepare:main"' in text
    proc = subprocess.run(
        [sys.executable, "-m", "speedrun.prepare", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert proc.returncode == 0 and "--vocab-size" in proc.stdout and "--val-docs" in proc.stdout


def test_a_prepared_corpus_trains_through_the_cli(tmp_path, docs):
    """The whole path a researcher takes: prepare a corpus, then train on it with data=shards."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    out = tmp_path / "prepared"
    prep = subprocess.run(
        [sys.executable, "-m", "speedrun.prepare", "--input", str(corpus), "--output", str(out),
         "--vocab-size", "512", "--val-docs", "30", "--workers", "1"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    run_dir = tmp_path / "run"
    run_train(
        run_dir, "data=shards", f"data.path={out}", f"data.tokenizer={out / 'tokenizer.model'}",
        "model.vocab_size=512", "trainer.max_steps=6", "trainer.val_every=3", "trainer.export=false",
    )  # fmt: skip
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert "prepared" in (run_dir / "train.log").read_text()


# --- any tokenizer, stops, progress -------------------------------------------------------------------------


def _big_tiktoken(path: Path) -> None:
    """A rank file whose vocabulary (with <|endoftext|>) is 65,537 tokens: one more than uint16 holds."""
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)]
    tokens = [bytes([b]) for b in range(256)] + pairs[: 65536 - 256]  # 65,536 ranks, then <|endoftext|>
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))


def _json_without_start_token(path: Path) -> None:
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(["ka lo mi ne"], trainer)
    tokenizer.save(str(path))


@pytest.mark.parametrize(
    ("args", "setup", "message"),
    [
        (["--tokenizer", "{tmp}/big.tiktoken"], lambda tmp: _big_tiktoken(tmp / "big.tiktoken"),
         "has 65,537 tokens; uint16 shards hold at most 65,536"),
        (["--tokenizer", "{tmp}/nostart.json"], lambda tmp: _json_without_start_token(tmp / "nostart.json"),
         "has no token to open documents with"),
        (["--tokenizer", "{tmp}/tok.txt"], lambda tmp: (tmp / "tok.txt").write_text("x"),
         "unknown kind; give a SentencePiece .model"),
        (["--tokenizer", "gpt2"], None,
         "GPT-2's tokenizer is not available offline: put vocab.bpe and encoder.json"),
        (["--train", "bytelevel", "--vocab-size", "200"], None, "vocab 200 is too small for a byte-level BPE"),
        (["--vocab-size", "300", "--output", "{tmp}/a_file/out"], lambda tmp: (tmp / "a_file").write_text("x"),
         "a_file/out"),
    ],
)  # fmt: skip
def test_any_tokenizer_that_cannot_make_shards_is_one_error_line(tmp_path, docs, args, setup, message):
    args = [a.format(tmp=tmp_path) for a in args]
    if setup is not None:
        setup(tmp_path)
    output = [] if "--output" in args else ["--output", str(tmp_path / "out")]
    proc = subprocess.run(
        [sys.executable, "-m", "speedrun.prepare", "--input", str(write_jsonl(tmp_path / "c.jsonl", docs)),
         *output, "--workers", "1", "--val-docs", "5", *args],
        cwd=REPO, env=cli_env(SPEEDRUN_CACHE=str(tmp_path / "cache")), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
    assert message in error_line(proc.stderr)
    assert not list(tmp_path.rglob("*_train_*.bin")) and not list(tmp_path.rglob("manifest.json"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--tokenizer", "x.model", "--train", "bytelevel"],
            "argument --train: not allowed with argument --tokenizer",
        ),
        (["--vocab-size", "70000"], "--vocab-size 70000 does not fit uint16 shards (at most 65536)"),
        (["--vocab-size", "300", "--train", "wordpiece"], "argument --train: invalid choice: 'wordpiece'"),
    ],
)
def test_usage_errors_about_tokenizers_are_one_line(capsys, tmp_path, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), *args])
    assert exit_info.value.code == 2
    assert message in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_cleans_up_like_ctrl_c(tmp_path, signum):
    """SIGTERM (a scheduler, `kill`) and Ctrl-C both leave no staged shards, no shards and no manifest."""
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(30_000, seed=1))
    tokenizer = train_sentencepiece(make_docs(300), tmp_path / "tok", 300, threads=1)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "speedrun.prepare", "--input", str(corpus), "--output", str(out), "--tokenizer",
         str(tokenizer), "--workers", "1", "--val-docs", "10", "--shard-tokens", "2000"],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    staging = out / ".prepare-partial"
    deadline = time.monotonic() + 60
    while not list(staging.glob("*_train_*.bin")):  # encoding has begun: shards are being staged
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it could be stopped"
        time.sleep(0.02)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    assert error_line(stderr) in (
        "error: terminated (SIGTERM); no shards were written",
        "error: interrupted; no shards were written",
    )
    assert "Traceback" not in stderr
    assert not staging.exists() and not list_shards(out, "train") and not (out / "manifest.json").exists()


def test_progress_is_a_live_bar_on_a_terminal_and_plain_lines_otherwise(tmp_path, docs):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    command = [sys.executable, "-m", "speedrun.prepare", "--input", str(corpus), "--vocab-size", "300",
               "--workers", "1", "--val-docs", "5"]  # fmt: skip
    piped = subprocess.run([*command, "--output", str(tmp_path / "piped")], cwd=REPO, env=cli_env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    bar_lines = [line for line in piped.stderr.splitlines() if line.startswith("encoding:")]
    assert bar_lines and "\r" not in piped.stderr and "\x1b" not in piped.stderr
    assert "100%" in bar_lines[-1] and f"{len(docs)} docs" in bar_lines[-1]

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen([*command, "--output", str(tmp_path / "tty")], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=terminal)  # fmt: skip
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed: the process is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert proc.wait(timeout=120) == 0
    shown = b"".join(chunks).decode()
    assert "\rencoding:" in shown and "100%|" in shown, "redrawn in place, with a bar"
