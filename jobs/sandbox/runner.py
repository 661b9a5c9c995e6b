"""Running one untrusted program in its sandbox and collecting how it ended (an `ExecResult`)."""

from __future__ import annotations

import contextlib
import functools
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jobs.sandbox.confinement import (
    PROGRAM_NAME,
    SYSTEM_PYTHON,
    WORKDIR,
    Sandbox,
    UnconfinedCode,
    box_command,
    bwrap_user,
    child_env,
    program_command,
    resource_limits,
)

Status = Literal["passed", "failed", "timeout", "killed"]

MAX_OUTPUT_HEAD = 2048  # bytes of output kept from the start ...
MAX_OUTPUT_TAIL = 6144  # ... and from the end (the traceback)
POLL_INTERVAL_S = 0.1  # how often the evaluator looks whether a silent child has ended
PROBE_TIMEOUT_S = 20.0  # a probe (see current_sandbox) that takes longer counts as failed
PROBE_CODE = "import os\nassert sorted(p for p in os.listdir('/proc') if p.isdigit()) == ['1', '2']\n"  # only the box
KILL_WAIT_S = 10.0  # after the kill, how long the evaluator waits for the box's last process to be gone
SIGNAL_REASONS = {
    "SIGXCPU": "CPU time limit reached",
    "SIGXFSZ": "file size limit reached",
    "SIGKILL": "killed",
    "SIGSEGV": "crashed (possibly out of memory)",
}


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program: `passed` is True only for status "passed" (exit code 0).

    status: passed (ran to the end, exit 0), failed (non-zero exit, e.g. an AssertionError),
    timeout (wall-clock limit; the box was killed), killed (ended by a signal or a resource limit:
    CPU seconds, memory, file size). `confined`: whether it ran in the box (False only where the
    caller allowed unconfined code on a machine without one).
    """

    passed: bool
    status: Status
    detail: str
    confined: bool = True


def run_program(
    code: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    *,
    unconfined: bool = False,
) -> ExecResult:
    """Run untrusted Python `code` in the box (see `jobs.sandbox`) and report how it ended.

    RLIMIT_AS = memory_mb, RLIMIT_CPU ~ timeout_s, RLIMIT_FSIZE, no core dumps, a minimal environment, stdin from
    /dev/null; after `timeout_s` seconds of wall time the box is SIGKILLed whole (status "timeout"). Exit code 0 ->
    "passed". Where this machine has no box: UnconfinedCode, unless `unconfined` (the caller's
    `evaluation.unconfined_code`) lets the program run with the limits alone (`ExecResult.confined` False). Never
    raises for bad code; an evaluator-side failure to start the child is "failed" with a `sandbox error` detail.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not timeout_s > 0 or not memory_mb > 0:
        raise ValueError(f"timeout_s and memory_mb must be positive (got {timeout_s}, {memory_mb})")
    return run_in(require_confinement(unconfined), code, timeout_s, memory_mb)


def run_in(sandbox: Sandbox, code: str, timeout_s: float, memory_mb: int) -> ExecResult:
    """run_program in an explicit sandbox."""
    source = code.encode("utf-8", "surrogatepass")
    user = sandbox.user if sandbox.boxed else None  # bwrap's user (a root evaluator's: nobody)
    try:
        with _program_place(sandbox, source) as (argv, cwd, fds):
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=child_env(WORKDIR if sandbox.boxed else cwd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=fds,
                start_new_session=True,
                preexec_fn=resource_limits(timeout_s, memory_mb, sandbox.boxed),
                user=user and user[0],
                group=user and user[1],
                extra_groups=user and [],
            )
            assert proc.stdout is not None
            output, pipe, deadline = Output(), proc.stdout.fileno(), time.monotonic() + timeout_s
            try:
                _read(pipe, output, deadline, ended=lambda: proc.poll() is not None)
                timed_out = not _ended_by(proc, deadline)
            finally:
                _kill_group(proc.pid)  # bwrap and the box's init (whose death kills the rest), or an unconfined group
                proc.wait()
                _read(pipe, output, time.monotonic() + KILL_WAIT_S)  # until every process of the box is gone
                proc.stdout.close()
        return outcome(proc.returncode, timed_out, output.text().strip(), timeout_s, memory_mb, sandbox.boxed)
    except (OSError, subprocess.SubprocessError) as exc:
        return ExecResult(False, "failed", f"sandbox error: could not run the program ({exc})", sandbox.boxed)


