"""Console, JSONL and fan-out sinks: exact line formats, crash-safe files, a broken sink never stops training."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys

import pytest

from speedrun.sinks import ConsoleSink, JsonlSink, MultiSink, Sink, build_sinks
from speedrun.sinks.console import format_duration, format_rate
from speedrun.sinks.wandb_sink import wandb_history_row, wandb_summary

TRAIN = {
    "step": 120,
    "tokens": 120 * 8192,
    "train_time_ms": 4944.0,
    "train/loss": 3.21404,
    "train/tok_per_sec": 1.234e6,
    "train/mfu": None,
    "lr_scale": 1.0,
    "step_ms": 41.2,
}
VAL = {"step": 120, "tokens": 120 * 8192, "train_time_ms": 4944.0, "val/loss": 3.1, "val/bpb": 1.8}


class Recorder(Sink):
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.summaries: list[dict] = []

    def log(self, record: dict) -> None:
        self.records.append(record)

    def finish(self, summary: dict) -> None:
        self.summaries.append(summary)


class Broken(Sink):
    def log(self, record: dict) -> None:
        raise OSError("disk full")


class TerminalStream(io.StringIO):
    """An in-memory stream that says it is a terminal, as sys.stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


def capture_logger(name: str, stream: io.StringIO) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.StreamHandler(stream))
    return logger


def test_broken_sink_is_disabled_with_one_warning_and_others_carry_on(caplog):
    good = Recorder()
    sinks = MultiSink([Broken(), good])
    with caplog.at_level(logging.WARNING, logger="speedrun.sinks.base"):
        for _ in range(3):
            sinks.log(TRAIN)
        sinks.finish({"status": "completed"})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Broken.log raised OSError: disk full" in warnings[0].getMessage()
    assert len(good.records) == 3 and good.summaries == [{"status": "completed"}]


def test_jsonl_lines_are_on_disk_before_finish_and_appended_on_resume(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log(TRAIN)
    sink.log(VAL)
    # Not closed yet: what a crash would leave behind.
    assert [json.loads(line) for line in path.read_text().splitlines()] == [TRAIN, VAL]
    sink.finish({"status": "completed"})
    resumed = JsonlSink(path)
    resumed.log({"step": 121, "tokens": 1, "train_time_ms": 5000.0, "train/loss": float("nan")})
    resumed.finish({"status": "diverged"})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["step"] == 121


def test_console_lines_with_eta_from_steps_or_wallclock():
    out = io.StringIO()
    logger = capture_logger("test_sinks.plain", out)
    # 1880 steps left at 41.2 ms: 77.5 s.
    ConsoleSink(2000, logger, stream=io.StringIO()).log(TRAIN)
    # The wallclock budget ends first: 72 s left.
    sink = ConsoleSink(2000, logger, max_wallclock_ms=4944.0 + 72_000, stream=io.StringIO())
    sink.log(TRAIN)
    sink.log(VAL)
    # No limits known: no total, no ETA.
    ConsoleSink(0, logger, max_wallclock_ms=0, stream=io.StringIO()).log(TRAIN)
    assert out.getvalue().splitlines() == [
        "step 120/2000 | loss 3.2140 | 41.2 ms/step | 1.23M tok/s | eta 1m17s",
        "step 120/2000 | loss 3.2140 | 41.2 ms/step | 1.23M tok/s | eta 1m12s",
        "step 120 | val_loss 3.1000 | val_bpb 1.8000",
        "step 120 | loss 3.2140 | 41.2 ms/step | 1.23M tok/s",
    ]


def test_console_on_a_terminal_shows_a_live_bar_and_keeps_train_lines_in_the_log(tmp_path):
    terminal, bar = TerminalStream(), TerminalStream()
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stdout)  # as Hydra's console handler, which writes to stdout
    console.setFormatter(logging.Formatter("%(message)s"))
    log_file = tmp_path / "train.log"
    file_handler = logging.FileHandler(log_file)
    root.addHandler(console)
    root.addHandler(file_handler)
    logger = logging.getLogger("test_sinks.tty")
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(terminal):
            console.setStream(sys.stdout)
            sink = ConsoleSink(2000, logger, max_wallclock_ms=100_000, stream=bar, tokens_per_step=8192)
            for step in range(1, 121):  # every step updates the bar, at 41.2 ms a step
                sink.progress(step, step * 41.2, 3.21404 if step == 120 else None)
            sink.log(TRAIN)
            sink.log(VAL)
            sink.finish({"status": "completed"})
        # finish() restores the console handler as it was.
        assert not console.filters and console in root.handlers
    finally:
        root.removeHandler(console)
        root.removeHandler(file_handler)
        file_handler.close()
    drawn = bar.getvalue()
    # The last redraw shows the step, the loss, the step time, tokens/s and the ETA of the nearer horizon:
    # (2000 - 120) steps x 41.2 ms = 77 s, sooner than the wallclock cap's 100 - 4.9 s.
    last = drawn.rsplit("\r", 1)[-1]
    assert "120/2000" in last and "loss 3.2140" in last and "41.2 ms/step" in last, last
    assert "198.8K tok/s" in last and "eta 1m17s" in last, last
    # The train line went to train.log only; the validation line was printed above the bar.
    assert "step 120 | val_loss 3.1000 | val_bpb 1.8000" in drawn + terminal.getvalue()
    assert "loss 3.2140 | 41.2 ms/step" not in terminal.getvalue()
    assert log_file.read_text().count("\n") == 2


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.4, "0s"), (45, "45s"), (72, "1m12s"), (3600 + 180, "1h03m"), (-5, "0s")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("rate", "text"), [(1.234e6, "1.23M"), (850_249, "850.2K"), (512.4, "512")])
def test_format_rate(rate, text):
    assert format_rate(rate) == text


