"""Weights & Biases: one wandb run per training run, offline by default, plotted against tokens.

Curves use `tokens` as their x-axis because steps are not comparable across sequence lengths or batch
sizes. A wandb failure (not installed, not logged in, bad mode) costs one warning and nothing else:
training goes on and the local files (metrics.jsonl, summary.json) still hold everything.

wandb's background service (wandb-core) exits at once on SIGTERM or SIGINT (wandb/wandb#9963), and
SLURM signals every process of a job (`scancel`, pre-emption, requeue). An offline run whose service
died that way is written again from the rows this sink logged, so it still ends complete.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from speedrun.sinks.base import Sink

log = logging.getLogger(__name__)

# Record keys that wandb shows under another name, so that all training curves sit in the train/ section.
RENAMED_KEYS = {"lr_scale": "train/lr_scale", "step_ms": "train/step_ms"}

# summary.json fields that wandb shows under another name (next to the curves they conclude).
RENAMED_SUMMARY_KEYS = {
    "val_bpb": "val/bpb_final",
    "val_loss": "val/loss_final",
    "quant_val_bpb": "quant/val_bpb",
    "quant_val_loss": "quant/val_loss",
}


def wandb_history_row(record: dict) -> dict:
    """A metrics record as wandb logs it: None dropped, names mapped, train time in seconds alongside."""
    row = {RENAMED_KEYS.get(key, key): value for key, value in record.items() if value is not None}
    if "train_time_ms" in row:
        row["train_time_s"] = row["train_time_ms"] / 1000
    return row


def wandb_summary(summary: dict) -> dict:
    """The summary.json fields wandb can show as run summary values: numbers and strings, None dropped."""
    return {
        RENAMED_SUMMARY_KEYS.get(key, key): value
        for key, value in summary.items()
        if isinstance(value, (int, float, str))
    }


class WandbSink(Sink):
    """Logs to a wandb run created in `run_dir/wandb/`. `mode` is wandb's: offline, online or disabled.

    `run_info` names the run: group = the sweep folder (None for a single run), job_type = the sweep
    preset, name = the job. Each sink is its own run, also when a sweep runs several jobs one after
    another in one process. If the run cannot be created, the sink warns once and does nothing
    (`active` is then False); `mode=disabled` creates none.
    """

    def __init__(
        self,
        *,
        run_dir: Path,
        config: dict,
        run_info: dict,
        project: str = "speedrun",
        entity: str | None = None,
        mode: str = "offline",
        tags: Sequence[str] = (),
        notes: str | None = None,
    ) -> None:
        self.run: Any = None
        # Every history row logged, so that the run can be written again if wandb's service dies.
        self._rows: list[dict] = []
        self._service_lost = False
        self._sample_rows: list[list] = []  # every sample logged so far (see _samples_table)
        if mode == "disabled":
            return
        # A resumed run continues the wandb run its folder already holds (same id; wandb files it as a
        # new segment of that run, and `wandb sync` joins them), so the dashboard shows one run.
        earlier = sorted((Path(run_dir) / "wandb").glob("*run-*-*"), key=lambda p: p.name.split("-", 2)[-1])
        run_id = earlier[-1].name.rsplit("-", 1)[-1] if earlier else None
        self._init_arguments = dict(
            dir=run_dir, mode=mode, project=project, entity=entity, group=run_info.get("sweep_dir_name"),
            job_type=run_info.get("sweep_preset"), name=run_info.get("job_name"), tags=list(tags), notes=notes,
            config=config, id=run_id, resume="allow" if run_id else None,
        )  # fmt: skip
        # wandb logs its own traceback when init fails; the one warning below says the same in a line.
        wandb_logger = logging.getLogger("wandb")
        previous_level = wandb_logger.level
        wandb_logger.setLevel(logging.CRITICAL)
        try:
            self.run = self._start_run()
        except Exception as error:  # noqa: BLE001 - wandb must never stop training
            log.warning(
                "wandb is off for this run, metrics.jsonl and summary.json are still written: "
                "wandb.init(mode=%r, project=%r) raised %s: %s; fix logger.mode or run `wandb login`, "
                "or set logger=none",
                mode,
                project,
                type(error).__name__,
                " ".join(str(error).split()).rstrip("."),  # one line, even for multi-line errors
            )
            return
        finally:
            wandb_logger.setLevel(previous_level)

    def _start_run(self, **arguments: Any) -> Any:
        import wandb

        run = wandb.init(
            **(arguments or self._init_arguments),
            # Without this a second init in the same process returns the first, still-open run.
            reinit="create_new",
            settings=wandb.Settings(
                console="off",  # train.log already holds the output; no stdout/stderr capture
                silent=True,
                disable_git=True,
                save_code=False,
            ),
        )
        run.define_metric("tokens")
        run.define_metric("train_time_s")
        for section in ("train/*", "val/*", "quant/*"):
            run.define_metric(section, step_metric="tokens")
        run.define_metric("val/bpb", step_metric="tokens", summary="min")
        return run

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, record: dict) -> None:
        if self.run is None:
            return
        row = wandb_history_row(record)
        if "samples" in row:
            row["samples"] = self._samples_table(record["step"], row["samples"])
        self._rows.append(row)
        if self._service_lost:
            return
        try:
            self.run.log(row)
        except Exception:  # noqa: BLE001 - the service is gone (a signal); finish() writes the run again
            self._service_lost = True

    def _samples_table(self, step: int, samples: list[dict]):
        """The trainer's samples as a wandb Table holding every sample so far, newest last: wandb shows
        the latest logged table, so the history of the text stays in one view."""
        import wandb

        self._sample_rows += [[step, s["prompt"], s["temperature"], s["text"]] for s in samples]
        return wandb.Table(columns=["step", "prompt", "temperature", "text"], data=self._sample_rows)

    def finish(self, summary: dict) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        exit_code = 0 if summary.get("status") == "completed" else 1
        if not self._service_lost:
            try:
                self._close(run, summary, exit_code)
                return
            except Exception:  # noqa: BLE001 - the service died after the last row
                self._service_lost = True
        try:
            self._rewrite(run, summary, exit_code)
        except Exception as error:  # noqa: BLE001 - wandb must never cost the run its summary.json
            log.warning("wandb's offline run could not be written again (%s: %s); metrics.jsonl and "
                        "summary.json are complete", type(error).__name__, error)  # fmt: skip

    def _close(self, run: Any, summary: dict, exit_code: int) -> None:
        run.summary.update(wandb_summary(summary))
        run_file = run.settings.sync_file
        run.finish(exit_code=exit_code)
        if run.offline:
            # So that the offline run is complete on disk when finish() returns, not only at process exit
            # (a sweep runs its jobs one after another in one process; tests read the file back).
            from speedrun.sinks.wandb_reader import wait_until_complete

            wait_until_complete(run_file)

    def _rewrite(self, lost_run: Any, summary: dict, exit_code: int) -> None:
        """Write an offline run again, under the same id, from the rows logged, after a signal stopped
        wandb's service mid-run: the service's file then lacks its end, or all it had not flushed yet.
        An online run keeps what reached the server, and this costs one warning."""
        import wandb

        if not lost_run.offline:
            log.warning("wandb's service was stopped by a signal: the online run misses its end; "
                        "metrics.jsonl and summary.json are complete")  # fmt: skip
            return
        try:
            wandb.teardown()  # forget the dead service, so that the next init starts a new one
        except Exception:  # noqa: BLE001 - it reports the lost connection once more
            pass
        shutil.rmtree(lost_run.settings.sync_dir, ignore_errors=True)
        run = self._start_run(**{**self._init_arguments, "id": lost_run.id, "resume": "allow"})
        for row in self._rows:
            run.log(row)
        self._close(run, summary, exit_code)
        log.info("wandb's service was stopped by a signal: its offline run was written again (%d rows)",
                 len(self._rows))  # fmt: skip
