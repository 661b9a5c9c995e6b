"""What the kernel enforces around each program: resource limits, the environment, the network namespace, and for a
root evaluator the private mounts and the switch to an unprivileged user (see `jobs.sandbox` for what protects what).

This module builds the child's command line and settings; the child's side lives in `launcher.py` (as root, before
the program) and `prelude.py` (the in-process guards), both run by path so that the child needs nothing of the
project on its `sys.path`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pwd
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs.sandbox import launcher, prelude

log = logging.getLogger(__name__)

PROGRAM_NAME = "program.py"
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # RLIMIT_FSIZE: largest file the program may write
OPEN_FILES_LIMIT = 256  # RLIMIT_NOFILE
PROCESS_LIMIT = 256  # RLIMIT_NPROC (counts all the user's tasks; root is exempt)
DISK_LIMIT = 64 * 1024 * 1024  # bytes the program may keep in its working directory, all files together
FILE_COUNT_LIMIT = 2048  # files, directories and links it may keep there
UNPRIVILEGED_USER = "nobody"  # a root evaluator runs programs as this user ...
UNPRIVILEGED_ID = 65534  # ... or as this uid/gid where the name is missing
SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable: hidden in the private mount namespace
PRELUDE_SCRIPT = os.path.realpath(prelude.__file__)  # run by path in the child (with its folder exposed to it)
LAUNCHER_SCRIPT = os.path.realpath(launcher.__file__)  # run by path, as root, before the mounts hide anything


@dataclass(frozen=True)
class Confinement:
    """What a root evaluator adds around each program (see `jobs.sandbox`)."""

    private_mounts: bool  # a private mount namespace: tmpfs working directory, shared tmp dirs hidden
    user: tuple[int, int] | None  # (uid, gid) the program runs as; None: the evaluator's own

    @property
    def launched(self) -> bool:
        """Whether the program starts through the launcher (anything to set up as root before exec)."""
        return self.private_mounts or self.user is not None


NO_CONFINEMENT = Confinement(private_mounts=False, user=None)


# --------------------------------------------------------------------------- limits and environment


def resource_limits(timeout_s: float, memory_mb: int) -> Callable[[], None]:
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


def child_env(workdir: str) -> dict[str, str]:
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


# --------------------------------------------------------------------------- the network namespace

_netns_lock = threading.Lock()


def network_namespace_prefix() -> list[str] | None:
    """`unshare` arguments that run a command in a new, empty network namespace, or None when this machine does not
    allow it. Probed once per process (one tiny subprocess)."""
    with _netns_lock:
        prefix = _probe_network_namespace()
    return list(prefix) if prefix is not None else None


def network_namespace_available() -> bool:
    """Whether programs get a private network namespace on this machine (see `run_program`)."""
    return network_namespace_prefix() is not None


@functools.cache
def _probe_network_namespace() -> tuple[str, ...] | None:
    exe = shutil.which("unshare")
    if exe is None:
        return None
    prefix = (exe, "--net", "--") if os.geteuid() == 0 else (exe, "--net", "--map-root-user", "--")
    workdir = tempfile.mkdtemp(prefix="loraland-probe-")
    try:
        probe = subprocess.run(
            [*prefix, sys.executable, "-I", "-c", "import socket"],
            cwd=workdir,
            env=child_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=20,
            preexec_fn=resource_limits(10.0, 1024),
            start_new_session=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return prefix if probe.returncode == 0 else None


# --------------------------------------------------------------------------- the root evaluator's confinement


def unprivileged_user() -> tuple[int, int]:
    """(uid, gid) of UNPRIVILEGED_USER, or UNPRIVILEGED_ID for both where there is no such user."""
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        return UNPRIVILEGED_ID, UNPRIVILEGED_ID
    return entry.pw_uid, entry.pw_gid


def probe_confinement(passes: Callable[[Confinement, str], bool]) -> Confinement:
    """The confinement this machine allows, found by running tiny programs through candidates with `passes(candidate,
    code)` (whether `code` passes under `candidate`): NO_CONFINEMENT for a non-root evaluator; for root, the private
    mounts where `unshare --mount` works, and `nobody` where dropping to it works and it can run the interpreter and
    the prelude (else a logged warning and the evaluator's own user)."""
    if os.geteuid() != 0:
        return NO_CONFINEMENT
    mounts = shutil.which("unshare") is not None and passes(
        Confinement(private_mounts=True, user=None), "import os\nassert os.path.ismount(os.getcwd())\n"
    )
    uid, gid = unprivileged_user()
    as_user = Confinement(private_mounts=mounts, user=(uid, gid))
    check = f"import os\nassert (os.getuid(), os.getgid(), os.getgroups()) == ({uid}, {gid}, [])\nopen('probe', 'w')\n"
    if passes(as_user, check):
        return as_user
    log.warning("sandbox: programs run as root here: dropping to uid %d failed (not permitted, or that user "
                "cannot run %s or read %s)", uid, sys.executable, PRELUDE_SCRIPT)
    return Confinement(private_mounts=mounts, user=None)


def exposed_dirs() -> list[str]:
    """The directories the sandboxed child reads its code from (the interpreter's prefixes, its binary's folder, the
    prelude's folder), outermost only: the launcher binds them back where the private mounts hide them."""
    found = {os.path.realpath(path) for path in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)}
    found.add(os.path.dirname(os.path.realpath(sys.executable)))
    found.add(os.path.dirname(PRELUDE_SCRIPT))
    return sorted(path for path in found if not any(path.startswith(other + "/") for other in found))


def launcher_settings(workdir: str, confinement: Confinement) -> dict[str, Any]:
    """What the launcher sets up for one program (read by `launcher.launch`)."""
    box = None
    if confinement.private_mounts:
        uid, gid = confinement.user or (0, 0)
        box = {
            "options": f"size={DISK_LIMIT},nr_inodes={FILE_COUNT_LIMIT},mode=0700,uid={uid},gid={gid}",
            "cover": sorted({os.path.realpath(path) for path in SHARED_TMP_DIRS}),
            "expose": exposed_dirs(),
        }
    user = list(confinement.user) if confinement.user else None
    return {"workdir": workdir, "program": PROGRAM_NAME, "user": user, "box": box}


def command(workdir: str, confinement: Confinement, network: bool) -> list[str]:
    """The child's argv: [unshare ...] [python -I -S launcher.py SETTINGS] python -I prelude.py program.py."""
    program = [sys.executable, "-I", PRELUDE_SCRIPT, PROGRAM_NAME]
    netns = network_namespace_prefix() if network else None
    if not confinement.launched:
        return [*(netns or []), *program]
    flags = ["--mount", "--propagation", "private"] if confinement.private_mounts else []
    flags += ["--net"] if netns else []
    prefix = [shutil.which("unshare") or "unshare", *flags, "--"] if flags else []
    settings = json.dumps(launcher_settings(workdir, confinement))
    return [*prefix, sys.executable, "-I", "-S", LAUNCHER_SCRIPT, settings, *program]
