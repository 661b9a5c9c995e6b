"""Ending a command that owns child processes (`loraland ui`, `loraland serve`, the demo) the same way however it is
ended.

Ctrl-C raises KeyboardInterrupt, but `kill PID`, `timeout`, a process supervisor (SIGTERM) and a closed terminal
(SIGHUP) end a Python process at once by default: no `finally` block, no atexit handler, so an `mlflow server` started
in its own session, or a local Ray cluster, outlives the command and keeps its ports.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

TERMINATING = (signal.SIGTERM, signal.SIGHUP)


class Terminated(SystemExit):
    """The command was asked to end by a signal; its exit status is 128 + the signal number, as a shell reports it."""


@contextlib.contextmanager
def exit_on_signals(signals: tuple[signal.Signals, ...] = TERMINATING) -> Iterator[None]:
    """While the block runs, each of `signals` raises `Terminated` in the main thread, so the block's `finally` clauses
    and the atexit handlers (Ray's shutdown) stop what the command started; further signals are ignored while that
    cleanup runs. The previous handlers come back when the block ends. Call it from the main thread."""

    def terminate(signum: int, frame: FrameType | None) -> None:
        for other in signals:
            signal.signal(other, signal.SIG_IGN)
        raise Terminated(128 + signum)

    previous = {signum: signal.signal(signum, terminate) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def handlers_kept(signals: tuple[signal.Signals, ...] = TERMINATING) -> Iterator[None]:
    """The handlers of `signals` that Python code set before the block (`exit_on_signals`) put back after it, at the
    process level. `ray.init` sets Ray's own for SIGTERM: a Python one that exits with status 15, and a C++ one that
    logs a stack and aborts, which left the local Ray's agents running after a `kill PID`. A handler that was the
    default stays Ray's. Outside the main thread, nothing changes."""
    main = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in signals} if main else {}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if callable(handler):
                signal.signal(signum, handler)
