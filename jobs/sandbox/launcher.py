"""The child's entry point for a root evaluator: set up the confinement as root, then exec the sandboxed program.

A root evaluator starts `[unshare --mount --propagation private [--net] --] python -I -S .../launcher.py SETTINGS
python -I .../prelude.py program.py` (see `jobs.sandbox.confinement.command`). This trusted code runs as root in
the child's new namespaces, in the evaluator's working directory for the program: it builds the private mounts
(SETTINGS["box"], when the mount namespace is there), enters the working directory, drops to the unprivileged user
(SETTINGS["user"]), sets no_new_privs and execs the rest of its argv. The program never runs as root unless the drop
is not permitted. It imports only the standard library (run by path with `-I -S`, nothing else is on `sys.path`).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing before every program (start-up time)
if TYPE_CHECKING:
    from typing import Any

MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 2, 4, 8, 4096, 16384
PR_SET_NO_NEW_PRIVS = 38
SETUP_FAILED = 125  # exit code when the program could not be set up (it did not run)
COVER_OPTIONS = "size=1m,mode=0755"  # an empty tmpfs hiding a directory: only root may write to it


class Libc:
    """The two libc calls the standard library lacks: mount(2) and prctl(2)."""

    def __init__(self) -> None:
        self.cdll = ctypes.CDLL(None, use_errno=True)

    def mount(self, source: str, target: str, fstype: str | None, flags: int, options: str | None = None) -> None:
        """mount(2); OSError naming the target on failure."""
        if self.cdll.mount(_c(source), _c(target), _c(fstype), ctypes.c_ulong(flags), _c(options)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, "mount on " + target + ": " + os.strerror(code))

    def set_no_new_privs(self) -> None:
        """prctl(PR_SET_NO_NEW_PRIVS): from here on, exec grants no privileges (setuid binaries grant nothing)."""
        if self.cdll.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _c(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def empty_dir(libc: Libc, path: str) -> None:
    """Hide what is at `path` behind an empty tmpfs that only root may write to."""
    libc.mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, COVER_OPTIONS)


def closed_ancestor(path: str) -> str | None:
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


def build_box(libc: Libc, box: dict[str, Any], workdir: str, program: str, owner: tuple[int, int]) -> None:
    """The private mounts: box["cover"] hidden, box["expose"] (the interpreter, the prelude) bound back where a cover
    or a closed home directory hides it, and `workdir` a fresh tmpfs (box["options"]) holding a copy of `program`
    owned by `owner`."""
    with open(program, "rb") as handle:  # the evaluator's copy, about to be hidden
        source = handle.read()
    keep = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in box["expose"]]
    for path in box["cover"]:
        if os.path.isdir(path) and not os.path.islink(path):
            empty_dir(libc, path)
    for path, fd in keep:
        closed = closed_ancestor(path)
        if closed is not None:
            empty_dir(libc, closed)
        if closed is not None or not os.path.isdir(path):
            os.makedirs(path, mode=0o755, exist_ok=True)
            libc.mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
    os.makedirs(workdir, mode=0o755, exist_ok=True)
    libc.mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, box["options"])
    copy = os.path.join(workdir, program)
    with open(copy, "wb") as handle:
        handle.write(source)
    os.chown(copy, *owner)


def drop(uid: int, gid: int) -> None:
    """Become uid/gid with no supplementary groups; where that is not permitted, stay (the program then runs as the
    evaluator's user, as without a drop)."""
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except PermissionError:
        pass


def launch(settings: dict[str, Any], command: list[str]) -> None:
    """Set up what `settings` asks for (see `jobs.sandbox.confinement.launcher_settings`), then exec `command`."""
    libc = Libc()
    os.umask(0o022)
    user = settings["user"]
    if settings["box"] is not None:
        build_box(libc, settings["box"], settings["workdir"], settings["program"], user or (0, 0))
    os.chdir(settings["workdir"])  # after the mounts: the fresh tmpfs, not the directory under it
    if user is not None:
        drop(*user)
    libc.set_no_new_privs()
    os.execv(command[0], command)


def main() -> None:
    """`launcher.py SETTINGS_JSON COMMAND...`: launch, or exit SETUP_FAILED with a one-line reason on stderr."""
    try:
        launch(json.loads(sys.argv[1]), sys.argv[2:])
    except Exception as exc:
        sys.stderr.write(f"sandbox error: could not set up the program ({exc})\n")
        sys.stderr.flush()
        os._exit(SETUP_FAILED)  # the program did not run; the evaluator reports the exit code and this message


if __name__ == "__main__":
    main()
