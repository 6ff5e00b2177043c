"""Every tokenizer kind behind one interface, built here from real libraries: byte tables that match the
UTF-8 of the decoded text, round trips, and a one-line error for every file that cannot be used."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from speedrun.data import tokenizer_tiktoken
from speedrun.data.stdlib_corpus import is_val_document, stdlib_documents
from speedrun.data.tokenizer import (
    GPT2_NAME,
    Tokenizer,
    TokenizerError,
    encode_documents,
    split_long_text,
)
from speedrun.data.tokenizer_huggingface import bytes_to_unicode, train_bytelevel
from speedrun.data.tokenizer_kinds import load_tokenizer
from speedrun.eval import count_target_bytes
from tests.tokenizer_builders import metaspace_json, rank_file_from_bytelevel

KINDS = ["sentencepiece", "tiktoken", "bytelevel_json", "metaspace_json"]
UNICODE_TEXT = "x = 'λ'  # naïve café 中文 🙂 → 42\n\tspaces  kept  <|endoftext|> <s>\n"


@pytest.fixture(scope="module")
def documents() -> tuple[list[str], list[str]]:
    """(train, validation) documents of the stdlib corpus: real text, with some non-ASCII."""
    docs = stdlib_documents(4_000_000)
    train = [text for rel, text in docs if not is_val_document(rel)]
    val = [text for rel, text in docs if is_val_document(rel)]
    return train, val


@pytest.fixture(scope="module")
def tokenizers_by_kind(tmp_path_factory, documents, stdlib_corpus_dir: Path) -> dict[str, Tokenizer]:
    train, _ = documents
    folder = tmp_path_factory.mktemp("tokenizers")
    bytelevel = train_bytelevel(train[:300], folder / "bytelevel.json", 512)
    files = {
        "sentencepiece": stdlib_corpus_dir / "stdlib_1024_bpe.model",
        "tiktoken": rank_file_from_bytelevel(bytelevel, folder / "ranks.tiktoken"),
        "bytelevel_json": bytelevel,
        "metaspace_json": metaspace_json(train[:300], folder / "metaspace.json"),
    }
    return {kind: load_tokenizer(path) for kind, path in files.items()}


def table_bytes(tokenizer: Tokenizer, ids) -> int:
    """Bytes that ids[1:] stand for by the tokenizer's tables, counted as evaluation counts them."""
    luts = tokenizer.token_bytes().as_tensors(torch.device("cpu"))
    t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    return int(count_target_bytes(t[:-1], t[1:], luts).item())


@pytest.mark.parametrize("kind", KINDS)
def test_byte_tables_count_exactly_the_utf8_of_whole_documents(tokenizers_by_kind, documents, kind):
    tokenizer = tokenizers_by_kind[kind]
    _, val = documents
    # Documents opening with a space are left out: after a boundary SentencePiece's rule (parameter-golf's)
    # reads a leading '▁' as its dummy prefix, and a tokenizer without one decodes it as text.
    docs = [doc for doc in val if not doc.startswith(" ")][:40] + [UNICODE_TEXT]
    tokens = encode_documents(tokenizer, docs)
    start = tokenizer.document_start_id
    assert tokens[0] == start and int((tokens == start).sum()) == len(docs)
    # End on the next document's start token (0 bytes), so that every document's last token is a target.
    ids = np.append(tokens.astype(np.int64), start)
    assert table_bytes(tokenizer, ids) == sum(len(doc.encode("utf-8")) for doc in docs)
    # And each document decodes back to itself.
    bounds = [*np.flatnonzero(tokens == start), len(tokens)]
    decoded = [tokenizer.decode(tokens[a + 1 : b].tolist()) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert decoded == docs


@pytest.mark.parametrize("kind", KINDS)
def test_the_interface_describes_each_kind(tokenizers_by_kind, kind, tmp_path):
    tokenizer = tokenizers_by_kind[kind]
    table = tokenizer.token_bytes()
    assert table.base.shape == table.leading_space.shape == table.boundary.shape == (tokenizer.vocab_size,)
    assert table.boundary[tokenizer.document_start_id] and table.base[tokenizer.document_start_id] == 0
    assert len(tokenizer.fingerprint()) == 64
    # `save` writes a file that loads back as the same tokenizer.
    saved = tmp_path / f"copy{tokenizer.suffix}"
    tokenizer.save(saved)
    again = load_tokenizer(saved)
    assert (again.kind, again.vocab_size, again.fingerprint()) == (
        tokenizer.kind,
        tokenizer.vocab_size,
        tokenizer.fingerprint(),
    )
    assert again.encode_batch([UNICODE_TEXT]) == tokenizer.encode_batch([UNICODE_TEXT])


def test_a_special_token_spelled_inside_a_document_is_text(tokenizers_by_kind):
    for kind in ("tiktoken", "bytelevel_json"):
        tokenizer = tokenizers_by_kind[kind]
        (ids,) = tokenizer.encode_batch(["a <|endoftext|> b"])
        assert tokenizer.document_start_id not in ids, kind
        assert table_bytes(tokenizer, [tokenizer.document_start_id, *ids]) == len("a <|endoftext|> b")


def test_tiktoken_and_tokenizers_split_the_same_vocabulary_the_same_way(tokenizers_by_kind, documents):
    ranks, bytelevel = tokenizers_by_kind["tiktoken"], tokenizers_by_kind["bytelevel_json"]
    _, val = documents
    texts = [*val[:20], UNICODE_TEXT]
    assert [len(ids) for ids in ranks.encode_batch(texts)] == [
        len(ids) for ids in bytelevel.encode_batch(texts)
    ]


def test_the_byte_to_character_table_is_gpt2s():
    table = bytes_to_unicode()
    assert sorted(table.values()) == list(range(256))
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    # The characters tokenizers itself writes a text's bytes in map back to exactly those bytes.
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for text in (UNICODE_TEXT, "".join(map(chr, range(1, 256)))):
        ((written, _),) = splitter.pre_tokenize_str(text)
        assert bytes(table[c] for c in written) == text.encode("utf-8")


def test_long_text_is_cut_into_pieces_at_line_ends_then_spaces():
    lines = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(2000))
    pieces = split_long_text(lines, max_chars=1000)
    assert "".join(pieces) == lines and all(len(p) <= 1000 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-1]), "cut after a newline"
    words = " ".join(["word"] * 1000)
    pieces = split_long_text(words, max_chars=100)
    assert "".join(pieces) == words and all(p.startswith(" ") for p in pieces[1:]), "cut before a space"
    assert split_long_text("y" * 250, max_chars=100) == ["y" * 100, "y" * 100, "y" * 50]
    assert split_long_text("short", max_chars=100) == ["short"]


