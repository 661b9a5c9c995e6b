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

Each request goes through MLflow's own client code (`mlflow.utils.rest_utils.http_request`, tried once) with the
credentials MLflow's client would send (`get_default_host_creds`: MLFLOW_TRACKING_USERNAME and _PASSWORD or the
credentials file, MLFLOW_TRACKING_TOKEN, SigV4, an auth plugin, its TLS settings), so a server behind basic auth or a
token is checked as the workers will reach it; a refused credential is one line naming the variables to set. No secret
(password, token, `user:pass@` in the URI) reaches a message (`masked`, `shown_uri`), and nothing here logs.
"""

from __future__ import annotations

import base64
import contextlib
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote, urlsplit

from core.errors import Unreachable
from tracking.store import is_server_uri

CONCURRENCY = 32  # requests at once: the concurrent jobs infra/mlflow/ is sized and tested for
TIMEOUT_S = 15.0
SEARCHES = ("/api/2.0/mlflow/experiments/search", "/api/2.0/mlflow/registered-models/search")
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
CONNECTION_LIMIT_MARKERS = ("too many clients", "remaining connection slots", "queuepool limit", "too many connections")
NOT_PROXIED_MARKER = "--no-serve-artifacts"
CREDENTIALS_FIX = (
    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic auth) or MLFLOW_TRACKING_TOKEN (a bearer token) "
    "to credentials the server accepts, for the driver and the workers alike"
)
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


Request = Callable[..., Any]  # (endpoint, method, **requests' keywords) -> requests.Response; raises on no answer


def check_server(uri: str, concurrency: int = CONCURRENCY, timeout_s: float = TIMEOUT_S) -> None:
    """The credentials, then both checks, against the tracking server at `uri` (one that answers `/health`:
    `store.check_reachable`), nothing for a local store; a one-line Unreachable naming the fix when one fails."""
    if not is_server_uri(uri):
        return
    request, secrets = mlflow_client_request(uri.rstrip("/"), timeout_s)
    shown = shown_uri(uri.rstrip("/"))
    try:
        check_credentials(request, shown)
        check_database_connections(request, shown, concurrency)
        check_artifact_store(request, shown)
    except Unreachable as error:  # the server may echo what it was sent: no secret leaves in the message
        raise Unreachable(masked(str(error), secrets)) from None


def mlflow_client_request(uri: str, timeout_s: float) -> tuple[Request, list[str]]:
    """A request to the server at `uri` as MLflow's client makes it (its credentials, headers and TLS settings; no
    retries; at most `timeout_s`), and the secrets it may carry (for `masked`)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    parts = urlsplit(uri)  # requests sends a URI's `user:password@` as basic auth
    pairs = [(creds.username, creds.password), (unquote(parts.username or ""), unquote(parts.password or ""))]
    basic = [base64.standard_b64encode(f"{user}:{password}".encode()).decode() for user, password in pairs if password]
    secrets = [secret for secret in (creds.password, creds.token, *[password for _, password in pairs], *basic)
               if secret]

    def request(endpoint: str, method: str, **kwargs: Any) -> Any:
        return http_request(creds, endpoint, method, max_retries=0, backoff_factor=0, timeout=timeout_s,
                            raise_on_status=False, **kwargs)

    return request, secrets


def check_credentials(request: Request, uri: str) -> None:
    """One search answers other than 401 or 403; else Unreachable naming the credential variables."""
    path = SEARCHES[0]
    try:
        response = request(path, "GET", params={"max_results": 1})
    except Exception:  # MlflowException around requests' error, no answer: the checks below say more
        return
    if response.status_code in (401, 403):
        given = response.request.headers.get("Authorization")
        problem = "refused the credentials MLflow sends" if given else "asks for credentials and none are set"
        raise Unreachable(f"the MLflow server at {uri} {problem} ({_answer(response)}); {CREDENTIALS_FIX}")


def check_database_connections(request: Request, uri: str, concurrency: int = CONCURRENCY) -> None:
    """`concurrency` searches at once all answer; else Unreachable naming the database's connection limit."""
    paths = [SEARCHES[i % len(SEARCHES)] for i in range(concurrency)]
    with ThreadPoolExecutor(concurrency) as pool:
        problems = [problem for problem in pool.map(lambda path: _search_problem(request, path), paths) if problem]
    if not problems:
        return
    at_limit = [
        problem for problem in problems if any(marker in problem.lower() for marker in CONNECTION_LIMIT_MARKERS)
    ]
    detail = (at_limit or problems)[0]
    cause = "runs out of database connections" if at_limit else "cannot reach its database in time"
    raise Unreachable(f"the MLflow server at {uri} {cause}: {len(problems)} of {concurrency} requests at once failed "
                      f"({detail}); {CONNECTIONS_FIX}")


def check_artifact_store(request: Request, uri: str) -> None:
    """A probe file goes through the server's artifact proxy into its store (and is deleted); else Unreachable."""
    path = f"{ARTIFACTS}/loraland-preflight/{uuid.uuid4().hex}.txt"
    try:
        response = request(path, "PUT", data=b"written by `loraland sweep` to check the artifact store; delete it\n")
    except Exception as error:  # MlflowException around requests' error: no answer
        raise Unreachable(
            f"the MLflow server at {uri} did not take a test artifact ({_describe(error)}); {ARTIFACTS_FIX}"
        ) from None
    if response.ok:
        with contextlib.suppress(Exception):  # a probe left behind is harmless
            request(path, "DELETE")
        return
    if NOT_PROXIED_MARKER in response.text:
        return
    raise Unreachable(
        f"the MLflow server at {uri} cannot store artifacts (a test upload through it got {_answer(response)}; "
        f"its log names the cause); {ARTIFACTS_FIX}"
    )


def shown_uri(uri: str) -> str:
    """`uri` without a `user:password@` part, for messages."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


def masked(text: str, secrets: list[str]) -> str:
    """`text` with each of `secrets` shown as ***."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _search_problem(request: Request, path: str) -> str | None:
    """None when one search at `path` answers 2xx, else what went wrong, in one line."""
    try:
        # a new connection each (no keep-alive), so they spread over the server's workers and their pools
        response = request(path, "GET", params={"max_results": 1}, extra_headers={"Connection": "close"})
    except Exception as error:  # MlflowException around requests' error: no answer
        return _describe(error)
    return None if response.ok else _answer(response)


def _answer(response: Any) -> str:
    """`HTTP <status>: <MLflow's message>` on one line, shortened."""
    try:
        message = str(response.json().get("message", ""))
    except ValueError:
        message = response.text
    return _one_line(f"HTTP {response.status_code}: {message}")


def _describe(error: BaseException) -> str:
    """A request that got no answer, in one line: requests' own error (MLflow wraps it), not the wrapper's URL."""
    cause = error.__context__ or error
    return _one_line(f"{type(cause).__name__}: {cause}" if str(cause) else f"{type(cause).__name__} after the timeout")


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]
