"""Running one untrusted program under the confinement and collecting how it ended (an `ExecResult`)."""

from __future__ import annotations

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from jobs.sandbox.confinement import (
    DISK_LIMIT,
    FILE_COUNT_LIMIT,
    PROGRAM_NAME,
    Confinement,
    child_env,
    command,
    probe_confinement,
    resource_limits,
)

Status = Literal["passed", "failed", "timeout", "killed"]

MAX_OUTPUT_HEAD = 2048  # bytes of output kept from the start ...
MAX_OUTPUT_TAIL = 6144  # ... and from the end (the traceback)
DISK_CHECK_INTERVAL_S = 0.1  # how often the evaluator checks the disk limits where no private tmpfs enforces them
PROBE_TIMEOUT_S = 20.0  # a probe program (see current_confinement) that takes longer counts as failed
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
    timeout (wall-clock limit; the process group was killed), killed (ended by a signal or a
    resource limit: CPU seconds, memory, file size, total disk use).
    """

    passed: bool
    status: Status
    detail: str


def run_program(
    code: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    *,
    isolate_network: bool = True,
) -> ExecResult:
    """Run untrusted Python `code` in a fenced subprocess and report how it ended.

    The code runs under `sys.executable -I` in a fresh temporary directory (deleted afterwards),
    in a new session, with RLIMIT_AS = memory_mb, RLIMIT_CPU ~ timeout_s, small RLIMIT_FSIZE,
    no core dumps, a minimal environment and the guard prelude; a root evaluator runs it as
    `nobody` in a private mount namespace where the machine allows (see `jobs.sandbox`).
    With `isolate_network` (default) it also gets a private network namespace when `unshare`
    allows one here; the prelude blocks networking either way. After `timeout_s` seconds of wall
    time the whole process group is SIGKILLed (status "timeout"). Exit code 0 -> "passed".
    Never raises for bad code; an evaluator-side failure to start the child is "failed" with a
    `sandbox error` detail.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not timeout_s > 0 or not memory_mb > 0:
        raise ValueError(f"timeout_s and memory_mb must be positive (got {timeout_s}, {memory_mb})")
    return run_under(current_confinement(), code, timeout_s, memory_mb, network=isolate_network)


# --------------------------------------------------------------------------- the confinement, probed once

_confinement_lock = threading.Lock()


def current_confinement() -> Confinement:
    """The confinement this machine allows (`confinement.probe_confinement`), probed once per process."""
    with _confinement_lock:
        return _probed_confinement()


@functools.cache
def _probed_confinement() -> Confinement:
    return probe_confinement(passes_under)


def passes_under(confinement: Confinement, code: str) -> bool:
    """Whether `code` passes when run under `confinement` (without a network namespace)."""
    try:
        return run_under(confinement, code, PROBE_TIMEOUT_S, 1024, network=False).passed
    except (OSError, subprocess.SubprocessError):
        return False


# --------------------------------------------------------------------------- one run


def run_under(confinement: Confinement, code: str, timeout_s: float, memory_mb: int, *, network: bool) -> ExecResult:
    """run_program under an explicit confinement (the probes try candidates through here)."""
    workdir = None
    try:
        workdir = _make_workdir(code, confinement)
        started = time.monotonic()
        proc = subprocess.Popen(
            command(workdir, confinement, network),
            cwd=workdir,
            env=child_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,
            preexec_fn=resource_limits(timeout_s, memory_mb),
        )
        over_limit = None if confinement.private_mounts else functools.partial(disk_overuse, workdir)
        output = Output()
        try:
            ending = _collect(proc, started + timeout_s, output, over_limit)
        finally:
            _kill_group(proc.pid)  # stragglers, or everything on timeout or a breach
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if ending is None and over_limit is not None:
            ending = over_limit()  # what a fast writer left behind within its last interval
        return outcome(proc.returncode, ending, output.text().strip(), timeout_s, memory_mb)
    except (OSError, subprocess.SubprocessError) as exc:
        return ExecResult(False, "failed", f"sandbox error: could not run the program ({exc})")
    finally:
        if workdir is not None:
            _remove_tree(workdir)


