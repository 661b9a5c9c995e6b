"""`loraland ui`: the MLflow UI on the embedded store (SQLite in the data folder, local artifacts);
and starting/stopping an `mlflow server` process in general (a tracking server for a cluster, tests).

With an http(s) tracking server there is nothing to start: the server is the UI (`ui_command`
says so). Everything binds to 127.0.0.1 unless told otherwise (`--host 0.0.0.0` also needs
`--allowed-hosts`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tracking import store

DEFAULT_PORT = 5000
START_TIMEOUT_S = 60.0  # `mlflow server` needs 7-12 s (more on the first start of a new database)


def server_command(backend_store_uri: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, workers: int = 1,
                   artifacts_destination: str | Path | None = None, default_artifact_root: str | None = None) -> list[str]:
    """`mlflow server ...` as an argument list (the mlflow next to this Python)."""
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    command = [mlflow] if mlflow else [sys.executable, "-m", "mlflow"]
    command += ["server", "--backend-store-uri", backend_store_uri, "--host", host, "--port", str(port), "--workers", str(workers)]
    if artifacts_destination:
        command += ["--artifacts-destination", str(artifacts_destination)]
    if default_artifact_root:
        command += ["--default-artifact-root", default_artifact_root]
    return command


def ui_command(uri: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> list[str]:
    """The command that serves the MLflow UI on the tracking store `uri` (default: the embedded SQLite file)."""
    resolved = store.resolve_tracking_uri(uri)
    if store.is_server_uri(resolved):
        raise ValueError(f"tracking goes to the server {resolved}: open it in a browser, there is no UI to start")
    return server_command(resolved, host, port, default_artifact_root=store.artifact_root(resolved))


def wait_healthy(url: str, timeout_s: float = START_TIMEOUT_S, process: subprocess.Popen | None = None) -> None:
    """Poll `<url>/health` (at least once) until it answers 200; TimeoutError after `timeout_s`, RuntimeError if `process` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"MLflow exited with code {process.returncode} before answering {url}/health")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url}/health did not answer within {timeout_s:.0f}s")
        time.sleep(0.5)


def start_server(command: list[str], url: str, log_file: str | Path | None = None, wait: bool = True) -> subprocess.Popen:
    """Start an MLflow server command in its own process group; with `wait`, return once `url` is healthy.

    The caller owns the process: `stop_server(process)` stops it and its workers."""
    output = open(log_file, "ab") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    if log_file:
        output.close()  # the child has its own copy
    if wait:
        try:
            wait_healthy(url, START_TIMEOUT_S, process)
        except Exception:
            stop_server(process)
            raise
    return process


def stop_server(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """Stop a server started by `start_server`: SIGTERM to its process group (mlflow runs uvicorn
    workers as children), SIGKILL to the group if it has not exited after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    try:
        os.killpg(process.pid, signal.SIGTERM)
        while time.monotonic() < deadline:
            os.killpg(process.pid, 0)  # raises ProcessLookupError once every process of the group is gone
            process.poll()
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout_s)


def start_ui(uri: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT, wait: bool = True,
             log_file: str | Path | None = None) -> subprocess.Popen:
    """`loraland ui`: start the MLflow UI (`ui_command`) in the background; with `wait`, return once it answers."""
    return start_server(ui_command(uri, host, port), f"http://{host}:{port}", log_file, wait)
