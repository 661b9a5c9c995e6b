"""What `loraland` commands leave behind: nothing when they only read, no process when they are ended by a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from core.paths import PROJECT_ROOT
from core.ports import free_port, port_is_free


def tree(root: Path) -> list[str]:
    """Every file and folder under `root`, relative."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@pytest.mark.integration  # imports MLflow in-process (seconds)
def test_read_only_commands_create_no_store_or_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`report` against an embedded store that does not exist says so in one line and creates nothing; `catalog`,
    `plan` and `validate` create nothing either (neither in the data folder nor in the working folder)."""
    from orchestrator.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("LORALAND_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    sweep = str(PROJECT_ROOT / "configs" / "sweeps" / "demo.yaml")
    for argv in (["catalog"], ["plan", sweep], ["validate", sweep]):
        assert main(argv) == 0, argv
        assert tree(tmp_path) == [], argv
    capsys.readouterr()
    assert main(["report", "--experiment", "demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no MLflow store at {home / 'mlflow.db'}" in err[0], err
    assert tree(tmp_path) == []
    # the same for an explicit SQLite URI in a folder that does not exist
    assert main(["report", "--experiment", "demo", "--tracking-uri", f"sqlite:///{tmp_path / 'x' / 'mlflow.db'}"]) == 2
    assert tree(tmp_path) == []


@pytest.mark.unit
def test_ui_mistakes_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A tracking server is its own UI; a port in use is named before any server starts."""
    import socket

    from orchestrator.cli import main

    assert main(["ui", "--tracking-uri", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "open it in a browser" in err[0], err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["ui", "--port", str(port), "--tracking-uri", "sqlite:////nonexistent/mlflow.db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"port {port} is in use" in err[0] and "--port" in err[0], err


@pytest.mark.integration  # starts a real `mlflow server` through `loraland ui`
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_ui_ended_by_a_signal_leaves_no_process_and_frees_its_port(signum: signal.Signals, tmp_path: Path) -> None:
    """`loraland ui` in the background, ended with `kill PID` (SIGTERM) or a closed terminal (SIGHUP) sent to its own
    PID only: the mlflow server, its uvicorn workers and job runner end with it, and the port is free again."""
    from tracking.server import wait_healthy

    port = free_port()
    command = [sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    env = os.environ | {"LORALAND_HOME": str(tmp_path / "home")}
    ui = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 180, ui)
        children = psutil.Process(ui.pid).children(recursive=True)
        assert children, "the UI runs its server as child processes"
        os.kill(ui.pid, signum)
        ui.wait(60)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], [(p.pid, p.name()) for p in alive]
        assert port_is_free(port)
        assert ui.returncode == 128 + signum  # as a shell reports a command ended by that signal
    finally:
        for process in [*children, psutil.Process(ui.pid) if ui.poll() is None else None]:
            if process is not None and process.is_running():
                process.kill()  # only the processes this test started
        ui.wait(30)


@pytest.mark.cluster  # a local Ray cluster and Ray Serve with one tiny replica
def test_serve_ended_by_sigterm_leaves_no_process_and_frees_its_port(tmp_path: Path) -> None:
    """`loraland serve` ended by `kill PID` (SIGTERM, sent to its PID only): Serve and the local Ray cluster it started
    (GCS, raylet, workers, the replica) end with it, the HTTP port is free, and the exit status is the signal's, not an
    abort: `ray.init` puts Ray's own SIGTERM handler in place (it logs a stack and aborts), so `connect_ray` puts ours
    back. (A closed terminal's SIGHUP, which Ray leaves alone, goes the same way.)"""
    import yaml

    port = free_port()
    config = yaml.safe_load((PROJECT_ROOT / "configs" / "serve" / "demo.yaml").read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["deployments"] = config["applications"][0]["args"]["deployments"][:1]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = os.environ | {"LORALAND_HOME": str(tmp_path / "home"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    serve = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", str(path)], cwd=PROJECT_ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children: list[psutil.Process] = []
    try:
        seen = ""
        while f"127.0.0.1:{port}/\n" not in seen:  # the LoRA Land page's address, printed once every replica is up
            line = serve.stdout.readline() if serve.stdout else ""
            assert line, seen[-3000:]
            seen += line
        children = psutil.Process(serve.pid).children(recursive=True)
        assert children and not port_is_free(port)
        os.kill(serve.pid, signal.SIGTERM)
        serve.wait(120)
        _, alive = psutil.wait_procs(children, timeout=60)
        assert alive == [], [(p.pid, p.name()) for p in alive]
        assert port_is_free(port)
        assert serve.returncode == 128 + signal.SIGTERM, seen[-3000:] + (serve.stdout.read() if serve.stdout else "")
    finally:
        for process in [*children, psutil.Process(serve.pid) if serve.poll() is None else None]:
            if process is not None and process.is_running():
                process.kill()  # only the processes this test started
        serve.wait(30)


@pytest.mark.unit
def test_sweep_with_a_ray_address_nothing_answers_at_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`RAY_ADDRESS` naming a loopback port nobody listens on (as a GCS or a Ray Client address), or something that is
    not a Ray address: one line naming it and the fix, status 2, before storage, MLflow or Ray are touched."""
    from orchestrator.cli import main

    monkeypatch.setenv("LORALAND_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = [
        "sweep",
        str(PROJECT_ROOT / "tests" / "fixtures" / "mini_sweep.yaml"),
        "--storage-path",
        str(tmp_path / "storage"),
    ]
    port = free_port()
    for address, expected in (
        (f"127.0.0.1:{port}", "unset RAY_ADDRESS"),
        (f"ray://127.0.0.1:{port}", "unset RAY_ADDRESS"),
        (f"http://127.0.0.1:{port}", "is not a Ray address"),
    ):
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert main(argv) == 2, address
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "RAY_ADDRESS" in err[0] and address in err[0] and expected in err[0], err
    assert tree(tmp_path) == []


@pytest.mark.unit
def test_ray_giving_up_on_the_cluster_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """`RAY_ADDRESS=auto` is left to Ray, but Ray's exit (status 15, its GCS client giving up) becomes an
    Unreachable."""
    import ray

    from core.errors import Unreachable
    from orchestrator.cluster import connect_ray

    def gives_up(**_: object) -> None:
        raise SystemExit(15)

    monkeypatch.setenv("RAY_ADDRESS", "auto")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", gives_up)
    with pytest.raises(Unreachable, match=r"^RAY_ADDRESS=auto: Ray could not join a cluster there \(exit status 15\);"):
        connect_ray()


@pytest.mark.unit
def test_joining_ray_keeps_the_commands_own_signal_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler the command set (`exit_on_signals`) is back after `ray.init` set Ray's own; one left at the default
    stays Ray's."""
    import ray

    from orchestrator.cluster import connect_ray
    from orchestrator.signals import exit_on_signals

    def rays(signum: int, frame: object) -> None:
        raise SystemExit(signum)

    def init(**_: object) -> None:
        signal.signal(signal.SIGTERM, rays)
        signal.signal(signal.SIGHUP, rays)

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setattr("orchestrator.cluster.cluster_address", lambda: "127.0.0.1:6379")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with exit_on_signals():
            ours = signal.getsignal(signal.SIGTERM)
            connect_ray()
            assert signal.getsignal(signal.SIGTERM) is ours and signal.getsignal(signal.SIGHUP) is not rays
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        connect_ray()
        assert signal.getsignal(signal.SIGTERM) is rays
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
