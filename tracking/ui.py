"""`loraland ui`: the MLflow UI on the embedded store (SQLite in the data folder, local artifacts).

With an http(s) tracking server there is nothing to start: the server is the UI (`ui_command` says so).
Everything binds to 127.0.0.1 unless told otherwise (`--host 0.0.0.0` also needs `--allowed-hosts`).
Starting and stopping the `mlflow server` process itself is `tracking.server`'s.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from core.errors import ConfigError, Conflict
from core.ports import port_is_free
from tracking import store
from tracking.server import DEFAULT_PORT, server_command, start_server


def ui_command(uri: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> list[str]:
    """The command that serves the MLflow UI on the tracking store `uri` (default: the embedded SQLite file).
    A ConfigError when tracking goes to an http(s) server (that server is the UI)."""
    resolved = store.resolve_tracking_uri(uri)
    if store.is_server_uri(resolved):
        raise ConfigError(
            "tracking URI", [f"tracking goes to the server {resolved}: open it in a browser, there is no UI to start"]
        )
    return server_command(resolved, host, port, default_artifact_root=store.artifact_root(resolved))


def check_port_free(port: int) -> None:
    """A one-line Conflict when something already listens on `port` (a UI started earlier, another server)."""
    if not port_is_free(port):
        raise Conflict(f"port {port} is in use (a UI started earlier?): stop that, or pass --port")


def start_ui(uri: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT, wait: bool = True,
             log_file: str | Path | None = None) -> subprocess.Popen:
    """`loraland ui`: start the MLflow UI (`ui_command`) in the background; with `wait`, return once it answers.
    The embedded store's folder is made first (SQLite cannot make it). The caller stops it with
    `tracking.server.stop_server`."""
    command = ui_command(uri, host, port)
    check_port_free(port)
    store.prepare_store(store.resolve_tracking_uri(uri))
    return start_server(command, f"http://{host}:{port}", log_file, wait)
