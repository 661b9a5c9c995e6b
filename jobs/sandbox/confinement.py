"""Where model-written programs run: in a bubblewrap box (`bwrap`) where the kernel allows one, else nowhere unless the
caller allows unconfined code (see `jobs.sandbox` for what protects what). This module builds the child's command
line, environment and resource limits; `runner` finds what this machine allows.
"""

from __future__ import annotations

import math
import os
import pwd
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

PROGRAM_NAME = "program.py"
WORKDIR = "/tmp"  # the program's working folder inside the box: a tmpfs of DISK_LIMIT bytes
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # RLIMIT_FSIZE: largest file the program may write
OPEN_FILES_LIMIT = 256  # RLIMIT_NOFILE
PROCESS_LIMIT = 256  # RLIMIT_NPROC of an unconfined program (in the box the program may start no task at all)
DISK_LIMIT = 64 * 1024 * 1024  # bytes the program may keep in its working folder, all files together (box only)
SANDBOX_ID = 65534  # uid and gid of the program inside the box
UNPRIVILEGED_USER = "nobody"  # a root evaluator starts bwrap as this user (SANDBOX_ID where the name is missing)
SYSTEM_PYTHON = "/usr/bin/python3"  # the box's interpreter where the evaluator's cannot be read by that user
PRELUDE_SOURCE = (Path(__file__).resolve().parent / "prelude.py").read_text()  # run with `python -I -c`
UNCONFINED_SETTING = "evaluation.unconfined_code: true"


class UnconfinedCode(UserError, RuntimeError):
    """A code task asked to run where the kernel cannot confine model-written code, without the setting allowing it."""


@dataclass(frozen=True)
class Sandbox:
    """How programs run on this machine: in a bwrap box with `python` (`boxed`), or, where none works, unconfined
    with the evaluator's interpreter; `reason` says why not boxed."""

    boxed: bool
    python: str
    user: tuple[int, int] | None = None  # (uid, gid) bwrap runs as: a root evaluator's is `nobody`
    reason: str = ""

    def refusal(self) -> str:
        """The one-line error of a code task refused here."""
        return (f"code tasks run model-written code, and this machine cannot confine it ({self.reason}): install "
                f"bubblewrap 0.7 or later (apt-get install bubblewrap) where user namespaces are allowed "
                f"(/proc/sys/user/max_user_namespaces > 0), or set {UNCONFINED_SETTING} to run it unconfined, "
                "knowingly (its scores are then marked)")


# --------------------------------------------------------------------------- limits and environment


def resource_limits(timeout_s: float, memory_mb: int, boxed: bool) -> Callable[[], None]:
    """A preexec_fn that sets the child's resource limits (values computed here, in the parent). In the box the
    prelude sets RLIMIT_NPROC itself, where it counts the box's tasks alone (here it would count the user's)."""

    def clamp(kind: int, value: int, extra_hard: int = 0) -> tuple[int, int]:
        """(soft, hard) = (value, value + extra_hard), never above the current hard limit."""
        _, hard = resource.getrlimit(kind)
        if hard == resource.RLIM_INFINITY:
            return value, value + extra_hard
        return min(value, hard), min(value + extra_hard, hard)

    limits = [
        (resource.RLIMIT_AS, clamp(resource.RLIMIT_AS, memory_mb * 1024 * 1024)),
        (resource.RLIMIT_CPU, clamp(resource.RLIMIT_CPU, int(math.ceil(timeout_s)) + 1, extra_hard=1)),
        (resource.RLIMIT_FSIZE, clamp(resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_NOFILE, clamp(resource.RLIMIT_NOFILE, OPEN_FILES_LIMIT)),
    ]
    if not boxed:
        limits.append((resource.RLIMIT_NPROC, clamp(resource.RLIMIT_NPROC, PROCESS_LIMIT)))
    setrlimit = resource.setrlimit

    # preexec_fn runs between fork and exec; with the thread pool of pass_at_1 that is only safe
    # because it does nothing but call setrlimit (no imports, no locks).
    def apply() -> None:
        for kind, value in limits:
            setrlimit(kind, value)

    return apply


def child_env(workdir: str) -> dict[str, str]:
    """The child's whole environment (bwrap's too, which the box's /proc/1 shows): nothing of the evaluator's."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
    }


# --------------------------------------------------------------------------- the box


def box_command(python: str, program_fd: int) -> list[str]:
    """bwrap's argv: new user, PID, mount, network, IPC, UTS (and cgroup) namespaces; a fresh /proc and a minimal
    /dev; the host's /usr and the interpreter's prefix read-only, nothing else of it; `program_fd`'s content copied
    to WORKDIR/program.py on a tmpfs of DISK_LIMIT bytes; / and /dev read-only; the program as SANDBOX_ID in its
    own session, SIGKILLed with everything in the box when bwrap or the evaluator dies."""
    argv = ["bwrap", "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
            "--uid", str(SANDBOX_ID), "--gid", str(SANDBOX_ID), "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):  # merged /usr: links; else the folders themselves
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    prefix = interpreter_prefix(python)
    if not prefix.startswith("/usr/"):
        argv += ["--ro-bind", prefix, prefix]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(DISK_LIMIT), "--tmpfs", WORKDIR,
             "--file", str(program_fd), f"{WORKDIR}/{PROGRAM_NAME}", "--remount-ro", "/", "--remount-ro", "/dev",
             "--chdir", WORKDIR, "--"]
    return argv + program_command(python)


def program_command(python: str) -> list[str]:
    """The interpreter running the prelude, which runs program.py (in the current folder)."""
    return [python, "-I", "-c", PRELUDE_SOURCE, PROGRAM_NAME]


def interpreter_prefix(python: str) -> str:
    """The installation folder of interpreter `python` (its bin/ folder's parent)."""
    return str(Path(python).resolve().parent.parent)


def bwrap_user() -> tuple[int, int] | None:
    """(uid, gid) a root evaluator starts bwrap as: in a user namespace, kernel uid 0 would still pass the permission
    checks of /proc/sys; None for any other evaluator (bwrap runs as the evaluator's own user)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        return SANDBOX_ID, SANDBOX_ID
    return entry.pw_uid, entry.pw_gid
