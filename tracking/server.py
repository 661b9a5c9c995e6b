"""`mlflow server` processes: the command line, starting one, waiting for `/health`, stopping its whole tree.

Used by `loraland ui` (the UI on the embedded store), by `tracking.store.check_reachable` (waiting for a
tracking server) and by the tests' session server. Nothing here knows where runs are stored: the caller
passes the backend store URI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import tenacity

DEFAULT_PORT = 5000
START_TIMEOUT_S = 120.0  # `mlflow server` needs 7-12 s on a quiet machine (more on a new database or a loaded one)
POLL_S = 0.5
STOP_TIMEOUT_S = 15.0


def server_command(
    backend_store_uri: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    workers: int = 1,
    artifacts_destination: str | Path | None = None,
    default_artifact_root: str | None = None,
) -> list[str]:
    """`mlflow server ...` as an argument list (the mlflow next to this Python)."""
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    command = [mlflow] if mlflow else [sys.executable, "-m", "mlflow"]
    command += [
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    if artifacts_destination:
        command += ["--artifacts-destination", str(artifacts_destination)]
    if default_artifact_root:
        command += ["--default-artifact-root", default_artifact_root]
    return command


class _NotHealthyYet(Exception):
    """`/health` did not answer 200 on this poll."""


def _check_health(url: str, process: subprocess.Popen | None) -> None:
    """One poll: returns when `<url>/health` answers 200; RuntimeError when `process` has exited; _NotHealthyYet
    otherwise."""
    if process is not None and process.poll() is not None:
        raise RuntimeError(f"MLflow exited with code {process.returncode} before answering {url}/health")
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            if response.status == 200:
                return
    except OSError as error:
        raise _NotHealthyYet(str(error)) from None
    raise _NotHealthyYet(f"status {response.status}")


def wait_healthy(url: str, timeout_s: float = START_TIMEOUT_S, process: subprocess.Popen | None = None) -> None:
    """Poll `<url>/health` (at least once) until it answers 200; TimeoutError after `timeout_s`, RuntimeError if
    `process` exits."""
    polling = tenacity.Retrying(stop=tenacity.stop_after_delay(timeout_s), wait=tenacity.wait_fixed(POLL_S),
                                retry=tenacity.retry_if_exception_type(_NotHealthyYet), reraise=True)
    try:
        polling(_check_health, url, process)
    except _NotHealthyYet:
        raise TimeoutError(f"{url}/health did not answer within {timeout_s:.0f}s") from None


def start_server(
    command: list[str], url: str, log_file: str | Path | None = None, wait: bool = True
) -> subprocess.Popen:
    """Start an MLflow server command in its own process group; with `wait`, return once `url` is healthy (a server
    that fails to come up, or an interrupt while waiting, stops it again).

    The caller owns the process: `stop_server(process)` stops it and every process it started."""
    # MLflow's background job runners (GenAI scorers and the like) are not used here, and starting them slows every
    # start.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | dict(os.environ)
    if log_file:
        with open(log_file, "ab") as output:  # the child keeps its own copy
            process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
    else:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=env)
    if wait:
        try:
            wait_healthy(url, START_TIMEOUT_S, process)
        except BaseException:  # also SystemExit from a SIGTERM and KeyboardInterrupt: never leave it running
            stop_server(process)
            raise
    return process


def stop_server(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop a server started by `start_server` and its whole process tree (mlflow runs uvicorn workers and a job runner
    as children): see `stop_tree`; then reap `process`."""
    stop_tree(process.pid, timeout_s)
    process.wait(timeout_s)


def stop_tree(pid: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """End process `pid` and every descendant (found before signalling, so ones that left the process group count too):
    SIGTERM to its process group (when it leads one) and to each, SIGKILL to whatever is left after `timeout_s`.
    A gone `pid` is fine."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGTERM)
    for process in tree:
        _signal(process, signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    for process in alive:
        _signal(process, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=timeout_s)


def _signal(process: psutil.Process, signum: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        process.send_signal(signum)