@contextlib.contextmanager
def _program_place(sandbox: Sandbox, source: bytes) -> Iterator[tuple[list[str], str, tuple[int, ...]]]:
    """(argv, cwd, fds to pass) of a program: in the box, the source in a memory file bwrap copies in; unconfined, a
    throw-away folder holding program.py (removed afterwards)."""
    if sandbox.boxed:
        program = os.memfd_create(PROGRAM_NAME)
        try:
            os.write(program, source)
            os.lseek(program, 0, os.SEEK_SET)
            yield box_command(sandbox.python, program), "/", (program,)
        finally:
            os.close(program)
        return
    workdir = tempfile.mkdtemp(prefix="loraland-unconfined-")
    try:
        Path(workdir, PROGRAM_NAME).write_bytes(source)
        yield program_command(sandbox.python), workdir, ()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the child's process group."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- what this machine allows, probed once

_sandbox_lock = threading.Lock()


def require_confinement(allow_unconfined: bool) -> Sandbox:
    """The sandbox programs will run in; UnconfinedCode (one line) where the kernel cannot confine them and
    `allow_unconfined` (`evaluation.unconfined_code`) is false."""
    sandbox = current_sandbox()
    if not sandbox.boxed and not allow_unconfined:
        raise UnconfinedCode(sandbox.refusal())
    return sandbox


def check_code_task(metric: str, allow_unconfined: bool) -> None:
    """`require_confinement` for a task scored by `metric` when it is a code task: jobs call it before training."""
    from core.prompts import CODE_METRIC  # here: jobs.sandbox itself imports with the standard library alone

    if metric == CODE_METRIC:
        require_confinement(allow_unconfined)


def current_sandbox() -> Sandbox:
    """The sandbox this machine gives programs, found once per process: a box with the evaluator's interpreter, or
    with SYSTEM_PYTHON where bwrap's user cannot read the evaluator's (e.g. under /root), or unconfined."""
    with _sandbox_lock:
        return _probe()


@functools.cache
def _probe() -> Sandbox:
    if shutil.which("bwrap") is None:
        return Sandbox(False, sys.executable, reason="bwrap is not installed")
    reason = "no interpreter to run in the box"
    for python in dict.fromkeys((str(Path(sys.executable).resolve()), SYSTEM_PYTHON)):
        if os.path.isfile(python):
            candidate = Sandbox(True, python, bwrap_user())
            tried = run_in(candidate, PROBE_CODE, PROBE_TIMEOUT_S, 1024)
            if tried.passed:
                return candidate
            reason = f"bwrap failed: {tried.detail.splitlines()[-1]}"
    return Sandbox(False, sys.executable, reason=reason)


# --------------------------------------------------------------------------- output and outcome


class Output:
    """Keeps the first MAX_OUTPUT_HEAD and last MAX_OUTPUT_TAIL bytes of a stream."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        """Take the next chunk of the stream."""
        self.total += len(chunk)
        room = MAX_OUTPUT_HEAD - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > MAX_OUTPUT_TAIL:
                del self.tail[: len(self.tail) - MAX_OUTPUT_TAIL]

    def text(self) -> str:
        """What was kept, decoded, with a note of how many bytes were dropped between head and tail."""
        dropped = self.total - len(self.head) - len(self.tail)
        middle = f"\n[... {dropped} bytes of output dropped ...]\n" if dropped > 0 else ""
        return bytes(self.head).decode("utf-8", "replace") + middle + bytes(self.tail).decode("utf-8", "replace")


def _read(fd: int, output: Output, deadline: float, ended: Callable[[], bool] = lambda: False) -> bool:
    """Read the child's output from `fd` until EOF (True: every process holding the pipe has ended), or until the
    deadline or `ended()` (False)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while (now := time.monotonic()) < deadline:
        if poller.poll(min(deadline - now, POLL_INTERVAL_S) * 1000):
            chunk = os.read(fd, 65536)
            if not chunk:
                return True
            output.add(chunk)
        elif ended():
            return False
    return False


def _ended_by(proc: subprocess.Popen[bytes], deadline: float) -> bool:
    """Whether the child exits by the deadline."""
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    return True


def outcome(returncode: int, timed_out: bool, text: str, timeout_s: float, memory_mb: int,
            boxed: bool = True) -> ExecResult:
    """The ExecResult of a finished child. bwrap reports a program ended by signal N as exit code 128 + N."""
    if timed_out:
        return ExecResult(False, "timeout", _join(f"timed out after {timeout_s:g} s; box killed", text), boxed)
    if returncode == 0:
        return ExecResult(True, "passed", text, boxed)
    signum = -returncode if returncode < 0 else returncode - 128 if boxed and returncode > 128 else 0
    if signum:
        name = _signal_name(signum)
        return ExecResult(False, "killed", _join(f"{SIGNAL_REASONS.get(name, 'ended by a signal')} ({name})", text),
                          boxed)
    last_line = text.splitlines()[-1] if text else ""
    if last_line.startswith("MemoryError"):
        return ExecResult(False, "killed", _join(f"memory limit of {memory_mb} MB reached (MemoryError)", text),
                          boxed)
    return ExecResult(False, "failed", _join(f"exit code {returncode}", text), boxed)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _join(head: str, text: str) -> str:
    return f"{head}\n{text}" if text else head
