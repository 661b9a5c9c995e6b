"""The in-process guards a sandboxed program runs under (the child's prelude).

Run as a script, `python -I .../jobs/sandbox/prelude.py program.py`, in the program's working directory: it
reads the program, installs the guards, then executes the program as `__main__`. It imports only the standard
library (with `-I` neither the script's folder nor the project is on `sys.path`), and importing it changes nothing:
the guards are installed by `main()` alone. Two layers:

1. wrappers around the Python-level functions (builtins.open, io.open, os.*, shutil.*, socket.*,
   subprocess.Popen, ...) that raise PermissionError / OSError with a clear message, and pass paths on as
   plain strings;
2. an audit hook (PEP 578) under them, which cannot be removed once added, that sees the same operations
   however they are reached (C types such as _io.FileIO or _socket.socket, originals fished out of a
   wrapper's closure, ctypes). It is strict: a write to a path it cannot judge (anything but str, bytes, an
   fd or a DirEntry) is refused. It runs with empty globals, its closure holds only immutable values and C
   functions, and the introspection that could reach its cells (gc object walks) or re-point its resolver is
   refused.

Neither layer is a security boundary against code written to escape; the kernel layers are (see `jobs.sandbox`).
"""

from __future__ import annotations

import _io
import _posixsubprocess
import _socket
import builtins
import errno
import io
import os
import posix
import resource
import shutil
import socket
import stat
import subprocess
import sys
import types

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing into every child (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any, NoReturn

    Kit = tuple[Any, ...]

EXIT_BEFORE_THE_END = 3  # exit code of a program that called sys.exit() before it finished
ALWAYS_WRITABLE = frozenset({"/dev/null"})  # the only paths outside the working directory a program may write

# What the resolver needs, passed in so that it uses no global or builtin name (the hook runs it with empty globals).
KIT: Kit = (type, str, bytes, int, posix.DirEntry, posix.getcwd, posix.lstat, posix.readlink, stat.S_ISLNK, OSError)

# Audit events refused whatever their arguments.
ALWAYS_DENIED = frozenset({
    "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto", "socket.sendmsg", "socket.sethostname",
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.kill", "os.killpg",
    "subprocess.Popen", "resource.setrlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
})
# Audit events that change a path: event -> ((argument index of a path, argument index of its dir_fd or None), ...)
PATH_EVENTS = types.MappingProxyType({
    "open": ((0, None),), "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
    "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
    "os.chflags": ((0, None),), "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
    "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
    "shutil.rmtree": ((0, 1),), "shutil.copyfile": ((1, None),), "shutil.copymode": ((1, None),),
    "shutil.copystat": ((1, None),), "shutil.copytree": ((1, None),), "shutil.move": ((0, None), (1, None)),
    "shutil.chown": ((0, None),),
})
# Wrapped in layer 1: functions taking one path (with a dir_fd), one fd, or a source and a destination.
ONE_PATH = ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "lchmod", "chflags", "lchflags",
            "mkfifo", "mknod", "utime", "truncate", "setxattr", "removexattr")
ONE_FD = ("fchmod", "fchown", "ftruncate", "fsetxattr", "fremovexattr")
TWO_PATHS = ("rename", "replace", "link")
SHUTIL_COPIES = ("copy", "copy2", "copyfile", "copytree", "copymode", "copystat")
SOCKET_FUNCTIONS = ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                    "gethostbyaddr", "getnameinfo", "socketpair", "fromfd", "fromshare", "dup")
PROCESS_FUNCTIONS = ("fork", "forkpty", "vfork", "system", "popen", "execv", "execve", "execl", "execle", "execlp",
                     "execlpe", "execvp", "execvpe", "fexecve", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp",
                     "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "setsid",
                     "setpgid", "setpgrp", "_exit", "abort", "setuid", "setgid", "setreuid", "setregid", "setresuid",
                     "setresgid", "pidfd_open", "chroot")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
WRITE_MODE_CHARS = frozenset("wax+")


def real_path(path: Any, dir_fd: Any, k: Kit) -> str | None:
    """Absolute path of `path` with symlinks resolved; None for an fd that is not a file (a pipe); "" for an object
    it cannot judge. Uses no global or free names, not even builtins: everything comes in `k` (KIT), and the hook
    runs a private copy of it with empty globals."""
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
    done: list[str] = []
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


# --------------------------------------------------------------------------- layer 2: the audit hook


