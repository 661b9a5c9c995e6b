"""Where runs are logged, and the driver-side bookkeeping: experiments, the sweep's parent run, job runs.

Tracking URI, in order: an explicit `uri`, `$MLFLOW_TRACKING_URI`, else the embedded default
`sqlite:///<data_home()>/mlflow.db` with artifacts in `<data_home()>/mlartifacts` (one machine;
`loraland ui` opens it). On a cluster, an http(s):// tracking server (started with
`--artifacts-destination`, so workers upload artifacts through it).

Layout: one experiment per sweep, created by the driver only (`ensure_experiment`; many workers
calling `mlflow.set_experiment` at once can put runs in Default, mlflow/mlflow#12259); a parent
run per sweep (`start_sweep_run`); a child run per job, found by its `loraland.job_key` tag so a
retried job reuses its run instead of duplicating it (`find_job_run`). Every call goes through
`tracking.retry`. Workers log through `tracking.tracker.JobTracker`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from core.errors import NotFound, Unreachable
from core.paths import data_home
from tracking.retry import call_with_retry, retrying
from tracking.server import wait_healthy

log = logging.getLogger(__name__)

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# Artifact paths inside a job's run (written by tracking.tracker, read by tracking.registry and serving).
ADAPTER_ARTIFACT = "adapter"
PREDICTIONS_FILE = "predictions.json"
NOTE_TAG = "mlflow.note.content"  # MLflow's own: the description the UI shows for an experiment or a run

# Tags every loraland run carries (keys with dots need backticks in search filters).
TAG_ROLE = "loraland.role"  # "sweep" (parent run) or "job" (child run)
TAG_SWEEP = "loraland.sweep"
TAG_JOB_KEY = "loraland.job_key"
TAG_KIND = "loraland.kind"  # train | evaluate_base
TAG_BASE_MODEL = "loraland.base_model"
TAG_TASK = "loraland.task"
TAG_CATEGORY = "loraland.category"
TAG_METRIC = "loraland.metric"
TAG_ERROR = "loraland.error"
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: nests child runs under the parent in the UI

MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
REACHABLE_WAIT_S = 20.0  # default of `check_reachable`; `$LORALAND_TRACKING_WAIT_S` overrides it


# --------------------------------------------------------------------------- where


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI: `uri`, else `$MLFLOW_TRACKING_URI`, else SQLite in the data folder. Creates nothing."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{data_home() / DB_FILE}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def prepare_store(uri: str) -> None:
    """Make the folder of a SQLite store (SQLite makes the file, not its folder); nothing for a server. Called before
    anything that may write, never by read-only commands."""
    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def is_server_uri(uri: str) -> bool:
    """True for an http(s) tracking server (which stores artifacts itself)."""
    return urlparse(uri).scheme in ("http", "https")


def check_reachable(uri: str | None = None, timeout_s: float | None = None, existing: bool = False) -> str:
    """The resolved tracking URI, once an http(s) server there answers `/health` (polled for `timeout_s`,
    default `$LORALAND_TRACKING_WAIT_S` or 20 s; a SQLite store needs no server). A one-line Unreachable
    naming the URI otherwise: call it before anything else that talks to the server (a dead or wrong URI
    would keep every tracking call retrying for minutes). With `existing` (read-only commands), a SQLite
    store that does not exist yet is a one-line NotFound, and nothing is created."""
    resolved = resolve_tracking_uri(uri)
    path = sqlite_path(resolved)
    if existing and path is not None and not path.is_file():
        raise NotFound(f"no MLflow store at {path}: nothing has been tracked there yet (run a sweep first, or pass "
                       "--tracking-uri / set MLFLOW_TRACKING_URI to the store you mean)")
    if not is_server_uri(resolved):
        return resolved
    wait = timeout_s if timeout_s is not None else float(os.environ.get("LORALAND_TRACKING_WAIT_S", REACHABLE_WAIT_S))
    try:
        wait_healthy(resolved.rstrip("/"), wait)
    except TimeoutError:
        raise Unreachable(f"no MLflow tracking server answers at {resolved} (waited {wait:.0f}s): start it, or pass "
                          "--tracking-uri / set MLFLOW_TRACKING_URI to a running one") from None
    return resolved


def artifact_root(uri: str) -> str | None:
    """Where new experiments keep artifacts: `<db folder>/mlartifacts` for a SQLite store (not
    MLflow's default `./mlruns` in whatever folder the process happens to run in); the server's
    choice (None) for an http(s) server."""
    path = sqlite_path(uri)
    return (path.resolve().parent / ARTIFACTS_DIR).as_uri() if path is not None else None


def client(uri: str | None = None) -> MlflowClient:
    """An MlflowClient for the resolved URI, used for runs and the registry alike (one per URI). A SQLite store
    (and its folder) is created on first use: read-only commands call `check_reachable(existing=True)` first."""
    return _client(resolve_tracking_uri(uri))


@lru_cache(maxsize=16)
def _client(uri: str) -> MlflowClient:
    prepare_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# --------------------------------------------------------------------------- values


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys: {"lora": {"r": 8}} -> {"lora.r": 8}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def encode_param(value: Any) -> str:
    """A param value as MLflow stores it: strings as they are, anything else as JSON (true, 0.01, ["q_proj"])."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_PARAM_LENGTH]


def decode_param(text: str) -> Any:
    """The inverse of `encode_param` (a plain string stays a string; one that reads as JSON, like "8"
    or "true", comes back as that value, which is what the typed configs expect anyway)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def log_params(run_id: str, params: Mapping[str, Any], uri: str | None = None) -> None:
    """Log (nested or flat) params in batches of 100; logging the same value again is a no-op."""
    items = [Param(key, encode_param(value)) for key, value in flatten(params).items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        call_with_retry(client(uri).log_batch, run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])


def log_metrics(run_id: str, metrics: Iterable[Metric], uri: str | None = None) -> None:
    """Log metrics in batches of 1000, each batch retried."""
    items = list(metrics)
    for start in range(0, len(items), MAX_METRICS_PER_BATCH):
        call_with_retry(client(uri).log_batch, run_id, metrics=items[start:start + MAX_METRICS_PER_BATCH])


def metric(key: str, value: float, step: int = 0, timestamp_ms: int | None = None) -> Metric:
    """One metric value (timestamp now unless given)."""
    return Metric(key, float(value), timestamp_ms if timestamp_ms is not None else int(time.time() * 1000), int(step))


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def tag_filter(**tags: str) -> str:
    """A search filter on loraland tags: tag_filter(job_key="a") -> "tags.`loraland.job_key` = 'a'"."""
    return " and ".join(f"tags.`loraland.{key}` = {_quote(value)}" for key, value in tags.items())


def search_all_runs(experiment_id: str, filter_string: str = "", uri: str | None = None) -> list[Run]:
    """Every (not deleted) run of the experiment matching the filter, oldest first, all pages (retried)."""
    return call_with_retry(_search_all_runs, client(uri), experiment_id, filter_string)


def _search_all_runs(mlflow_client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = mlflow_client.search_runs([experiment_id], filter_string, ViewType.ACTIVE_ONLY, 1000,
                                         ["attributes.start_time ASC"], token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def pick_run(runs: list[Run]) -> Run | None:
    """Of several runs of one thing (oldest first): the latest FINISHED one, else the latest, else None."""
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return (finished or runs)[-1] if runs else None


def find_or_create_run(experiment_id: str, filter_string: str, run_name: str, tags: Mapping[str, str],
                       uri: str | None = None) -> tuple[Run, bool]:
    """The run matching `filter_string` (see `pick_run`), or a new one; (run, created). Retried as one
    step, so a retry after a lost reply finds the run the first attempt created instead of making a second."""

    def attempt() -> tuple[Run, bool]:
        mlflow_client = client(uri)
        found = pick_run(_search_all_runs(mlflow_client, experiment_id, filter_string))
        if found is not None:
            return found, False
        return mlflow_client.create_run(experiment_id, run_name=run_name, tags=dict(tags)), True

    return call_with_retry(attempt)


# --------------------------------------------------------------------------- driver side


@retrying
def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The id of the experiment `name`, created if missing (driver only, never from workers)."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_root(resolve_tracking_uri(uri)))
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        created = mlflow_client.get_experiment_by_name(name)
        if created is None:  # created by another driver, then deleted at once: a later attempt creates it again
            raise MlflowException(f"experiment {name} vanished while being created", TEMPORARILY_UNAVAILABLE) from error
        return created.experiment_id


def experiment_id_for(name_or_id: str, uri: str | None = None) -> str:
    """An experiment id from a name (or an id, returned as it is when it exists); NotFound otherwise."""
    mlflow_client = client(uri)
    found = call_with_retry(mlflow_client.get_experiment_by_name, name_or_id)
    if found is not None:
        return found.experiment_id
    try:
        return call_with_retry(mlflow_client.get_experiment, name_or_id).experiment_id
    except MlflowException:
        raise NotFound(f"no MLflow experiment named {name_or_id!r} at {resolve_tracking_uri(uri)}") from None


def find_sweep_run(experiment_id: str, sweep_name: str | None = None, uri: str | None = None) -> Run | None:
    """The sweep's parent run (see `pick_run`), or None."""
    tags = {"role": "sweep"} | ({"sweep": sweep_name} if sweep_name else {})
    return pick_run(search_all_runs(experiment_id, tag_filter(**tags), uri))


def start_sweep_run(experiment_id: str, sweep_name: str, params: Mapping[str, Any] | None = None,
                    uri: str | None = None) -> str:
    """The sweep's parent run id: the existing one (found by tag, so a re-submitted driver reuses it,
    set RUNNING again) or a new one; `params` (nested dicts are flattened) are logged.

    A re-submitted sweep whose params changed keeps the first values (MLflow params are immutable)."""
    run, created = find_or_create_run(experiment_id, tag_filter(role="sweep", sweep=sweep_name), sweep_name,
                                      {TAG_ROLE: "sweep", TAG_SWEEP: sweep_name}, uri)
    if not created and run.info.status != "RUNNING":
        call_with_retry(client(uri).update_run, run.info.run_id, "RUNNING")
    try:
        log_params(run.info.run_id, params or {}, uri)
    except MlflowException as error:
        if error.error_code != "INVALID_PARAMETER_VALUE":
            raise
        log.warning("sweep %s: params differ from the first submission; kept the first (%s)", sweep_name, error)
    return run.info.run_id


def describe(experiment_id: str, run_id: str | None, text: str, uri: str | None = None) -> None:
    """Set the description (MLflow's note, Markdown, shown by the UI) of the experiment and, when given, of the run."""
    call_with_retry(client(uri).set_experiment_tag, experiment_id, NOTE_TAG, text)
    if run_id is not None:
        call_with_retry(client(uri).set_tag, run_id, NOTE_TAG, text)


def finish_sweep_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    """End the sweep's parent run (FINISHED, FAILED or KILLED)."""
    call_with_retry(client(uri).set_terminated, run_id, status)


def find_job_run(experiment_id: str, job_key: str, uri: str | None = None) -> Run | None:
    """The run of a job (by its `loraland.job_key` tag): the latest FINISHED one if any, else the latest."""
    return pick_run(search_all_runs(experiment_id, tag_filter(job_key=job_key), uri))


def job_runs(experiment_id: str, uri: str | None = None, status: str | None = None) -> list[Run]:
    """Every job (child) run of the experiment, oldest first, optionally only those with `status`."""
    runs = search_all_runs(experiment_id, tag_filter(role="job"), uri)
    return [r for r in runs if status is None or r.info.status == status]


def find_base_score(experiment_id: str, base_model: str, task: str, uri: str | None = None) -> float | None:
    """The score of the finished `evaluate_base` job of (base model, task), or None if there is none yet."""
    runs = search_all_runs(experiment_id, tag_filter(kind="evaluate_base", base_model=base_model, task=task), uri)
    scores = [r.data.metrics["score"] for r in runs if r.info.status == "FINISHED" and "score" in r.data.metrics]
    return scores[-1] if scores else None


def close_stale_runs(
    experiment_id: str,
    job_keys: Iterable[str] | None = None,
    reason: str = "worker lost: run left RUNNING",
    uri: str | None = None,
    reasons: Mapping[str, str] | None = None,
) -> list[str]:
    """Mark RUNNING job runs FAILED (a worker killed by SIGKILL never ends its run); returns their ids.

    The driver calls this for jobs it knows are not running (Ray reported the worker dead, at the start of a resumed
    sweep before any worker starts, or once it gave up on a job): with `job_keys` None every RUNNING job run of the
    experiment is closed. `reasons` gives a job key its own error tag instead of `reason`.
    """
    wanted = set(job_keys) if job_keys is not None else None
    closed = []
    for run in job_runs(experiment_id, uri, status="RUNNING"):
        key = run.data.tags.get(TAG_JOB_KEY)
        if wanted is not None and key not in wanted:
            continue
        why = (reasons or {}).get(key or "", reason)
        call_with_retry(client(uri).log_batch, run.info.run_id, tags=[RunTag(TAG_ERROR, why[:5000])])
        call_with_retry(client(uri).set_terminated, run.info.run_id, "FAILED")
        closed.append(run.info.run_id)
    return closed
