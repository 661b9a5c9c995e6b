"""A cluster's tracking stack on loopback, for the cluster-tier tests and `benchmarks/tracking_backends.py`: a real
PostgreSQL (Debian's `postgresql` package) in a temporary data folder, and a real `mlflow server` on it, started with
the settings of `infra/mlflow/docker-compose.yaml` (`--workers`, `--serve-artifacts`, the connection pool variables,
PostgreSQL's `-c` options), its artifacts in an S3-compatible store or a folder.

Everything listens on 127.0.0.1 only and is stopped by its PID. As root, PostgreSQL runs as the `postgres` user (it
refuses to run as root); its data and socket folders are made that user's.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.ports import free_port

COMPOSE = Path(__file__).resolve().parents[1] / "infra" / "mlflow" / "docker-compose.yaml"
DATABASE = "mlflow"
DB_USER = "mlflow"  # initdb's superuser, as POSTGRES_USER in the compose file
OS_USER = "postgres"  # who runs PostgreSQL when this process is root
START_TIMEOUT_S = 180.0  # PostgreSQL, or `mlflow server` with 4 workers, on a busy machine


# --------------------------------------------------------------------------- the settings of infra/mlflow/


@dataclass(frozen=True)
class StackSettings:
    """What `infra/mlflow/docker-compose.yaml` sets for the server and its database."""

    workers: int  # `mlflow server --workers`
    serve_artifacts: bool  # `--serve-artifacts`: artifacts go through the server
    server_env: dict[str, str]  # the server's MLFLOW_* variables (connection pool)
    postgres_options: dict[str, str]  # the postgres service's `-c name=value` options (max_connections)


def compose_settings(path: Path = COMPOSE) -> StackSettings:
    """The server and database settings of the compose file (its `mlflow` and `postgres` services)."""
    import yaml

    services = yaml.safe_load(path.read_text())["services"]
    command = [str(word) for word in services["mlflow"]["command"]]
    env = {name: str(value) for name, value in services["mlflow"]["environment"].items() if name.startswith("MLFLOW_")
           and name != "MLFLOW_S3_ENDPOINT_URL"}
    postgres = [str(word) for word in services["postgres"].get("command", [])]
    options = dict(postgres[i + 1].split("=", 1) for i, word in enumerate(postgres) if word == "-c")
    return StackSettings(int(command[command.index("--workers") + 1]), "--serve-artifacts" in command, env, options)


# --------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    """The folder of the newest installed PostgreSQL's server binaries (initdb, postgres), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path else None


@dataclass
class Postgres:
    port: int
    root: Path
    process: subprocess.Popen

    def uri(self, database: str = DATABASE) -> str:
        """The SQLAlchemy URI of `database` (trust authentication on loopback)."""
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = DATABASE) -> Any:
        """A psycopg connection (autocommit) to `database`."""
        import psycopg

        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=DB_USER, dbname=database, connect_timeout=5, autocommit=True
        )


def _as_postgres_user() -> dict[str, Any]:
    """Popen keywords that run a command as the `postgres` user when this process is root (else as it is)."""
    return {"user": OS_USER, "group": OS_USER, "extra_groups": []} if os.geteuid() == 0 else {}


