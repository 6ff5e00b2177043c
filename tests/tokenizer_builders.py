"""Small tokenizers of the kinds no library trains directly, built from real libraries for tests."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from speedrun.data.tokenizer_huggingface import bytes_to_unicode


def rank_file_from_bytelevel(json_path: Path, out: Path) -> Path:
    """The byte-level tokenizer's vocabulary as a tiktoken rank file: merges keep their order, so both
    libraries split text the same way (GPT-2's pattern in both) and merge it in the same order."""
    byte_of = bytes_to_unicode()
    vocab = json.loads(json_path.read_text())["model"]["vocab"]
    ranked = sorted(
        (token_id, token) for token, token_id in vocab.items() if token_id != 0
    )  # 0: <|endoftext|>
    lines = [
        base64.b64encode(bytes(byte_of[c] for c in token)) + b" %d" % (rank - 1) for rank, token in ranked
    ]
    out.write_bytes(b"\n".join(lines) + b"\n")
    return out


def metaspace_json(train: list[str], out: Path) -> Path:
    """A SentencePiece-style BPE in tokenizers' format, as converted Llama 2 tokenizers are: Metaspace
    pre-tokenizer, byte fallback (<0xNN> tokens), and a Replace/ByteFallback/Fuse/Strip decoder."""
    tokenizer = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>"], show_progress=False)
    tokenizer.train_from_iterator(train, trainer)
    config = json.loads(tokenizer.to_str())
    vocab = config["model"]["vocab"]
    for byte in range(
        256
    ):  # the trainer does not add byte-fallback pieces: append them, as SentencePiece has
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    out.write_text(json.dumps(config))
    return out
