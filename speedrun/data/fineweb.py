"""Fetch a published, pre-tokenized FineWeb: `python -m speedrun.data.fineweb`.

    python -m speedrun.data.fineweb --variant sp1024 --train-shards 80   # parameter-golf's
    python -m speedrun.data.fineweb --variant gpt2 --train-shards 8      # modded-nanogpt's

`sp<N>` variants: parameter-golf's export. Its Hugging Face dataset repo (default
willdepueoai/parameter-golf) holds it under `datasets/`: `manifest.json`,
`datasets/fineweb10B_sp1024/fineweb_{train,val}_NNNNNN.bin` and `tokenizers/fineweb_1024_bpe.{model,vocab}`.
They land exactly where `data=fineweb_sp1024` reads: `<data-dir>/datasets/fineweb10B_sp1024/` and
`<data-dir>/tokenizers/`. The validation split (the fixed first 50k documents) is always fetched whole;
train shards 0..N-1 are a prefix of the frozen shuffled export, so N shards here train on the same data as
N shards in parameter-golf.

`gpt2`: the GPT-2-tokenized FineWeb 10B that modded-nanogpt's `data/cached_fineweb10B.py` fetches (dataset
repo kjj0/fineweb10B-gpt2, files at its root): `fineweb_val_000000.bin` and train shards numbered from 1
(about 100M tokens each, 103 in all), into `<data-dir>/datasets/fineweb10B_gpt2/`, where `data=fineweb_gpt2`
reads. It has no manifest and no tokenizer files: its task needs only the loss.

Each file is downloaded into a staging folder, verified (a shard's header and size, the tokenizer loads),
and only then renamed into place: an interrupted or broken download never leaves a file the loader would
accept. Files already complete are skipped without a network call, so a rerun resumes where one stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from speedrun.cli import Parser
from speedrun.data.shards import ShardError, read_shard_header
from speedrun.data.tokenizer import TokenizerError
from speedrun.data.tokenizer_sentencepiece import SentencePieceTokenizer

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
STAGING_NAME = ".fineweb-download"


class UsageError(Exception):
    """A request that cannot be met as given (bad variant, too many shards, no such repo): exit status 2."""


class FetchError(Exception):
    """The hub cannot be used (unreachable, no manifest): the run stops, exit status 1."""


class BrokenFile(FetchError):
    """One file could not be fetched intact: the others are still fetched, then exit status 1."""


@dataclass(frozen=True)
class HubFile:
    remote: str  # path inside the dataset repo
    local: Path  # where the training config expects it
    kind: str  # "shard", "model", "vocab" or "manifest": decides how it is verified


@dataclass(frozen=True)
class Variant:
    """Where a variant's files are on the hub and where they go locally."""

    name: str
    dataset: str  # the folder under <data-dir>/datasets/ (and, for sp variants, under the repo's datasets/)
    repo_id: str  # the default dataset repo
    remote_root: str  # the default folder of the export inside the repo
    vocab_size: int
    # parameter-golf's export lists its shard counts and tokenizer in manifest.json; modded-nanogpt's has
    # no manifest, so its layout is fixed here (from its data/cached_fineweb10B.py).
    has_manifest: bool = True
    first_train_shard: int = 0
    val_shards: int = 0
    train_shards: int = 0

    @classmethod
    def parse(cls, name: str) -> Variant:
        if name == "gpt2":
            # cached_fineweb10B.py fetches fineweb_val_000000.bin and fineweb_train_000001..000103.bin.
            return cls(
                name, "fineweb10B_gpt2", "kjj0/fineweb10B-gpt2", "", 50257,
                has_manifest=False, first_train_shard=1, val_shards=1, train_shards=103,
            )  # fmt: skip
        match = re.fullmatch(r"sp(\d+)", name)
        if not match:
            raise UsageError(
                f"--variant {name!r} is neither gpt2 nor a SentencePiece variant such as sp1024 or sp4096"
            )
        return cls(name, f"fineweb10B_{name}", DEFAULT_REPO_ID, DEFAULT_REMOTE_ROOT, int(match.group(1)))

    @property
    def remote_dataset_dir(self) -> str:
        """The shards' folder inside the export."""
        return f"datasets/{self.dataset}" if self.has_manifest else ""

    @property
    def tokenizer_files(self) -> list[str]:
        if not self.has_manifest:
            return []
        return [
            f"tokenizers/fineweb_{self.vocab_size}_bpe.model",
            f"tokenizers/fineweb_{self.vocab_size}_bpe.vocab",
        ]


def verify(path: Path, kind: str, vocab_size: int) -> str | None:
    """Why the file at `path` is not usable, or None when it is complete."""
    if not path.is_file():
        return "missing"
    if kind == "shard":
        try:
            read_shard_header(path)
        except ShardError as error:
            # Its first clause: the advice after it ("delete it and fetch again") is what happens here anyway.
            return str(error).removeprefix(f"{path}: ").split("; ")[0]
    elif kind == "model":
        try:
            pieces = SentencePieceTokenizer(path).vocab_size
        except TokenizerError as error:
            return str(error)
        if pieces != vocab_size:
            return f"tokenizer has {pieces} pieces, expected {vocab_size}"
    elif kind == "manifest":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            return f"not valid JSON ({error})"
    elif path.stat().st_size == 0:
        return "empty file"
    return None