def _make_workdir(code: str, confinement: Confinement) -> str:
    """A fresh directory holding program.py, owned by the program's user when it is not given a
    tmpfs of its own (the launcher builds that one owned by the user)."""
    workdir = tempfile.mkdtemp(prefix="loraland-sandbox-")
    program = os.path.join(workdir, PROGRAM_NAME)
    with open(program, "wb") as handle:
        handle.write(code.encode("utf-8", "surrogatepass"))
    if confinement.user is not None and not confinement.private_mounts:
        for path in (workdir, program):
            os.chown(path, *confinement.user)
    return workdir


def disk_overuse(workdir: str) -> str | None:
    """Why the working directory breaks FILE_COUNT_LIMIT / DISK_LIMIT, or None (the check used
    where no private tmpfs enforces them). A directory it may not read counts as a breach."""
    hidden = "disk limit: the program hid part of its working directory from the check"
    entries, size, pending = 0, 0, [workdir]
    while pending:
        try:
            listing = os.scandir(pending.pop())
        except FileNotFoundError:
            continue
        except OSError:
            return hidden
        with listing:
            for entry in listing:
                entries += 1
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError:
                    return hidden
                size += max(info.st_size, info.st_blocks * 512)
                if entries > FILE_COUNT_LIMIT or size > DISK_LIMIT:
                    return f"disk limit reached (more than {FILE_COUNT_LIMIT} files or {DISK_LIMIT // 2**20} MB)"
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return None


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the program's process group."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_tree(path: str) -> None:
    """Delete the working directory even if the program made parts of it read-only."""

    def retry(func: Callable[..., Any], target: str, _exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(target), 0o700)
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, 0o700)
            func(target)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


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


def _collect(
    proc: subprocess.Popen[bytes], deadline: float, output: Output, over_limit: Callable[[], str | None] | None
) -> str | None:
    """Read the child's output until EOF or the child's exit (None), the deadline ("timeout"), or
    until `over_limit`, checked every DISK_CHECK_INTERVAL_S, names a breach (its message)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    next_check = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= deadline:
            return "timeout"
        if over_limit is not None and now >= next_check:
            breach = over_limit()
            if breach is not None:
                return breach
            next_check = now + DISK_CHECK_INTERVAL_S
        events = poller.poll(min(deadline - now, DISK_CHECK_INTERVAL_S) * 1000)
        if events:
            chunk = os.read(fd, 65536)
            if not chunk:  # EOF: everyone closed the pipe
                break
            output.add(chunk)
        elif proc.poll() is not None:
            break  # the program ended; a straggler may hold the pipe, it is killed below
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return "timeout"
    return None


def outcome(returncode: int, ending: str | None, text: str, timeout_s: float, memory_mb: int) -> ExecResult:
    """The ExecResult of a finished child: `ending` is None, "timeout", or a disk-limit breach."""
    if ending == "timeout":
        return ExecResult(False, "timeout", _join(f"timed out after {timeout_s:g} s; process group killed", text))
    if ending is not None:
        return ExecResult(False, "killed", _join(f"{ending}; process group killed", text))
    if returncode == 0:
        return ExecResult(True, "passed", text)
    if returncode < 0:
        name = _signal_name(-returncode)
        reason = SIGNAL_REASONS.get(name, "ended by a signal")
        return ExecResult(False, "killed", _join(f"{reason} ({name})", text))
    last_line = text.splitlines()[-1] if text else ""
    if last_line.startswith("MemoryError"):
        return ExecResult(False, "killed", _join(f"memory limit of {memory_mb} MB reached (MemoryError)", text))
    return ExecResult(False, "failed", _join(f"exit code {returncode}", text))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _join(head: str, text: str) -> str:
    return f"{head}\n{text}" if text else head
