"""The error hierarchy (the CLI maps each class to its exit code in one place), and SIGTERM taken like
Ctrl-C."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class GantkError(Exception):
    """A failure gantk explains in one line. Exit code 1 unless a subclass says otherwise."""

    exit_code = 1


class UsageError(GantkError):
    """Bad input: a flag, a path, a file that is not what it should be (exit 2)."""

    exit_code = 2


class DataError(UsageError):
    """A data source is missing, unreadable or malformed (exit 2)."""


class CheckpointError(UsageError):
    """A checkpoint or export is missing, truncated or not gantk's (exit 2)."""


class DamagedFileError(CheckpointError):
    """A checkpoint or export changed on disk after it was saved: cut short, or a CRC-32 that no longer
    matches (exit 2)."""


class DivergedError(GantkError):
    """Training produced a non-finite loss (exit 3)."""

    exit_code = 3


class VerificationError(GantkError):
    """An export or generation failed its parity check (exit 4)."""

    exit_code = 4


class Interrupted(GantkError):
    """Stopped by a signal after saving cleanly (exit 128 + signal number)."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.exit_code = 128 + signum


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken like Ctrl-C; `signum` gives the exit code (128 + 15)."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated


def sigterm_as_interrupt():
    """SIGTERM (a scheduler's or torchrun's stop) raised in the main thread as `Terminated`, so that what a
    command was writing is cleaned up or recorded as after Ctrl-C."""
    return handling(_raise_terminated, signal.SIGTERM)


def default_sigterm():
    """SIGTERM at its default (the process ends) inside, where the main thread blocks in native code."""
    return handling(signal.SIG_DFL, signal.SIGTERM)


def signals_wait():
    """Inside, a further Ctrl-C or SIGTERM is noted, not raised: the short clean-up after a stop (recording
    what was written) runs to its end, rather than leaving a record behind the disk. One more stops it."""
    import logging

    noted = []

    def note(signum, frame):
        if noted:  # a third: the clean-up itself hangs (a stuck disk), so stop it
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        noted.append(signum)
        logging.getLogger("gantk").warning("signal %d: already stopping, recording what was written first "
                                           "(again to stop at once)", signum)

    return handling(note, signal.SIGINT, signal.SIGTERM)


def ignore_stops(*_) -> None:
    """Ctrl-C and SIGTERM ignored from here on (also a data-loader's `worker_init_fn`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def handling(handler, *signums: int) -> Iterator[None]:
    """`handler` for `signums` inside, the previous ones after; only the main thread may set handlers. A
    signal ignored when this is entered stays ignored: a job started in the background or under nohup
    (SIGINT ignored by the shell) is not stopped by a Ctrl-C meant for the foreground."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signums if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def interrupt_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM behind an error that a library raised while it was being interrupted."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
