"""Every signal handler speedrun installs, in one place.

SIGTERM (SLURM pre-emption, torchrun stopping its ranks, `kill`) and SIGINT (Ctrl-C) mean "stop":
- outside the training loop (start-up, the final evaluation, export) they raise KeyboardInterrupt
  (`stop_as_interrupt`), so the job still ends with `status: interrupted`;
- inside the loop they set a flag (`StopRequest`): every rank finishes its step, rank 0 checkpoints,
  and the run stops; a second Ctrl-C raises at once;
- while a failing rank reports how it ended they are held (`signals_held`) and delivered after.
"""

from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop_as_interrupt() -> None:
    """SIGTERM behaves as Ctrl-C (KeyboardInterrupt) in this process from now on."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


class StopRequest:
    """SIGTERM / SIGINT set a flag that the loop polls; a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __call__(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        """Handle the stop signals with this request while the body runs (main thread only: Python
        delivers signals there, and a trainer driven from another thread keeps the caller's handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def signals_held():
    """Hold SIGTERM / SIGINT while the body runs, then deliver what arrived to the usual handler.

    A failing rank's report (which rank failed first, its traceback, summary.json) must not be cut
    short: the moment one rank dies, torchrun sends SIGTERM to the others, which otherwise becomes a
    KeyboardInterrupt in the middle of the report. A signal that arrived still takes effect after it.
    """
    held = StopRequest()
    with held.installed():
        yield
    if held.signal_name is not None:
        signal.raise_signal(signal.Signals[held.signal_name])


def stop_also_on(warning: signal.Signals) -> None:
    """`warning` (a scheduler's early warning, e.g. SLURM's USR2 before a time limit) means what SIGTERM
    means at that moment: an interrupt outside the training loop, finish-the-step-and-checkpoint inside.
    SIGCONT (SLURM sends it before SIGTERM, to wake a suspended job) keeps its default."""
    stop_as_interrupt()
    signal.signal(warning, _as_sigterm)
    signal.signal(signal.SIGCONT, signal.SIG_DFL)


def _as_sigterm(signum, frame) -> None:
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signal.SIGTERM)


def ignore_interrupts() -> None:
    """In a worker process: Ctrl-C reaches the whole process group, and it is the parent's to handle
    (it stops its workers itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def sigterm_raises(exception: type[BaseException]):
    """SIGTERM raises `exception` where the program is while the body runs, so that a command-line tool
    cleans up exactly as after Ctrl-C."""

    def handler(signum, frame) -> None:
        raise exception()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_as_signalled() -> None:
    """Leave the process as if SIGTERM had killed it (exit status 128 + 15).

    A rank of the elastic launcher that returns normally waits for the launcher to collect every
    rank's result, which a launcher shutting down on a signal never does: it would SIGKILL the rank
    30 s later. Stopped by a signal, such a rank leaves at once instead.
    """
    raise SystemExit(128 + signal.SIGTERM)