class Hub:
    """hf_hub_download into a staging folder, then verify and move into place."""

    def __init__(
        self, repo_id: str, revision: str, remote_root: str, data_dir: Path, vocab_size: int
    ) -> None:
        try:  # imported here: only this command needs huggingface_hub
            from huggingface_hub import errors, hf_hub_download
        except ImportError:
            raise UsageError("huggingface_hub is not installed; pip install 'speedrun[fineweb]'") from None
        self.errors, self.hf_hub_download = errors, hf_hub_download
        self.repo_id, self.revision, self.remote_root = repo_id, revision, remote_root.strip("/")
        self.staging = data_dir / STAGING_NAME  # same filesystem as the destinations: os.replace is atomic
        self.vocab_size = vocab_size

    def where(self) -> str:
        return f"{self.repo_id}@{self.revision}"

    def remote_path(self, path: str) -> str:
        return "/".join(part for part in (self.remote_root, path) if part)

    def fetch(self, item: HubFile) -> bool:
        """Make `item.local` a complete, verified file; return False when it already was one."""
        problem = verify(item.local, item.kind, self.vocab_size)
        if problem is None:
            return False
        if problem != "missing":
            _log(f"{item.local}: {problem}; downloading it again")
            item.local.unlink()
        for attempt in (1, 2):
            staged: Path | None = None
            try:
                staged = self._download(item.remote)
                problem = verify(staged, item.kind, self.vocab_size)
            except self.errors.RemoteEntryNotFoundError:
                hint = "check --repo-id, --revision, --remote-root"
                raise BrokenFile(f"not found on {self.where()} ({hint})") from None
            except (self.errors.RepositoryNotFoundError, self.errors.RevisionNotFoundError):
                raise UsageError(
                    f"dataset repo {self.where()} not found; check --repo-id and --revision"
                ) from None
            except self.errors.LocalEntryNotFoundError as error:
                # The hub is unreachable: every other file would fail the same way, so stop here.
                cause = _first_line(error.__cause__ or error)
                hint = "check the network or HF_ENDPOINT"
                raise FetchError(f"cannot reach the hub for {item.remote} ({cause}); {hint}") from None
            except Exception as error:
                # Any other transfer failure (HTTP error, truncated body, full disk) is worth one retry.
                problem = f"download failed ({_first_line(error)})"
            if problem is None and staged is not None:
                item.local.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, item.local)
                return True
            if staged is not None:
                staged.unlink(missing_ok=True)  # a broken file must not look downloaded next time
            if attempt == 1:
                _log(f"{item.remote}: {problem}; retrying once")
        raise BrokenFile(f"unusable after 2 attempts: {problem}")

    def _download(self, remote: str) -> Path:
        return Path(
            self.hf_hub_download(
                repo_id=self.repo_id,
                filename=remote,
                repo_type="dataset",
                revision=self.revision,
                local_dir=self.staging,
            )
        )


def plan(hub: Hub, variant: Variant, train_shards: int, data_dir: Path) -> list[HubFile]:
    """The files to fetch: the tokenizer, every val shard, the first `train_shards` train shards.

    parameter-golf's manifest says how many shards of each split exist, as in its own downloader.
    """
    dataset_dir = data_dir / "datasets" / variant.dataset
    if not variant.has_manifest:
        if train_shards > variant.train_shards:
            raise UsageError(
                f"--train-shards {train_shards}: {variant.dataset} has {variant.train_shards} train shards"
            )
        first = variant.first_train_shard
        return [_shard(hub, variant, dataset_dir, "val", i) for i in range(variant.val_shards)] + [
            _shard(hub, variant, dataset_dir, "train", i) for i in range(first, first + train_shards)
        ]

    manifest_file = HubFile(hub.remote_path("manifest.json"), data_dir / "manifest.json", "manifest")
    try:
        hub.fetch(manifest_file)
    except BrokenFile as error:
        raise FetchError(f"cannot get the export's manifest {manifest_file.remote}: {error}") from None
    manifest = json.loads(manifest_file.local.read_text(encoding="utf-8"))
    datasets = {entry.get("name"): entry for entry in manifest.get("datasets", [])}
    if variant.dataset not in datasets:
        raise UsageError(
            f"--variant {variant.name}: {variant.dataset} is not in {hub.where()}'s manifest "
            f"(it has {', '.join(sorted(map(str, datasets))) or 'none'})"
        )
    entry = datasets[variant.dataset]
    stats = entry.get("stats") or {}
    available = int(stats.get("files_train", 0))
    if train_shards > available:
        raise UsageError(
            f"--train-shards {train_shards}: {variant.dataset} has only {available} train shards on {hub.where()}"
        )
    tokenizers = {t.get("name"): t for t in manifest.get("tokenizers", [])}
    listed = tokenizers.get(entry.get("tokenizer_name"), {})
    tokenizer_files = [listed[key] for key in ("model_path", "vocab_path") if listed.get(key)]
    # Paths from the hub must stay inside <data-dir>/tokenizers/; fall back to the published names.
    if not tokenizer_files or not all(re.fullmatch(r"tokenizers/[\w.-]+", path) for path in tokenizer_files):
        tokenizer_files = variant.tokenizer_files

    kinds = {".model": "model", ".vocab": "vocab"}
    return (
        [
            HubFile(hub.remote_path(path), data_dir / path, kinds.get(Path(path).suffix, "vocab"))
            for path in tokenizer_files
        ]
        + [_shard(hub, variant, dataset_dir, "val", i) for i in range(int(stats.get("files_val", 0)))]
        + [_shard(hub, variant, dataset_dir, "train", i) for i in range(train_shards)]
    )