def test_wandb_row_and_summary_mapping():
    row = wandb_history_row(TRAIN)
    assert "train/mfu" not in row  # None is dropped
    assert row["train/lr_scale"] == 1.0 and row["train/step_ms"] == 41.2 and "lr_scale" not in row
    assert row["train_time_s"] == pytest.approx(4.944)
    summary = wandb_summary(
        {
            "status": "failed",
            "val_bpb": 1.8,
            "quant_val_loss": 3.2,
            "mfu": None,
            "overrides": ["a=1"],
            "steps": 5,
        }
    )
    assert summary == {"status": "failed", "val/bpb_final": 1.8, "quant/val_loss": 3.2, "steps": 5}


def build(tmp_path, logger_factory=None, is_rank0: bool = True) -> MultiSink:
    return build_sinks(
        logger_factory=logger_factory,
        run_dir=tmp_path,
        config={"seed": 1},
        run_info={"sweep_dir_name": None, "sweep_preset": None, "job_name": None},
        is_rank0=is_rank0,
        total_steps=10,
        max_wallclock_ms=None,
        tokens_per_step=1024,
        log=logging.getLogger("test_sinks.build"),
    )


def test_build_sinks_console_and_jsonl_on_rank0_only(tmp_path):
    assert len(build(tmp_path / "rank1", Recorder, is_rank0=False)) == 0
    assert not (tmp_path / "rank1").exists()
    sinks = build(tmp_path)
    assert [type(sink) for sink in sinks.sinks] == [ConsoleSink, JsonlSink]
    sinks.log(TRAIN)
    sinks.finish({"status": "completed"})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == TRAIN


def test_the_logger_factory_gets_the_run_folder_config_and_run_info(tmp_path):
    made = {}

    def factory(**kwargs):
        made.update(kwargs)
        return Recorder()

    sinks = build(tmp_path, factory)
    assert [type(sink) for sink in sinks.sinks] == [ConsoleSink, JsonlSink, Recorder]
    assert made == {
        "run_dir": tmp_path,
        "config": {"seed": 1},
        "run_info": {"sweep_dir_name": None, "sweep_preset": None, "job_name": None},
    }


def strict_json(text: str) -> object:
    """json.loads that refuses NaN and Infinity, which are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_jsonl_is_strict_json_with_the_non_finite_values_named(tmp_path):
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.log({**TRAIN, "train/loss": float("nan"), "step_ms": float("inf")})
    sink.finish({"status": "diverged"})
    record = strict_json((tmp_path / "metrics.jsonl").read_text())
    assert record["train/loss"] is None and record["step_ms"] is None
    assert record["nonfinite"] == {"train/loss": "nan", "step_ms": "inf"}