def make_hook(root: str, allowed: frozenset[str], k: Kit) -> Callable[[str, tuple[Any, ...]], None]:
    """The audit hook for a program whose working directory is `root` (layer 2), built in a scope of its own (it
    shares no closure cell with layer 1) and rebuilt with empty globals, so that a name the program plants in this
    module's globals changes nothing."""
    resolve = types.FunctionType(real_path.__code__, {"__builtins__": {}}, "real_path")
    inside_prefix = root.rstrip("/") + "/"
    prefix_len = len(inside_prefix)
    denied_error, net_error, import_error = PermissionError, OSError, ImportError
    eacces, eperm, enetunreach = errno.EACCES, errno.EPERM, errno.ENETUNREACH
    always_denied, path_events, write_flags = ALWAYS_DENIED, PATH_EVENTS, WRITE_FLAGS

    def hook(event: str, args: tuple[Any, ...]) -> None:
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
            if event == "object.__setattr__" and args[0] is resolve:
                raise denied_error(eperm, "sandbox: the guard cannot be changed")
            return
        if event == "open" and not args[2] & write_flags:
            return  # reading is allowed anywhere
        for path_index, dir_fd_index in spec:
            dir_fd = args[dir_fd_index] if dir_fd_index is not None else None
            resolved = resolve(args[path_index], dir_fd, k)
            if resolved is None or resolved in allowed or resolved == root or resolved[:prefix_len] == inside_prefix:
                continue
            raise denied_error(eacces, "sandbox: " + event + " outside the working directory is not allowed")

    return types.FunctionType(hook.__code__, {"__builtins__": {}}, "hook", None, hook.__closure__)


# --------------------------------------------------------------------------- layer 1: the wrappers
# Built by factories at install time: every wrapper finds what it needs (the working directory, the resolver, the
# original functions) in its closure, not in this module's globals, where the program could plant other names.


def replace(modules: Iterable[types.ModuleType], name: str, value: object) -> None:
    """Set `name` to `value` in each of `modules` that has it."""
    for module in modules:
        if hasattr(module, name):
            setattr(module, name, value)


def denial(what: str, error: type[OSError] = PermissionError) -> Callable[..., NoReturn]:
    """A stand-in for the function `what` that always raises `error` (ENETUNREACH for a plain OSError, else EPERM)."""
    code = errno.ENETUNREACH if error is OSError else errno.EPERM

    def denied(*args: object, **kwargs: object) -> NoReturn:
        raise error(code, "sandbox: " + what + " is disabled")

    denied.__name__ = what.rsplit(".", 1)[-1]
    return denied


def make_as_path() -> Callable[[Any], Any]:
    """A function returning a path-like value as str/bytes (so the hook can judge it), anything else unchanged."""
    type_, str_, bytes_, int_, fspath = type, str, bytes, int, posix.fspath

    def as_path(value: Any) -> Any:
        kind = type_(value)
        if kind is str_ or kind is bytes_ or kind is int_:
            return value
        try:
            return fspath(value)
        except TypeError:
            return value  # the original function raises its own TypeError

    return as_path


def make_check(root: str, allowed: frozenset[str], k: Kit) -> Callable[..., None]:
    """A function raising PermissionError unless its path (relative to its dir_fd) lies inside `root`, is in
    `allowed`, is not a file (a pipe's fd), or cannot be judged here (the hook judges it)."""
    resolve, inside_prefix, str_ = real_path, root.rstrip("/") + "/", str

    def check(path: Any, dir_fd: Any = None) -> None:
        resolved = resolve(path, dir_fd, k)
        if resolved is None or resolved == "" or resolved in allowed:
            return
        if resolved == root or resolved.startswith(inside_prefix):
            return
        raise PermissionError(errno.EACCES, "sandbox: no writes outside the working directory", str_(path))

    return check


def guard_files(check: Callable[..., None], as_path: Callable[[Any], Any]) -> None:
    """open, io.FileIO and os.open refuse to open a path outside for writing."""
    original_open, original_os_open = _io.open, posix.open
    type_, str_, write_chars, write_flags = type, str, WRITE_MODE_CHARS, WRITE_FLAGS

    def guarded_open(file: Any, mode: Any = "r", *args: Any, **kwargs: Any) -> Any:
        file = as_path(file)
        if type_(mode) is str_ and write_chars & frozenset(mode):
            check(file)
        return original_open(file, mode, *args, **kwargs)

    class FileIO(_io.FileIO):
        def __init__(self, file: Any, mode: Any = "r", *args: Any, **kwargs: Any) -> None:
            file = as_path(file)
            if type_(mode) is str_ and write_chars & frozenset(mode):
                check(file)
            super().__init__(file, mode, *args, **kwargs)

    def guarded_os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        path = as_path(path)
        if flags & write_flags:
            check(path, dir_fd)
        return original_os_open(path, flags, mode, dir_fd=dir_fd)

    replace((builtins, io, _io), "open", guarded_open)
    replace((io, _io), "FileIO", FileIO)
    replace((os, posix), "open", guarded_os_open)