def _shard(hub: Hub, variant: Variant, dataset_dir: Path, split: str, index: int) -> HubFile:
    name = f"fineweb_{split}_{index:06d}.bin"
    remote = "/".join(part for part in (variant.remote_dataset_dir, name) if part)
    return HubFile(hub.remote_path(remote), dataset_dir / name, "shard")


def fetch(
    variant_name: str,
    train_shards: int,
    data_dir: Path,
    repo_id: str | None = None,
    revision: str = "main",
    remote_root: str | None = None,
) -> dict:
    """Fetch a variant's tokenizer, every val shard and the first `train_shards` train shards.

    `repo_id` and `remote_root` default to the variant's. Returns {"downloaded": n, "complete": n,
    "failed": [one message per file that could not be fetched], "repo": the repo@revision}.
    """
    variant = Variant.parse(variant_name)
    if data_dir.exists() and not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir} is a file, not a folder; give a folder (default: data)")
    repo_id = variant.repo_id if repo_id is None else repo_id
    remote_root = variant.remote_root if remote_root is None else remote_root
    hub = Hub(repo_id, revision, remote_root, data_dir, variant.vocab_size)
    shutil.rmtree(hub.staging, ignore_errors=True)  # partial files of a killed run: never reused
    files = plan(hub, variant, train_shards, data_dir)
    counts: dict = {"downloaded": 0, "complete": 0, "failed": [], "repo": hub.where()}
    for index, item in enumerate(files, start=1):
        try:
            downloaded = hub.fetch(item)
        except BrokenFile as error:  # keep going: one bad shard should not block the other 80
            _log(f"[{index}/{len(files)}] {item.local}: FAILED, {error}")
            counts["failed"].append(f"{item.remote} ({error})")
            continue
        counts["downloaded" if downloaded else "complete"] += 1
        _log(f"[{index}/{len(files)}] {item.local}: {'downloaded' if downloaded else 'already complete'}")
    if not counts["failed"]:
        shutil.rmtree(hub.staging, ignore_errors=True)
    return counts


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m speedrun.data.fineweb",
        description="Download a tokenized FineWeb (val split, N train shards, tokenizer): parameter-golf's "
        "export (sp1024, ...) or modded-nanogpt's GPT-2 tokens (gpt2).",
    )
    parser.add_argument(
        "--variant",
        default="sp1024",
        help="sp1024 (default), sp4096, ...: parameter-golf's export; gpt2: modded-nanogpt's",
    )
    parser.add_argument(
        "--train-shards",
        type=_count,
        required=True,
        metavar="N",
        help="train shards to fetch, about 100M tokens (200 MB) each; parameter-golf's baseline uses 80",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path("data"), help="destination root (default: data)"
    )
    parser.add_argument(
        "--repo-id",
        help=f"dataset repo (default: {DEFAULT_REPO_ID} for sp variants, kjj0/fineweb10B-gpt2 for gpt2)",
    )
    parser.add_argument(
        "--revision", default="main", help="branch, tag or commit of the repo (default: main)"
    )
    parser.add_argument(
        "--remote-root",
        help=f"folder of the export inside the repo (default: {DEFAULT_REMOTE_ROOT} for sp variants, "
        "the repo's root for gpt2)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        counts = fetch(
            args.variant, args.train_shards, args.data_dir, args.repo_id, args.revision, args.remote_root
        )
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # an unwritable --data-dir, a full disk
        where = f"{error.filename}: " if error.filename else ""
        print(
            f"error: {where}{error.strerror or error}; files already in place are complete", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the files already in place are complete, rerun to resume", file=sys.stderr)
        return 130
    if counts["failed"]:
        print(
            f"error: {len(counts['failed'])} files could not be fetched intact from {counts['repo']}, nothing broken "
            f"was kept (rerun to retry): {'; '.join(counts['failed'])}",
            file=sys.stderr,
        )
        return 1
    _log(
        f"done: {counts['downloaded']} downloaded, {counts['complete']} already complete, under {args.data_dir}"
    )
    if args.variant == "gpt2":
        _log(
            "no tokenizer is fetched: data=fineweb_gpt2 measures val_loss (modded-nanogpt's task); for val_bpb "
            "add data.tokenizer=gpt2, whose error says where GPT-2's tokenizer files go"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
