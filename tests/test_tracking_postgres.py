"""The cluster's tracking stack, really run: `mlflow server` on PostgreSQL with artifacts in an S3 store on loopback,
started with the settings of infra/mlflow/docker-compose.yaml (tests/postgres_stack.py). One stack serves the module.

The tracking tests that matter under load run here as they run on SQLite in tests/test_tracking.py (the shared bodies
are in tests/tracking_fixtures.py): 32 concurrent job loggers, 16 of them registering adapter versions and racing for
the champion alias; a server restart mid-job. Then what only this stack has: a sweep resubmitted after its driver was
killed, the serving side loading an adapter from the object store, and the one-line errors of `loraland sweep` when the
database is out of connections or the bucket is missing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from core.paths import PROJECT_ROOT
from core.ports import free_port
from tests.object_store import S3Store
from tests.postgres_stack import (
    TrackingStack,
    compose_settings,
    connections,
    every_connection_taken,
    mlflow_server,
    peak_connections,
    postgres_bin,
    s3_server_env,
    tracking_stack,
)
from tests.tracking_fixtures import (
    REGISTERED_BY_LOGGERS,
    check_concurrent_job_loggers,
    check_job_survives_restart,
    fake_adapter,
)
from tracking import store

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        postgres_bin() is None,
        reason="PostgreSQL is not installed (apt-get install -y postgresql; make test does as root)",
    ),
]

MINI = PROJECT_ROOT / "tests" / "fixtures" / "mini_sweep.yaml"


@pytest.fixture(scope="module")
def bucket(s3_server: S3Store) -> S3Store:
    """A bucket of its own on the session's S3 server: the server's artifacts and nothing else."""
    return S3Store.create(s3_server.endpoint)


@pytest.fixture(scope="module")
def stack(bucket: S3Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingStack]:
    """PostgreSQL + `mlflow server` with infra/mlflow's settings, artifacts in `bucket`, for the whole module."""
    with tracking_stack(tmp_path_factory.mktemp("postgres-stack"), bucket.uri("artifacts"), bucket.env) as running:
        yield running


def sweep_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """`loraland ARGV` in this process: its exit status and the lines it wrote to stderr."""
    from orchestrator.cli import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.splitlines()


# --------------------------------------------------------------------------- the stack is infra/mlflow's


def test_the_stack_runs_with_the_settings_of_infra_mlflow(stack: TrackingStack) -> None:
    settings = compose_settings()
    assert stack.settings == settings and settings.workers == 4 and settings.serve_artifacts
    command = stack.server.command
    assert command[command.index("--workers") + 1] == "4" and "--serve-artifacts" in command
    # The pool, as the compose file sets it
    assert {f"{name}={value}" for name, value in settings.server_env.items()} <= set(command)
    with stack.postgres.connect() as connection:
        row = connection.execute("SHOW max_connections").fetchone()
    assert row is not None and row[0] == settings.postgres_options["max_connections"]


# --------------------------------------------------------------------------- under load


def test_32_job_loggers_and_16_registering_lose_nothing(stack: TrackingStack, bucket: S3Store) -> None:
    """The SQLite test's body (`check_concurrent_job_loggers`) on PostgreSQL; the server's connections stay below
    max_connections, and the adapters are in the object store."""
    with peak_connections(stack.postgres) as peak:
        check_concurrent_job_loggers(stack.uri, workers=32)
    limit = int(stack.settings.postgres_options["max_connections"])
    print(f"peak connections of the server with 32 concurrent job loggers: {peak[0]} of max_connections {limit}")
    assert 0 < peak[0] < limit
    from tracking import registry

    stored = bucket.keys("artifacts/")
    for version in registry.versions(REGISTERED_BY_LOGGERS, stack.uri):
        assert any(f"/{version.run_id}/artifacts/adapter/adapter_model.safetensors" in key for key in stored), (
            version.run_id
        )


