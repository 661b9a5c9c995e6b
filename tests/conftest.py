"""Test-wide rules and the fixtures shared by several test files.

Tiers (markers declared in pyproject.toml): every test carries exactly one of `unit`, `integration`, `cluster`
(collection fails otherwise, naming the tests); `gpu` is added on top and skips without CUDA. `make test-fast` runs
`-m unit`, `make test` every tier.

Session fixtures: `mlflow_server` (a real `mlflow server`), `tiny_sweep` (a tracked 2 x 2 sweep on it), `s3_server` (a
moto S3 server); `s3_store` is that store with the AWS variables set for one test. Their helper classes live in
tests/tracking_fixtures.py and tests/object_store.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cache

import pytest

# The whole run is offline: any process a test starts (drivers, Ray workers, `mlflow server`) inherits these, and a
# tiny model or dataset may be loaded by any of them at any time, so they cannot be scoped to one test. Nothing else
# is set here; a test that needs another variable sets it with `monkeypatch`.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest.register_assert_rewrite("tests.helpers", "tests.object_store", "tests.tracking_fixtures")

from tests.object_store import S3Store  # noqa: E402  (after the rewrite registration above)
from tests.tracking_fixtures import BASES, SWEEP, TASKS, Server, Sweep, TrackedJob, tiny_config  # noqa: E402

TIERS = ("unit", "integration", "cluster")
LEGACY_SLOW = "slow"  # the old "not unit" marker: kept in step with the tiers until no test uses it
MLFLOW_START_TIMEOUT_S = (
    240.0  # `mlflow server` alone starts in 8-12 s; a 2-core machine shared by many runs needs minutes
)


# --------------------------------------------------------------------------- tiers


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the markers added here must count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test has exactly one tier (else a usage error listing the tests); `slow` alone counts as `integration` and
    every test above `unit` is also `slow`, so `-m "not slow"` still means unit; `gpu` tests skip without CUDA."""
    wrong = []
    for item in items:
        tiers = tier_markers(item)
        if LEGACY_SLOW in marker_names(item) and not tiers:
            item.add_marker(pytest.mark.integration)
            tiers = ["integration"]
        if len(tiers) != 1 or (tiers == ["unit"] and LEGACY_SLOW in marker_names(item)):
            wrong.append(
                f"{item.nodeid}: {', '.join(tiers) or 'no tier'}"
                + (" + slow" if LEGACY_SLOW in marker_names(item) else "")
            )
        elif tiers != ["unit"] and LEGACY_SLOW not in marker_names(item):
            item.add_marker(pytest.mark.slow)
        if "gpu" in marker_names(item) and not cuda_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)"))
    if wrong:
        raise pytest.UsageError(f"{len(wrong)} tests need exactly one tier marker of {', '.join(TIERS)} "
                                "(see pyproject.toml):\n  " + "\n  ".join(wrong))


def marker_names(item: pytest.Item) -> set[str]:
    """The names of every marker on a test (its own, its class's, its module's)."""
    return {mark.name for mark in item.iter_markers()}


def tier_markers(item: pytest.Item) -> list[str]:
    """The tiers among a test's markers, in TIERS order."""
    names = marker_names(item)
    return [tier for tier in TIERS if tier in names]


@cache
def cuda_available() -> bool:
    """torch sees a CUDA device (imported only when a `gpu` test is collected)."""
    import torch

    return bool(torch.cuda.is_available())


# --------------------------------------------------------------------------- tracking


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real `mlflow server` on a free 127.0.0.1 port, SQLite file and artifact folder in a temporary directory, for
    the whole session (it takes 8-12 s to start); its process tree is stopped at the end."""
    from core.ports import free_port
    from tracking.server import server_command, start_server, stop_server, wait_healthy

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = server_command(f"sqlite:///{root / 'mlflow.db'}", "127.0.0.1", port, workers=2,
                             artifacts_destination=root / "artifacts")
    process = start_server(command, f"http://127.0.0.1:{port}", log_file=root / "server.log", wait=False)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", MLFLOW_START_TIMEOUT_S, process)
        yield Server(f"http://127.0.0.1:{port}", port, root)
    finally:
        stop_server(process)


@pytest.fixture(scope="session")
def tiny_sweep(mlflow_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """A real 2 x 2 sweep (tiny-llama, tiny-mistral x demo_sentiment, demo_colors), tracked as workers track it: for
    each pair an evaluate_base job, then a train job (so the lift is known), each run by `jobs.run.run_job`."""
    from jobs.run import run_job
    from tracking import store
    from tracking.tracker import JobTracker

    uri = mlflow_server.uri
    experiment_id = store.ensure_experiment(SWEEP, uri)
    parent = store.start_sweep_run(experiment_id, SWEEP, {"base_models": list(BASES), "tasks": list(TASKS),
                                                          "training": {"max_steps": 10, "learning_rate": 0.01}}, uri)
    sweep = Sweep(uri, SWEEP, experiment_id, parent)
    out = tmp_path_factory.mktemp("jobs")
    for base in BASES:
        for task in TASKS:
            for kind in ("evaluate_base", "train"):
                config = tiny_config(out, base, task, kind)
                tracker = JobTracker.for_job(config, experiment_id, parent, uri=uri, system_metrics_interval_s=1.0,
                                             flush_interval_s=1.0)
                with tracker:
                    result = run_job(config, on_step=tracker.on_step)
                    tracker.finish(result)
                sweep.jobs[(kind, base, task)] = TrackedJob(config, result, tracker.run_id, tracker.model_version)
    store.finish_sweep_run(parent, uri=uri)
    return sweep


# --------------------------------------------------------------------------- object store


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Store]:
    """A bucket on a moto S3 server (a real HTTP endpoint speaking the S3 API) at 127.0.0.1, for the whole session.
    It changes no environment variable: `S3Store.env` holds what a client needs."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Store.create(f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_store(s3_server: S3Store, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    """The session's S3 store, with the standard AWS variables pointing this process at it for one test (pyarrow and
    the jobs read them; pass `s3_store.env` to child processes)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server