def guard_paths(name: str, specs: list[tuple[str, int, str | None]], check: Callable[..., None],
                as_path: Callable[[Any], Any], modules: tuple[types.ModuleType, ...] = (os, posix)) -> None:
    """Wrap `name` in `modules`: each (param, position, dir_fd param) of `specs` is made a str and checked first."""
    original = getattr(modules[0], name, None)
    if original is None:
        return

    def guarded(*args: Any, **kwargs: Any) -> Any:
        arguments = list(args)
        for param, position, dir_fd_param in specs:
            if position < len(arguments):
                value = arguments[position] = as_path(arguments[position])
            elif param in kwargs:
                value = kwargs[param] = as_path(kwargs[param])
            else:
                continue
            check(value, kwargs.get(dir_fd_param) if dir_fd_param else None)
        return original(*arguments, **kwargs)

    guarded.__name__ = name
    replace(modules, name, guarded)


def guard_path_functions(check: Callable[..., None], as_path: Callable[[Any], Any]) -> None:
    """Removals, renames, links, permission changes and copies (os, posix, shutil) refuse a path outside."""
    for name in ONE_PATH:
        guard_paths(name, [("path", 0, "dir_fd")], check, as_path)
    for name in ONE_FD:
        guard_paths(name, [("fd", 0, None)], check, as_path)
    for name in TWO_PATHS:
        guard_paths(name, [("src", 0, "src_dir_fd"), ("dst", 1, "dst_dir_fd")], check, as_path)
    guard_paths("symlink", [("dst", 1, "dir_fd")], check, as_path)
    guard_paths("makedirs", [("name", 0, None)], check, as_path, modules=(os,))
    guard_paths("removedirs", [("name", 0, None)], check, as_path, modules=(os,))
    guard_paths("rmtree", [("path", 0, None)], check, as_path, modules=(shutil,))
    guard_paths("move", [("src", 0, None), ("dst", 1, None)], check, as_path, modules=(shutil,))
    for name in SHUTIL_COPIES:
        guard_paths(name, [("dst", 1, None)], check, as_path, modules=(shutil,))


def disable_network() -> None:
    """Sockets cannot be made and names cannot be resolved (OSError ENETUNREACH)."""

    class NoSocket(socket.socket):
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise OSError(errno.ENETUNREACH, "sandbox: network access is disabled")

    class NoRawSocket(_socket.socket):
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise OSError(errno.ENETUNREACH, "sandbox: network access is disabled")

    replace((socket,), "socket", NoSocket)
    replace((socket,), "SocketType", NoSocket)
    replace((_socket,), "socket", NoRawSocket)
    replace((_socket,), "SocketType", NoRawSocket)
    for name in SOCKET_FUNCTIONS:
        replace((socket, _socket), name, denial("socket." + name, OSError))


def disable_processes() -> None:
    """No process creation, signalling, os._exit, uid changes or resource-limit changes (PermissionError)."""
    for name in PROCESS_FUNCTIONS:
        replace((os, posix), name, denial("os." + name))

    class NoPopen(subprocess.Popen):
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise PermissionError(errno.EPERM, "sandbox: starting processes is disabled")

    replace((subprocess,), "Popen", NoPopen)
    replace((_posixsubprocess,), "fork_exec", denial("_posixsubprocess.fork_exec"))
    replace((resource,), "setrlimit", denial("resource.setrlimit"))
    replace((resource,), "prlimit", denial("resource.prlimit"))


# --------------------------------------------------------------------------- the program


def install(root: str) -> None:
    """Install both layers for a program whose working directory is `root` (the hook last: it cannot be removed)."""
    as_path, check = make_as_path(), make_check(root, ALWAYS_WRITABLE, KIT)
    guard_files(check, as_path)
    guard_path_functions(check, as_path)
    disable_network()
    disable_processes()
    sys.addaudithook(make_hook(root, ALWAYS_WRITABLE, KIT))


def run_as_main(program: str, source: bytes) -> None:
    """Execute `source` as `__main__`. A SystemExit before its end exits with EXIT_BEFORE_THE_END (a failure); an
    exception is reported as Python reports an uncaught one (exit code 1), less this function's frame."""
    sys.argv = [program]
    namespace = {"__name__": "__main__", "__file__": program, "__builtins__": builtins}
    try:
        exec(compile(source, program, "exec"), namespace)
    except SystemExit as exit_:
        try:
            sys.stderr.write(f"sandbox: the program called exit({exit_.code!r}) before it finished\n")
            sys.stderr.flush()
        finally:  # whatever the program made of sys.stderr
            raise SystemExit(EXIT_BEFORE_THE_END) from None
    except Exception as error:
        try:
            if error.__traceback__ is not None:
                error.with_traceback(error.__traceback__.tb_next)
            sys.excepthook(type(error), error, error.__traceback__)
        finally:  # whatever the program made of sys.excepthook and sys.stderr
            raise SystemExit(1) from None


def main() -> None:
    """Read the program named by argv[1] (before the guards are up), guard this process, run the program."""
    program = sys.argv[1]
    with _io.open(program, "rb") as handle:
        source = handle.read()
    install(posix.getcwd())
    run_as_main(program, source)


if __name__ == "__main__":
    main()
