"""What the sweep driver checks of an http(s) tracking server before anything runs, so that a server that would fail
under the sweep fails now, in one line naming the fix, instead of as minutes of retries in every worker
(`tracking.retry` takes these answers for a server that is restarting).

- Database connections: `concurrency` API requests at once (experiment and registered-model searches: they use two of
  the up to 3 connection pools each worker of the server keeps, for runs, the registry and one MLflow opens as needed).
  An answer naming the database's connection limit (PostgreSQL's "too many clients", SQLAlchemy's "QueuePool limit"),
  or no answer within `timeout_s`, means the server's pools outgrow its database.
- Artifacts: a small file uploaded through the server's artifact proxy (`--serve-artifacts`), then deleted. A server
  error means the store behind it refuses: a missing bucket, wrong credentials or endpoint. A server that does not
  proxy artifacts is not checked (workers then write to the store themselves).

Plain HTTP to MLflow's REST API (httpx), each request tried once.
"""

from __future__ import annotations

import contextlib
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx

from core.errors import Unreachable
from tracking.store import is_server_uri

CONCURRENCY = 32  # requests at once: the concurrent jobs infra/mlflow/ is sized and tested for
TIMEOUT_S = 15.0
SEARCHES = ("/api/2.0/mlflow/experiments/search", "/api/2.0/mlflow/registered-models/search")
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
CONNECTION_LIMIT_MARKERS = ("too many clients", "remaining connection slots", "queuepool limit", "too many connections")
NOT_PROXIED_MARKER = "--no-serve-artifacts"
CONNECTIONS_FIX = (
    "raise the database's max_connections above what the server's pools may open (--workers x 3 x "
    "(MLFLOW_SQLALCHEMYSTORE_POOL_SIZE + MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW)) or lower those; see "
    "infra/mlflow/README.md"
)
ARTIFACTS_FIX = (
    "create the bucket its --artifacts-destination names, and check the object-store endpoint and credentials "
    "the server runs with (MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); see "
    "infra/mlflow/README.md"
)


def check_server(uri: str, concurrency: int = CONCURRENCY, timeout_s: float = TIMEOUT_S) -> None:
    """Both checks against the tracking server at `uri` (one that answers `/health`: `store.check_reachable`), nothing
    for a local store; a one-line Unreachable naming the fix when one fails."""
    if not is_server_uri(uri):
        return
    base = uri.rstrip("/")
    check_database_connections(base, concurrency, timeout_s)
    check_artifact_store(base, timeout_s)


def check_database_connections(uri: str, concurrency: int = CONCURRENCY, timeout_s: float = TIMEOUT_S) -> None:
    """`concurrency` searches at once all answer; else Unreachable naming the database's connection limit."""
    paths = [SEARCHES[i % len(SEARCHES)] for i in range(concurrency)]
    # One connection each, spread over workers
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    with httpx.Client(base_url=uri, timeout=timeout_s, limits=limits) as http, ThreadPoolExecutor(concurrency) as pool:
        problems = [problem for problem in pool.map(lambda path: _search_problem(http, path), paths) if problem]
    if not problems:
        return
    at_limit = [
        problem for problem in problems if any(marker in problem.lower() for marker in CONNECTION_LIMIT_MARKERS)
    ]
    detail = (at_limit or problems)[0]
    cause = "runs out of database connections" if at_limit else "cannot reach its database in time"
    raise Unreachable(f"the MLflow server at {uri} {cause}: {len(problems)} of {concurrency} requests at once failed "
                      f"({detail}); {CONNECTIONS_FIX}")


def check_artifact_store(uri: str, timeout_s: float = TIMEOUT_S) -> None:
    """A probe file goes through the server's artifact proxy into its store (and is deleted); else Unreachable."""
    path = f"{ARTIFACTS}/loraland-preflight/{uuid.uuid4().hex}.txt"
    with httpx.Client(base_url=uri, timeout=timeout_s) as http:
        try:
            response = http.put(
                path, content=b"written by `loraland sweep` to check the artifact store; safe to delete\n"
            )
        except httpx.HTTPError as error:
            raise Unreachable(
                f"the MLflow server at {uri} did not take a test artifact ({_describe(error)}); {ARTIFACTS_FIX}"
            ) from None
        if response.is_success:
            with contextlib.suppress(httpx.HTTPError):  # a probe left behind is harmless
                http.delete(path)
            return
    if NOT_PROXIED_MARKER in response.text:
        return
    raise Unreachable(
        f"the MLflow server at {uri} cannot store artifacts (a test upload through it got {_answer(response)}; "
        f"its log names the cause); {ARTIFACTS_FIX}"
    )


def _search_problem(http: httpx.Client, path: str) -> str | None:
    """None when one search at `path` answers 2xx, else what went wrong, in one line."""
    try:
        response = http.get(path, params={"max_results": 1})
    except httpx.HTTPError as error:
        return _describe(error)
    return None if response.is_success else _answer(response)


def _answer(response: httpx.Response) -> str:
    """`HTTP <status>: <MLflow's message>` on one line, shortened."""
    try:
        message = str(response.json().get("message", ""))
    except ValueError:
        message = response.text
    return _one_line(f"HTTP {response.status_code}: {message}")


def _describe(error: httpx.HTTPError) -> str:
    return _one_line(f"{type(error).__name__}: {error}" if str(error) else f"{type(error).__name__} after the timeout")


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]
