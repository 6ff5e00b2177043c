"""`make bench`: what the framework costs, measured side by side with what it wraps.

Every figure is measured in one run, side by side where there is a comparison:
- trainer: the real `Trainer` against a bare loop written here (same model, optimizer, schedule,
  batches and precision), alternating step by step and compared by median step time;
- data: tokens per second one rank's loader delivers (the reference's per-rank batch), and the
  peak memory and speed of `speedrun.prepare` on a 100 MB JSON-lines corpus and on one 30 MB document;
- eval: tokens per second of `speedrun.eval.evaluate`;
- sample: tokens per second of `speedrun.generate.generate` with the model's key/value cache and
  recomputing the whole sequence for every token, one after the other on the same model and prompt;
- cli: `--cfg job` latency and the time from process start to the first training record;
- gpu: tokens/s and MFU with all speed features, then with each one switched off (CUDA only);
- export: one trained model stored in every artifact variant (int8 / int6 x zlib, lzma, zstd,
  brotli): each one's size and the bits-per-byte its round trip costs.

`python benchmarks/bench.py [--only SECTION ...] [--out bench.json] [--check] [--tiny] [--threads N]`
prints a table and writes JSON; it exits 0 (it is a report) unless --check is given and a target
fails. On a CPU it runs torch with one thread (--threads) and glibc's heap kept for reuse (see
steady_cpu_allocator), so that a shared machine's load and allocator history do not swamp a 3 % test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import nn

from speedrun.compressors import COMPRESSORS, CompressorError
from speedrun.config import TrainerConfig, compose
from speedrun.data.sources import StdlibCorpus
from speedrun.data.stdlib_corpus import stdlib_documents
from speedrun.data.stream import measure_loader_throughput
from speedrun.distributed import DistContext
from speedrun.eval import evaluate
from speedrun.export import FORMATS, ArtifactFormat, load_artifact
from speedrun.flops import mfu
from speedrun.generate import generate
from speedrun.models.protocol import (
    cast_for_mixed_precision,
    flops_per_token,
    parameter_groups,
    parameter_roles,
)
from speedrun.optim.muon_adam import MuonAdam
from speedrun.schedules import WSD
from speedrun.sinks import MultiSink
from speedrun.trainer import RunPlan, Trainer

SECTIONS = ("trainer", "data", "eval", "sample", "cli", "gpu", "export")
SPEED_FEATURES = ("compile", "bf16_autocast", "fused_adam", "flash_sdpa")


@dataclass(frozen=True)
class Sizes:
    """How big and how long each measurement is."""

    model: str  # an option of conf/model: the sizes live there, not here
    seq_len: int
    batch_tokens: int  # per optimizer step, one micro-step
    steps: int  # per trainer run (the bare loop steps alongside)
    skip: int  # leading steps of each run left out as warm-up (allocator, caches, compilation)
    min_runs: int  # trainer runs at least; more while trainer_seconds last
    trainer_seconds: float  # time budget of the trainer comparison: more steps, smaller error
    val_tokens: int
    eval_batch_tokens: int
    loader_seq_len: int
    loader_tokens: int  # per rank and batch
    loader_seconds: float
    prepare_mb: float  # size of the JSON-lines corpus speedrun.prepare is measured on
    prepare_document_mb: float  # size of the single long document it is measured on as well
    cli_repeats: int
    export_model: str  # the model the export section trains once and stores in every variant
    export_steps: int
    export_keep_float: (
        int  # export.keep_float_max_numel: small enough that the model's matrices are quantised
    )
    sample_model: str  # the model generation is timed on (random weights: the speed does not depend on them)
    sample_tokens: int  # generated after a one-token prompt


# The reference's per-rank batch: 524,288 tokens over 8 ranks, 64 sequences of 1024.
REFERENCE_LOADER = dict(loader_seq_len=1024, loader_tokens=65536)

# A CPU step of ~50 ms of CPU time: long against timer noise, short enough for hundreds of steps.
CPU_SIZES = Sizes(
    model="gpt_tiny", seq_len=128, batch_tokens=2048, steps=40, skip=3, min_runs=2, trainer_seconds=90,
    val_tokens=32768, eval_batch_tokens=4096, loader_seconds=2.0, prepare_mb=100, prepare_document_mb=30,
    cli_repeats=5, export_model="gpt", export_steps=150, export_keep_float=4096, sample_model="pg_9x512",
    sample_tokens=256, **REFERENCE_LOADER,
)  # fmt: skip
# parameter-golf's baseline model and per-rank batch.
CUDA_SIZES = Sizes(
    model="pg_9x512", seq_len=1024, batch_tokens=65536, steps=40, skip=10, min_runs=3, trainer_seconds=60,
    val_tokens=1048576, eval_batch_tokens=65536, loader_seconds=2.0, prepare_mb=100, prepare_document_mb=30,
    cli_repeats=5, export_model="pg_9x512", export_steps=300, export_keep_float=65536, sample_model="pg_9x512",
    sample_tokens=256, **REFERENCE_LOADER,
)  # fmt: skip
# Plumbing only (tests): seconds in all, numbers meaningless.
TINY_SIZES = Sizes(
    model="gpt_tiny", seq_len=64, batch_tokens=256, steps=4, skip=1, min_runs=2, trainer_seconds=0,
    val_tokens=1024, eval_batch_tokens=512, loader_seq_len=64, loader_tokens=4096, loader_seconds=0.1,
    prepare_mb=2, prepare_document_mb=1, cli_repeats=1, export_model="gpt_tiny", export_steps=2,
    export_keep_float=1024, sample_model="gpt_tiny", sample_tokens=8,
)  # fmt: skip


@dataclass
class Result:
    """One row of the table. `target` is (">=" or "<=", bound) or None for a figure without one."""

    metric: str
    value: float | None
    unit: str
    target: tuple[str, float] | None = None
    note: str = ""
    details: dict = field(default_factory=dict)
    skipped: bool = False  # not measurable here (no CUDA); a None value otherwise means it failed

    @property
    def status(self) -> str:
        if self.value is None:
            return "skipped" if self.skipped else "fail"
        if self.target is None:
            return "info"
        op, bound = self.target
        ok = self.value <= bound if op == "<=" else self.value >= bound
        return "pass" if ok else "fail"


# --------------------------------------------------------------------------- trainer vs bare loop


def stamp(device: torch.device) -> tuple[float, float]:
    """(wall, CPU time of this process) in ms; on CUDA after a synchronize, so queued GPU work
    cannot hide host overhead (which makes a CUDA ratio an upper bound on the trainer's cost)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000.0 * time.perf_counter(), 1000.0 * time.process_time()


class InterleavedBare:
    """The trainer's loader, running one step of the bare loop inside every batch request.

    Trainer and bare loop so alternate step by step (A, B, A, B, ...), and a change in machine
    load that lasts longer than a step hits both alike. The trainer's step k runs from fetching
    batch k to its request for batch k + 1; the bare step, its own fetch included, runs between.
    """

    def __init__(self, loader, bare_step: Callable[[], None], device: torch.device):
        self.loader = loader
        self.bare_step = bare_step
        self.device = device
        self.trainer_ms: list[tuple[float, float]] = []  # (wall, cpu) per step
        self.bare_ms: list[tuple[float, float]] = []
        self._fetch_started: tuple[float, float] | None = None

    def next_batch(self, local_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        entered = stamp(self.device)
        if self._fetch_started is not None:
            self.trainer_ms.append(elapsed(self._fetch_started, entered))
        self.bare_step()
        self._fetch_started = stamp(self.device)
        self.bare_ms.append(elapsed(entered, self._fetch_started))
        return self.loader.next_batch(local_tokens)

    def __getattr__(self, name: str):  # state_dict / load_state_dict, for the trainer
        return getattr(self.loader, name)


def elapsed(start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    return end[0] - start[0], end[1] - start[1]


class InterleavedData:
    """A data source whose train loader is an InterleavedBare (the one made last is in `loader`)."""

    def __init__(self, data: StdlibCorpus, bare_step: Callable[[], None]):
        self.data = data
        self.bare_step = bare_step
        self.loader: InterleavedBare | None = None

    def train_loader(self, rank: int, world_size: int, device: torch.device) -> InterleavedBare:
        self.loader = InterleavedBare(
            self.data.train_loader(rank, world_size, device), self.bare_step, device
        )
        return self.loader

    def __getattr__(self, name: str):
        return getattr(self.data, name)


def build_model(sizes: Sizes, device: torch.device, bf16: bool | None = None) -> nn.Module:
    """The bench model, composed from conf/model like a run's, with the precision recipe the trainer
    uses (bf16 on CUDA unless bf16=False)."""
    torch.manual_seed(0)
    model = instantiate(compose([f"model={sizes.model}"]).model).to(device)
    if device.type == "cuda" and bf16 is not False:
        cast_for_mixed_precision(model)
    return model


def model_shape(sizes: Sizes) -> str:
    model = compose([f"model={sizes.model}"]).model
    return f"{model.num_layers}x{model.model_dim} GPT ({sizes.model})"


def bare_step(model, optimizer, schedule, loader, step: int, batch_tokens: int, autocast: bool) -> None:
    """One step as a training script without a framework takes it: batch, forward, backward, update."""
    scale = schedule.lr_scale(step, 0.0)
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * scale
    x, y = loader.next_batch(batch_tokens)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


class BareLoop:
    """The loop a training script writes without a framework, one step per call."""

    def __init__(self, model, optimizer: MuonAdam, schedule: WSD, loader, batch_tokens: int, autocast: bool):
        self.model, self.optimizer, self.schedule, self.loader = model, optimizer, schedule, loader
        self.batch_tokens = batch_tokens
        self.autocast = autocast
        self.steps_done = 0
        model.train()

    def step(self) -> None:
        components = (self.model, self.optimizer, self.schedule, self.loader)
        bare_step(*components, self.steps_done, self.batch_tokens, self.autocast)
        self.steps_done += 1


def bench_trainer(sizes: Sizes, device: torch.device, workdir: Path) -> list[Result]:
    # A few validation sequences: the trainer evaluates at its first and last step, outside the timing.
    data = StdlibCorpus(seq_len=sizes.seq_len, val_tokens=4 * sizes.seq_len)
    data.prepare()
    cuda = device.type == "cuda"
    trainer_model, bare_model = build_model(sizes, device), build_model(sizes, device)
    initial = {k: v.detach().clone() for k, v in trainer_model.state_dict().items()}
    # The trainer compiles on CUDA (compile=auto); the bare loop does too, once.
    bare_forward = torch.compile(bare_model, dynamic=False, fullgraph=True) if cuda else bare_model
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=device)

    def fresh(model: nn.Module) -> tuple[MuonAdam, WSD]:
        model.load_state_dict(initial)
        optimizer = MuonAdam(parameter_groups(model), compile_newtonschulz=cuda)
        return optimizer, WSD(max_steps=sizes.steps, max_wallclock_ms=None)

    trainer_ms: list[tuple[float, float]] = []
    bare_ms: list[tuple[float, float]] = []
    start = time.perf_counter()
    runs = 0
    weight_difference = 0.0
    while runs < sizes.min_runs or time.perf_counter() - start < sizes.trainer_seconds:
        runs += 1
        progress(
            f"trainer vs bare loop, interleaved step by step: run {runs}, {len(trainer_ms)} steps so far"
        )
        bare = BareLoop(
            bare_forward, *fresh(bare_model), data.train_loader(0, 1, device), sizes.batch_tokens, cuda
        )
        interleaved = InterleavedData(data, bare.step)
        optimizer, schedule = fresh(trainer_model)
        settings = TrainerConfig(
            train_batch_tokens=sizes.batch_tokens, max_steps=sizes.steps, val_every=0,
            val_batch_tokens=4 * sizes.seq_len, log_every=10, keep_checkpoints=1, export=False,
        )  # fmt: skip
        plan = RunPlan(
            # A new folder each time, so no run resumes or overwrites another's checkpoints.
            run_dir=Path(tempfile.mkdtemp(prefix="trainer-", dir=workdir)), seq_len=sizes.seq_len,
            grad_accum_steps=1, micro_batch_tokens=sizes.batch_tokens, max_steps=sizes.steps,
            max_wallclock_ms=None, compile=cuda, autocast_dtype=torch.bfloat16 if cuda else None,
        )  # fmt: skip
        trainer = Trainer(
            trainer_model, optimizer, schedule, interleaved, MultiSink(), ctx, settings, plan, {}
        )
        trainer.fit()
        trainer_ms += interleaved.loader.trainer_ms[sizes.skip :]
        bare_ms += interleaved.loader.bare_ms[sizes.skip :]
        # Proof that both did the same work: the same updates from the same batches (bitwise on a CPU).
        pairs = zip(trainer_model.parameters(), bare_model.parameters(), strict=True)
        weight_difference = max(weight_difference, *((a - b).abs().max().item() for a, b in pairs))
    return trainer_results(sizes, trainer_ms, bare_ms, runs, weight_difference, cuda)


def trainer_results(
    sizes: Sizes,
    trainer_ms: list[tuple[float, float]],
    bare_ms: list[tuple[float, float]],
    runs: int,
    weight_difference: float,
    cuda: bool,
) -> list[Result]:
    """Median step times and their ratio: by CPU time on a CPU (the work a step costs, whatever
    the neighbours on a shared machine do), by synchronized wall time on CUDA; the other clock
    is reported alongside."""
    clocks = {"wall": 0, "cpu": 1}
    median = {
        (loop, clock): statistics.median(t[i] for t in times)
        for loop, times in (("trainer", trainer_ms), ("bare", bare_ms))
        for clock, i in clocks.items()
    }
    main, other = ("wall", "cpu") if cuda else ("cpu", "wall")
    names = {"wall": "wall time", "cpu": "CPU time"}
    shape = f"{model_shape(sizes)}, {sizes.batch_tokens} tokens/step"
    steps = f"{len(trainer_ms)} + {len(bare_ms)} steps, {runs} runs interleaved step by step"
    details = {
        "trainer_step_ms": {clock: [t[i] for t in trainer_ms] for clock, i in clocks.items()},
        "bare_step_ms": {clock: [t[i] for t in bare_ms] for clock, i in clocks.items()},
        "max_weight_difference": weight_difference,
        "sizes": asdict(sizes),
    }
    ratio = {clock: median["trainer", clock] / median["bare", clock] for clock in clocks}
    return [
        Result(f"trainer step, {names[main]} (median)", median["trainer", main], "ms", note=shape),
        Result(f"bare loop step, {names[main]} (median)", median["bare", main], "ms", note=shape),
        Result(f"trainer / bare step, {names[main]}", ratio[main], "x", ("<=", 1.03), steps, details),
        Result(f"trainer / bare step, {names[other]}", ratio[other], "x", note="the other clock, no target"),
    ]


# --------------------------------------------------------------------------- data and evaluation


def bench_data(sizes: Sizes) -> list[Result]:
    data = StdlibCorpus(seq_len=sizes.loader_seq_len)
    data.prepare()
    results = []
    for world_size in (1, 8):
        progress(f"loader throughput, world size {world_size}")
        tokens_per_sec = measure_loader_throughput(
            data.train_files(), sizes.loader_seq_len, sizes.loader_tokens, world_size, sizes.loader_seconds
        )
        results.append(
            Result(
                f"loader tokens/s per rank (rank 0 of {world_size})",
                tokens_per_sec / 1e6,
                "M tok/s",
                (">=", 100.0),
                note=f"{sizes.loader_tokens} tokens x seq {sizes.loader_seq_len} per batch",
            )
        )
    return results


def bench_prepare(sizes: Sizes, workdir: Path) -> list[Result]:
    """`speedrun.prepare` with its default workers on a JSON-lines corpus of `prepare_mb` MB: the
    stdlib's sources, drawn at random, one document per line. It streams, so the memory it holds
    must not grow with the corpus; the figure is the sum of its processes' resident memory."""
    progress(f"speedrun.prepare on a {sizes.prepare_mb:g} MB JSON-lines corpus")
    corpus = workdir / "prepare_input.jsonl"
    size = write_jsonl_corpus(corpus, int(sizes.prepare_mb * 1e6))
    command = [sys.executable, "-m", "speedrun.prepare", "--input", str(corpus), "--output",
               str(workdir / "prepared"), "--vocab-size", "1024"]  # fmt: skip
    label = f"speedrun.prepare peak memory ({size / 1e6:.0f} MB JSONL)"
    peak, seconds, failure = run_measuring_memory(command, workdir / "prepare.log")
    if failure:
        return [Result(label, None, "MiB", ("<=", 1024.0), note=failure)]
    return [
        Result(label, peak / 2**20, "MiB", ("<=", 1024.0), note="all its processes, sampled every 50 ms"),
        Result(
            "speedrun.prepare throughput", size / 1e6 / seconds, "MB/s", note="tokenizer training included"
        ),
    ]


def bench_prepare_long_document(sizes: Sizes, workdir: Path) -> list[Result]:
    """`speedrun.prepare` on one document of `prepare_document_mb` MB (plus a small one for validation):
    a tokenizer given a whole long document at once would take gigabytes (issue: 1.8 GB for 30 MB)."""
    progress(f"speedrun.prepare on a single {sizes.prepare_document_mb:g} MB document")
    folder = workdir / "prepare_long_document"
    folder.mkdir(exist_ok=True)
    documents = [text for _, text in stdlib_documents()]
    (folder / "0_validation.txt").write_text(documents[0], encoding="utf-8")
    target = int(sizes.prepare_document_mb * 1e6)
    with open(folder / "1_long.txt", "w", encoding="utf-8") as f:  # the stdlib's files back to back
        written = 0
        for text in itertools.cycle(documents[1:]):
            if written >= target:
                break
            f.write(text)
            written += len(text.encode())
    command = [sys.executable, "-m", "speedrun.prepare", "--input", str(folder), "--output",
               str(workdir / "prepared_long_document"), "--vocab-size", "1024", "--val-docs", "1"]  # fmt: skip
    label = f"speedrun.prepare peak memory (one {sizes.prepare_document_mb:g} MB document)"
    peak, _, failure = run_measuring_memory(command, workdir / "prepare_long_document.log")
    if failure:
        return [Result(label, None, "MiB", ("<=", 400.0), note=failure)]
    return [Result(label, peak / 2**20, "MiB", ("<=", 400.0), note="all its processes, sampled every 50 ms")]


def run_measuring_memory(command: list[str], log_path: Path) -> tuple[float, float, str | None]:
    """Run a command; return (peak resident bytes of it and its children, seconds, failure note or None)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=cli_env(None))
        peak_bytes = 0
        while proc.poll() is None:
            peak_bytes = max(peak_bytes, tree_rss_bytes(proc.pid))
            time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return peak_bytes, seconds, f"failed: {last_line(log_path.read_text())}"
    return peak_bytes, seconds, None


def write_jsonl_corpus(path: Path, size: int) -> int:
    """A JSON-lines file of about `size` bytes from the stdlib's sources; returns its size."""
    documents = [json.dumps({"text": text}) + "\n" for _, text in stdlib_documents()]
    rng = random.Random(0)
    written = 0
    with open(path, "w") as f:
        while written < size:
            line = rng.choice(documents)
            f.write(line)
            written += len(line.encode())
    return written


def tree_rss_bytes(root: int) -> int:
    """Resident memory of a process and all its descendants, from /proc (Linux; 0 elsewhere)."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue  # exited meanwhile
        rss_kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        total += rss_kib * 1024
        todo += [int(child) for child in children]
    return total


def bench_eval(sizes: Sizes, device: torch.device) -> list[Result]:
    progress("evaluation throughput")
    data = StdlibCorpus(seq_len=sizes.seq_len, val_tokens=sizes.val_tokens)
    data.prepare()
    model = build_model(sizes, device)
    # As the trainer evaluates: compiled on CUDA (the first of the three passes compiles).
    eval_model = torch.compile(model, dynamic=False, fullgraph=True) if device.type == "cuda" else model
    val_tokens = data.load_val_tokens()
    luts = data.byte_luts(device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    tokens = (val_tokens.numel() - 1) // sizes.seq_len * sizes.seq_len
    seconds = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        evaluate(
            eval_model, val_tokens, luts, seq_len=sizes.seq_len, batch_tokens=sizes.eval_batch_tokens,
            device=device, autocast_dtype=autocast_dtype,
        )  # fmt: skip
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    # The first pass also warms caches; the median of three leaves it out.
    return [
        Result(
            "evaluation tokens/s",
            tokens / statistics.median(seconds) / 1e6,
            "M tok/s",
            note=f"{tokens} val tokens, {sizes.eval_batch_tokens} per forward",
        )
    ]


# --------------------------------------------------------------------------- export variants


def train_for_export(sizes: Sizes, device: torch.device, data: StdlibCorpus, workdir: Path) -> nn.Module:
    """The export section's model: `export_model` trained `export_steps` steps by the real Trainer."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = instantiate(compose([f"model={sizes.export_model}"]).model).to(device)
    if cuda:
        cast_for_mixed_precision(model)
    settings = TrainerConfig(
        train_batch_tokens=sizes.batch_tokens, max_steps=sizes.export_steps, val_every=0,
        val_batch_tokens=sizes.eval_batch_tokens, log_every=0, keep_checkpoints=1, export=False,
    )  # fmt: skip
    plan = RunPlan(
        run_dir=Path(tempfile.mkdtemp(prefix="export-", dir=workdir)), seq_len=sizes.seq_len,
        grad_accum_steps=1, micro_batch_tokens=sizes.batch_tokens, max_steps=sizes.export_steps,
        max_wallclock_ms=None, compile=cuda, autocast_dtype=torch.bfloat16 if cuda else None,
    )  # fmt: skip
    optimizer = MuonAdam(parameter_groups(model), compile_newtonschulz=cuda)
    schedule = WSD(max_steps=sizes.export_steps, max_wallclock_ms=None)
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=device)
    Trainer(model, optimizer, schedule, data, MultiSink(), ctx, settings, plan, {}).fit()
    return model


def bench_export(sizes: Sizes, device: torch.device, workdir: Path) -> list[Result]:
    """Every scheme x compressor on the same trained model: artifact bytes and round-trip delta bpb."""
    progress(f"export variants: training {sizes.export_model} for {sizes.export_steps} steps")
    data = StdlibCorpus(seq_len=sizes.seq_len, val_tokens=sizes.val_tokens)
    data.prepare()
    model = train_for_export(sizes, device, data, workdir)
    val_tokens, luts = data.load_val_tokens(), data.byte_luts(device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    def bpb() -> float:
        return evaluate(
            model, val_tokens, luts, seq_len=sizes.seq_len, batch_tokens=sizes.eval_batch_tokens,
            device=device, autocast_dtype=autocast_dtype,
        ).bpb  # fmt: skip

    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    roles = parameter_roles(model)
    base_bpb = bpb()
    shape = (
        f"{sizes.export_model}, {sizes.export_steps} steps, keep_float_max_numel={sizes.export_keep_float}"
    )
    results = [Result("export: trained model val_bpb (before export)", base_bpb, "bpb", note=shape)]
    for scheme in FORMATS:
        for compressor in COMPRESSORS:
            name = f"{scheme}_{compressor}"
            progress(f"export variant {name}")
            try:
                artifact = ArtifactFormat(scheme, compressor, keep_float_max_numel=sizes.export_keep_float)
            except CompressorError as error:  # an optional package not installed: a row that says so
                results.append(
                    Result(f"export {name}: artifact size", None, "kB", note=str(error), skipped=True)
                )
                continue
            folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
            started = time.perf_counter()
            payload = artifact.write(trained, folder, roles)
            write_s = time.perf_counter() - started
            model.load_state_dict(load_artifact(folder / artifact.filename), strict=True)
            delta = bpb() - base_bpb
            model.load_state_dict(trained, strict=True)
            note = f"round trip {delta:+.5f} bpb, ratio {payload['ratio']:.3f}x, written in {write_s:.2f} s"
            details = {**payload, "delta_bpb": delta, "write_s": write_s}
            size_kb = payload["compressed_bytes"] / 1000  # the exact bytes are in the details
            results.append(Result(f"export {name}: artifact size", size_kb, "kB", note=note, details=details))
    return results


def bench_sample(sizes: Sizes, device: torch.device) -> list[Result]:
    """Generation speed with the key/value cache and without it, side by side: the same model, prompt and
    number of tokens, greedy, so both must write the same tokens (checked)."""
    progress("sampling with and without the key/value cache")
    torch.manual_seed(0)
    model = instantiate(compose([f"model={sizes.sample_model}"]).model).to(device)
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised projections: every layer takes part
            p.normal_(0.0, 0.02)
    generate(model, [1], 4)  # warm caches and kernels, untimed
    tokens, seconds = {}, {}
    for use_cache in (True, False):
        synchronize(device)
        start = time.perf_counter()
        tokens[use_cache] = generate(model, [1], sizes.sample_tokens, use_cache=use_cache)
        synchronize(device)
        seconds[use_cache] = time.perf_counter() - start
    same = tokens[True] == tokens[False]
    rate = {use_cache: sizes.sample_tokens / seconds[use_cache] for use_cache in (True, False)}
    what = f"{sizes.sample_tokens} tokens from {sizes.sample_model}, batch 1, greedy"
    return [
        Result(
            "sampling tokens/s, KV cache", rate[True] if same else None, "tok/s",
            note=f"{what}; {rate[True] / rate[False]:.1f}x recomputing"
            + ("" if same else "; FAILED: the two wrote different tokens"),
            details={"seconds": seconds[True], "same_tokens_as_recomputing": same},
        ),
        Result(
            "sampling tokens/s, recomputing the sequence", rate[False], "tok/s", note=what,
            details={"seconds": seconds[False]},
        ),
    ]  # fmt: skip


# --------------------------------------------------------------------------- command line


def cli_env(threads: int | None) -> dict:
    """The user's environment, with the bench's CPU thread count (as in the in-process sections)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def bench_cli(sizes: Sizes, workdir: Path, threads: int | None) -> list[Result]:
    progress("--cfg job latency")
    command = [sys.executable, "-m", "speedrun.train", "--cfg", "job"]
    if sizes.cli_repeats > 1:
        # An untimed first run fills the OS file cache and Python's bytecode caches.
        subprocess.run(command, env=cli_env(threads), capture_output=True, timeout=120)
    latencies = []
    for _ in range(sizes.cli_repeats):
        start = time.perf_counter()
        proc = subprocess.run(command, env=cli_env(threads), capture_output=True, text=True, timeout=120)
        latencies.append(time.perf_counter() - start)
        if proc.returncode != 0:
            return [
                Result("--cfg job latency", None, "s", ("<=", 1.0), note=f"failed: {last_line(proc.stderr)}")
            ]
    results = [
        Result(
            "--cfg job latency (median)",
            statistics.median(latencies),
            "s",
            ("<=", 1.0),
            note=f"{len(latencies)} runs",
            details={"seconds": latencies},
        )
    ]
    results.append(config_error_latency(sizes, threads))
    progress("time to first step")
    results.append(time_to_first_step(workdir / "first_step", threads))
    return results


def config_error_latency(sizes: Sizes, threads: int | None) -> Result:
    """Seconds until a config error's one line (median), with nproc_per_node=auto: refused before torch."""
    progress("config error latency")
    command = [
        sys.executable,
        "-m",
        "speedrun.train",
        "optimizer.matrix_lr=-1",
        "trainer.nproc_per_node=auto",
    ]
    latencies = []
    for _ in range(sizes.cli_repeats):
        start = time.perf_counter()
        proc = subprocess.run(command, env=cli_env(threads), capture_output=True, text=True, timeout=120)
        latencies.append(time.perf_counter() - start)
        if proc.returncode == 0 or not proc.stderr.startswith("error:"):
            return Result(
                "config error latency", None, "s", ("<=", 0.5), note="the bad config was not refused"
            )
    return Result("config error latency (median)", statistics.median(latencies), "s", ("<=", 0.5),
                  note=f"{len(latencies)} runs", details={"seconds": latencies})  # fmt: skip


def time_to_first_step(run_dir: Path, threads: int | None) -> Result:
    """Seconds from starting a tiny real run to its first training record in metrics.jsonl."""
    overrides = [
        "model=gpt_tiny", "data.seq_len=64", "data.val_tokens=4096", "trainer.train_batch_tokens=1024",
        "trainer.val_batch_tokens=4096", "trainer.max_steps=2", "trainer.log_every=1",
        "trainer.export=false", "logger=none", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    name = "time to first step"
    start = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-m", "speedrun.train", *overrides],
        env=cli_env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        first = None
        while first is None and time.perf_counter() - start < 300:
            exited = proc.poll() is not None
            if metrics.exists() and any("train/loss" in line for line in metrics.read_text().splitlines()):
                first = time.perf_counter() - start
            elif exited:
                break
            time.sleep(0.01)
        try:
            _, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    if first is None:
        return Result(name, None, "s", note=f"failed (exit {proc.returncode}): {last_line(stderr)}")
    return Result(name, first, "s", note="tiny run: start-up, data check, step-0 eval, step 1")


def last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else "no output"


# --------------------------------------------------------------------------- GPU ablations


def bench_gpu(sizes: Sizes, device: torch.device) -> list[Result]:
    if device.type != "cuda":
        return [Result("GPU tokens/s and MFU per speed feature", None, "", note="no CUDA", skipped=True)]
    results = []
    reference = None
    for off in (None, *SPEED_FEATURES):
        label = "all speed features" if off is None else f"without {off}"
        progress(f"GPU: {label}")
        tokens_per_sec, model_mfu = gpu_throughput(sizes, device, off)
        reference = reference or tokens_per_sec
        note = f"MFU {model_mfu:.1%}" if model_mfu is not None else "MFU unknown for this device"
        if off is not None:
            note += f", {tokens_per_sec / reference:.2f}x the full speed"
        results.append(
            Result(
                f"GPU tokens/s, {label}",
                tokens_per_sec / 1e6,
                "M tok/s",
                note=note,
                details={"mfu": model_mfu, "feature_off": off},
            )
        )
    return results


def gpu_throughput(sizes: Sizes, device: torch.device, off: str | None) -> tuple[float, float | None]:
    """(tokens/s, MFU) of the bare loop with one speed feature switched off (None: all on)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch._dynamo.reset()  # each variant compiles afresh: no graph carries over another's choices
    bf16 = off != "bf16_autocast"
    compiled = off != "compile"
    model = build_model(sizes, device, bf16=bf16)
    optimizer = MuonAdam(parameter_groups(model), compile_newtonschulz=compiled)
    if off == "fused_adam":
        # Adam reads these per step, and its state is made at the first step: set before any.
        for opt in optimizer.optimizers.values():
            if isinstance(opt, torch.optim.Adam):
                for group in opt.param_groups:
                    group["fused"], group["foreach"] = False, True
    forward = torch.compile(model, dynamic=False, fullgraph=True) if compiled else model
    schedule = WSD(max_steps=sizes.skip + sizes.steps, max_wallclock_ms=None)
    data = StdlibCorpus(seq_len=sizes.seq_len)
    data.prepare()
    loader = data.train_loader(0, 1, device)
    # Every SDPA backend but flash: torch picks the best of the rest, as it would without flash.
    not_flash = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    attention = sdpa_kernel(not_flash) if off == "flash_sdpa" else contextlib.nullcontext()
    model.train()
    with attention:
        for step in range(sizes.skip + sizes.steps):
            if step == sizes.skip:  # the first steps compile and warm up: not timed
                torch.cuda.synchronize(device)
                start = time.perf_counter()
            bare_step(forward, optimizer, schedule, loader, step, sizes.batch_tokens, autocast=bf16)
        torch.cuda.synchronize(device)
    tokens_per_sec = sizes.steps * sizes.batch_tokens / (time.perf_counter() - start)
    name = torch.cuda.get_device_name(device)
    return tokens_per_sec, mfu(tokens_per_sec, flops_per_token(model, sizes.seq_len), 1, name)


# --------------------------------------------------------------------------- report


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or 0.01 <= abs(value) < 100000:
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return f"{value:.3g}"


def format_table(results: list[Result]) -> str:
    rows = [("metric", "value", "target", "status", "note")]
    for r in results:
        value = f"{format_value(r.value)} {r.unit}".strip()
        target = f"{r.target[0]} {format_value(r.target[1])} {r.unit}".strip() if r.target else "-"
        rows.append((r.metric, value, target, r.status, r.note))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)


def steady_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap for reuse (mmap threshold 32 MiB, no trimming); True if set.

    By default glibc returns blocks above a moving threshold to the OS when they are freed, so a
    CPU step faults its activations back in page by page (thousands of faults a step), and how
    many depends on the heap's history: two loops interleaved in one process would differ by 10 %
    or more for that reason alone. Set once, before any measurement, it holds for both loops.
    """
    if sys.platform != "linux":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def machine(device: torch.device, heap_reuse: bool) -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "glibc_heap_reuse": heap_reuse,
    }


def exit_code(results: list[Result], check: bool) -> int:
    """0 for a report; with --check, 1 when any measured figure misses its target or failed."""
    return int(check and any(r.status == "fail" for r in results))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument(
        "--out", type=Path, default=Path("bench.json"), help="JSON report (default bench.json)"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny sizes: checks the plumbing, numbers mean nothing"
    )
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU intra-op threads (default 1: on a shared CPU, a pool of threads turns every stall into noise)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    heap_reuse = steady_cpu_allocator()
    sizes = TINY_SIZES if args.tiny else CUDA_SIZES if device.type == "cuda" else CPU_SIZES
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="speedrun-bench-") as tmp:
        workdir = Path(tmp)
        for section in SECTIONS:
            if section not in args.only:
                continue
            if section == "trainer":
                results += bench_trainer(sizes, device, workdir)
            elif section == "data":
                results += (
                    bench_data(sizes)
                    + bench_prepare(sizes, workdir)
                    + bench_prepare_long_document(sizes, workdir)
                )
            elif section == "eval":
                results += bench_eval(sizes, device)
            elif section == "sample":
                results += bench_sample(sizes, device)
            elif section == "cli":
                results += bench_cli(sizes, workdir, args.threads if device.type == "cpu" else None)
            elif section == "gpu":
                results += bench_gpu(sizes, device)
            else:
                results += bench_export(sizes, device, workdir)
    wall_s = time.perf_counter() - wall_start
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(device, heap_reuse),
        "wall_s": wall_s,
        "results": [{**asdict(r), "status": r.status} for r in results],
    }
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(format_table(results))
    print(f"\nbench: {wall_s:.0f} s on {report['machine']['device']}; JSON in {args.out}")
    return exit_code(results, args.check)


if __name__ == "__main__":
    sys.exit(main())