def start_postgres(port: int, options: Mapping[str, str] | None = None) -> Postgres:
    """initdb a cluster in a new temporary folder and run PostgreSQL on 127.0.0.1:`port` (its socket in that folder too)
    with the `-c` `options`; returns once the `mlflow` database exists and accepts connections. The caller stops it
    (`stop_postgres`, which also removes the folder)."""
    binaries = postgres_bin()
    if binaries is None:
        raise FileNotFoundError("PostgreSQL is not installed: apt-get install -y postgresql")
    # In /tmp: pytest's own folders are closed to other users
    root = Path(tempfile.mkdtemp(prefix="loraland-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(root, OS_USER, OS_USER)
    log = root / "postgres.log"
    with open(log, "ab") as out:
        subprocess.run(
            [binaries / "initdb", "-D", root / "data", "-U", DB_USER, "--auth=trust", "-E", "UTF8", "--no-sync"],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
            cwd=root,
            **_as_postgres_user(),
        )
        settings = [word for name, value in (options or {}).items() for word in ("-c", f"{name}={value}")]
        process = subprocess.Popen(
            [binaries / "postgres", "-D", root / "data", "-h", "127.0.0.1", "-p", str(port), "-k", root, *settings],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
            start_new_session=True,
            **_as_postgres_user(),
        )
    server = Postgres(port, root, process)
    try:
        _wait_accepting(server, log)
        with contextlib.closing(server.connect("postgres")) as connection:
            connection.execute(f"CREATE DATABASE {DATABASE}")
    except BaseException:
        stop_postgres(server)
        raise
    return server


def _wait_accepting(server: Postgres, log: Path) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited with code {server.process.returncode}: {log.read_text()[-2000:]}")
        try:
            server.connect("postgres").close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL did not accept connections within {START_TIMEOUT_S:.0f}s") from None
            time.sleep(0.2)


def stop_postgres(server: Postgres, timeout_s: float = 30.0) -> None:
    """Stop PostgreSQL by its PID (a fast shutdown, SIGINT: clients cut; SIGKILL after `timeout_s`) and remove its
    folder."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    shutil.rmtree(server.root, ignore_errors=True)


# --------------------------------------------------------------------------- mlflow server


def with_env(command: list[str], env: Mapping[str, str]) -> list[str]:
    """`command` run with `env` added to its environment (POSIX `env`, which then execs the command: same PID)."""
    return ["env", *(f"{name}={value}" for name, value in env.items()), *command] if env else command


@dataclass
class MlflowServer:
    """A running `mlflow server`; `restart()` stops it and starts it again on the same port and stores."""

    command: list[str]
    port: int
    log_file: Path
    process: subprocess.Popen | None = field(default=None)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the server; returns once `/health` answers (4 workers on a busy 2-core machine can take a minute)."""
        from tracking.server import start_server, stop_server, wait_healthy

        process = start_server(self.command, self.uri, log_file=self.log_file, wait=False)
        try:
            wait_healthy(self.uri, timeout_s, process)
        except BaseException:
            stop_server(process)
            raise
        self.process = process

    def stop(self) -> None:
        """Stop the server and its workers (its process group, started by `start`)."""
        from tracking.server import stop_server

        if self.process is not None:
            stop_server(self.process)
            self.process = None


def mlflow_server(
    backend_store_uri: str,
    artifacts_destination: str,
    port: int,
    log_file: Path,
    settings: StackSettings,
    env: Mapping[str, str] | None = None,
) -> MlflowServer:
    """An `mlflow server` (not started) on `backend_store_uri` with the compose file's `settings` and extra `env`
    (the object store's endpoint and credentials)."""
    from tracking.server import server_command

    command = server_command(backend_store_uri, "127.0.0.1", port, workers=settings.workers,
                             artifacts_destination=artifacts_destination)
    command += ["--serve-artifacts"] if settings.serve_artifacts else []
    return MlflowServer(with_env(command, settings.server_env | dict(env or {})), port, log_file)


@dataclass
class TrackingStack:
    """PostgreSQL and an `mlflow server` on it, started with `settings`."""

    postgres: Postgres
    server: MlflowServer
    settings: StackSettings

    @property
    def uri(self) -> str:
        return self.server.uri


@contextlib.contextmanager
def tracking_stack(root: Path, artifacts_destination: str, s3_env: Mapping[str, str] | None = None,
                   settings: StackSettings | None = None) -> Iterator[TrackingStack]:
    """PostgreSQL, then `mlflow server` on it (its log in `root`), both on free loopback ports with the compose file's
    settings (unless `settings`); artifacts to `artifacts_destination` (`s3://...` with `s3_env` naming the store's
    endpoint and credentials); both stopped by their PIDs after."""
    chosen = settings or compose_settings()
    postgres = start_postgres(free_port(), chosen.postgres_options)
    try:
        server = mlflow_server(
            postgres.uri(), artifacts_destination, free_port(), root / "mlflow.log", chosen, s3_server_env(s3_env)
        )
        server.start()
        try:
            yield TrackingStack(postgres, server, chosen)
        finally:
            server.stop()
    finally:
        stop_postgres(postgres)


def s3_server_env(s3_env: Mapping[str, str] | None) -> dict[str, str]:
    """The variables that point the server's S3 client at a store given by AWS_* variables (`tests.object_store`)."""
    if not s3_env:
        return {}
    return dict(s3_env) | {"MLFLOW_S3_ENDPOINT_URL": s3_env["AWS_ENDPOINT_URL"]}


# --------------------------------------------------------------------------- watching and starving the database


def connections(postgres: Postgres, database: str = DATABASE) -> int:
    """How many connections to `database` are open now (the asking one not counted)."""
    with contextlib.closing(postgres.connect("postgres")) as connection:
        row = connection.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)).fetchone()
    return int(row[0]) if row else 0


@contextlib.contextmanager
def peak_connections(postgres: Postgres, every_s: float = 0.2) -> Iterator[list[int]]:
    """Sample `connections` every `every_s` while the block runs; the list yielded holds the peak (one number) after."""
    import threading

    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):  # a sample refused at the limit is no peak to record
                peak[0] = max(peak[0], connections(postgres))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


@contextlib.contextmanager
def every_connection_taken(postgres: Postgres) -> Iterator[int]:
    """PostgreSQL at max_connections while the block runs, as when other clients hold every slot: the connections
    the `mlflow` database had are closed (a server's pools must open new ones) and this process opens connections
    until refused; yields how many it holds, closes them after."""
    import psycopg

    with contextlib.closing(postgres.connect("postgres")) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (DATABASE,))
    held: list[Any] = []
    try:
        while True:
            try:
                held.append(postgres.connect("postgres"))
            except psycopg.OperationalError:
                break
        yield len(held)
    finally:
        for connection in held:
            connection.close()