def test_a_long_document_is_encoded_in_pieces_with_one_start_token(tokenizers_by_kind, monkeypatch):
    tokenizer = tokenizers_by_kind["bytelevel_json"]
    text = "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(3000))
    monkeypatch.setattr("speedrun.data.tokenizer.MAX_PIECE_CHARS", 4096)
    assert len(split_long_text(text, 4096)) > 10
    tokens = encode_documents(tokenizer, [text])
    assert int((tokens == tokenizer.document_start_id).sum()) == 1
    assert tokenizer.decode(tokens[1:].tolist()) == text
    assert table_bytes(tokenizer, tokens) == len(text.encode())


def _wordpiece(path: Path) -> Path:
    tokenizer = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("tok.vocab", b"whatever", "unknown kind; give a SentencePiece .model"),
        ("tok.model", b"not a model", "is not a SentencePiece .model file"),
        ("tok.json", b"{not json", "is not a Hugging Face tokenizer.json"),
        ("tok.json", None, "decoder (WordPiece) is neither byte-level nor Metaspace"),
        ("tok.tiktoken", b"QQ== 0\nnot-a-rank-line\n", "line 2 is not `base64-token rank`"),
        ("tok.tiktoken", b"QQ== 0\nQg== 1\n", "254 of the 256 single bytes have no rank"),
        ("tok.tiktoken", b"\n", "empty tiktoken rank file"),
        ("missing.model", False, "missing.model not found"),
    ],
)
def test_an_unusable_tokenizer_file_is_one_line_naming_it(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        _wordpiece(path)
    elif content is not False:
        path.write_bytes(content)
    with pytest.raises(TokenizerError) as error:
        load_tokenizer(path)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text


def test_gpt2_without_its_files_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDRUN_CACHE", str(tmp_path))
    folder = tmp_path / "tokenizers" / "gpt2"
    with pytest.raises(TokenizerError) as error:
        load_tokenizer(GPT2_NAME)
    text = str(error.value)
    assert f"put vocab.bpe and encoder.json (from {tokenizer_tiktoken.GPT2_URL}) into {folder}" in text
    folder.mkdir(parents=True)
    (folder / "vocab.bpe").write_text("#version: 0.2\n")
    (folder / "encoder.json").write_text("{}")
    with pytest.raises(
        TokenizerError, match=f"{folder / 'vocab.bpe'} is not GPT-2's vocab.bpe .*fetch it again"
    ):
        load_tokenizer(GPT2_NAME)


def test_gpt2_is_read_from_the_files_tiktoken_downloads(tmp_path, monkeypatch, tokenizers_by_kind):
    """GPT-2's real files cannot be fetched here, so a small vocabulary is written in their format
    (`vocab.bpe` merges and `encoder.json`, in GPT-2's byte-to-character alphabet) and the pinned hashes
    are pointed at it; everything else is the path `gpt2` takes."""
    bytelevel = json.loads(Path(tokenizers_by_kind["bytelevel_json"].source).read_text())
    merges = [m if isinstance(m, list) else m.split(" ") for m in bytelevel["model"]["merges"]]
    char_of = {byte: char for char, byte in bytes_to_unicode().items()}
    # GPT-2 numbers the printable bytes first (tiktoken's data_gym_to_mergeable_bpe_ranks checks this).
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    order = printable + [b for b in range(256) if b not in printable]
    encoder = {char_of[b]: i for i, b in enumerate(order)}
    encoder.update({a + b: 256 + i for i, (a, b) in enumerate(merges)})
    folder = tmp_path / "tokenizers" / "gpt2"
    folder.mkdir(parents=True)
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "encoder.json").write_text(json.dumps(encoder))
    monkeypatch.setenv("SPEEDRUN_CACHE", str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    fake_hashes = {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in ("vocab.bpe", "encoder.json")
    }
    monkeypatch.setattr(tokenizer_tiktoken, "GPT2_FILES", fake_hashes)

    gpt2 = load_tokenizer(GPT2_NAME)
    assert isinstance(gpt2.encoding, tiktoken.Encoding) and gpt2.source == GPT2_NAME
    assert gpt2.vocab_size == 256 + len(merges) + 1 and gpt2.document_start_id == 256 + len(merges)
    reference = tokenizers_by_kind["bytelevel_json"]
    assert [len(ids) for ids in gpt2.encode_batch([UNICODE_TEXT])] == [
        len(ids) for ids in reference.encode_batch([UNICODE_TEXT])
    ]
    # prepare saves it as a rank file; the manifest's fingerprint of that file is gpt2's.
    gpt2.save(tmp_path / "tokenizer.tiktoken")
    assert load_tokenizer(tmp_path / "tokenizer.tiktoken").fingerprint() == gpt2.fingerprint()