def test_a_job_survives_a_server_restart(stack: TrackingStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SQLite test's body (`check_job_survives_restart`): the server (4 workers) stopped mid-job and started again
    on the same port, database and bucket."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    check_job_survives_restart(stack.uri, stack.server.stop, stack.server.start, tmp_path)


@pytest.mark.long  # make test covers the killed driver on SQLite (test_sweep.py) and on a cluster (test_cluster.py)
def test_a_sweep_resubmitted_after_its_driver_was_killed_has_one_finished_run_per_job(
    stack: TrackingStack, tmp_path: Path
) -> None:
    import yaml

    from tests.test_sweep import job_runs, kill_process_tree, sweep_command, sweep_env

    data = yaml.safe_load(MINI.read_text())
    data["training"] |= {"max_steps": 100, "checkpoint_every": 20}  # still training when it is killed
    sweep = tmp_path / "mini.yaml"
    sweep.write_text(yaml.safe_dump(data))
    command = sweep_command(stack.uri, tmp_path / "storage", sweep)
    driver = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=sweep_env(tmp_path)
    )
    assert driver.stdout is not None
    seen = ""
    for line in driver.stdout:  # kill it once the first job has finished and others are under way
        seen += line
        if line.strip().startswith("finished"):
            break
    assert "finished" in seen and driver.poll() is None, seen[-3000:]
    kill_process_tree(driver.pid)  # the driver and its local Ray, as a lost head node
    driver.wait()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=sweep_env(tmp_path))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    runs = job_runs(stack.uri)
    keys = [r.data.tags[store.TAG_JOB_KEY] for r in runs]
    assert len(runs) == 4 and sorted(set(keys)) == sorted(keys) and {r.info.status for r in runs} == {"FINISHED"}


def test_the_serving_side_loads_an_adapter_from_the_object_store(
    stack: TrackingStack, bucket: S3Store, tmp_path: Path
) -> None:
    """A registered adapter is resolved by the ingress's `ModelResolver` and fetched by a replica's `AdapterStore`
    through the server's artifact proxy, from the bucket."""
    from core.catalog import load_catalog
    from jobs.run import JobResult
    from serving.adapters import AdapterStore, ModelResolver
    from tracking import registry
    from tracking.tracker import JobTracker

    base, task = load_catalog().base_model("tiny-llama"), "served_from_s3"
    adapter = Path(fake_adapter(tmp_path / "trained", base_hf_id=base.hf_id))
    experiment_id = store.ensure_experiment("serving", stack.uri)
    with JobTracker(
        experiment_id, f"serving/tiny-llama/{task}/train", "tiny-llama", task, uri=stack.uri, system_metrics=False
    ) as tracker:
        tracker.finish(
            JobResult(tracker.job_key, "train", "tiny-llama", task, "accuracy", 0.9, 1, str(adapter), {}),
            base_score=0.0,
        )
    assert any(
        key.endswith(f"/{tracker.run_id}/artifacts/adapter/adapter_model.safetensors")
        for key in bucket.keys("artifacts/")
    )
    resolver = ModelResolver(
        {"tiny-llama": None}, partial(registry.published_adapters, stack.uri), ttl_s=60, timeout_s=30
    )
    route = asyncio.run(resolver.resolve(task))
    assert route.base_model == "tiny-llama" and route.adapter == f"{registry.model_name(task)}/{tracker.model_version}"
    fetched: list[str] = []
    folder = AdapterStore(base, tmp_path / "cache", stack.uri, on_fetch=lambda _, source, __: fetched.append(source))(
        route.adapter
    )
    assert fetched == ["download"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).read_bytes() == (adapter / name).read_bytes()


# --------------------------------------------------------------------------- one line at `loraland sweep` start


def test_a_sweep_stops_in_one_line_when_the_database_is_out_of_connections(stack: TrackingStack, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from tracking import preflight

    # Every worker of the server has its pools: the next requests need new connections
    preflight.check_server(stack.uri)
    argv = ["sweep", str(MINI), "--tracking-uri", stack.uri, "--storage-path", str(tmp_path / "storage")]
    with every_connection_taken(stack.postgres) as held:
        assert held > 0
        code, err = sweep_cli(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert (
        f"the MLflow server at {stack.uri} runs out of database connections" in err[0] and "max_connections" in err[0]
    ), err
    assert "infra/mlflow/README.md" in err[0]
    preflight.check_server(stack.uri)  # connections back: the server recovers by itself
    assert connections(stack.postgres) > 0


def test_a_sweep_stops_in_one_line_when_the_bucket_is_missing(stack: TrackingStack, bucket: S3Store, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # A second server on the same database, one worker is enough
    settings = dataclasses.replace(stack.settings, workers=1)
    missing = mlflow_server(
        stack.postgres.uri(),
        "s3://loraland-no-such-bucket/artifacts",
        free_port(),
        tmp_path / "mlflow.log",
        settings,
        s3_server_env(bucket.env),
    )
    missing.start()
    try:
        code, err = sweep_cli(
            ["sweep", str(MINI), "--tracking-uri", missing.uri, "--storage-path", str(tmp_path / "storage")], capsys
        )
    finally:
        missing.stop()
    assert code == 2 and len(err) == 1, err
    assert f"the MLflow server at {missing.uri} cannot store artifacts" in err[0] and "create the bucket" in err[0], err
