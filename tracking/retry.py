"""Retries with exponential back-off around tracking calls, so a tracking server that is briefly
unreachable (restart, network blip, SQLite lock) drops nothing.

Two layers protect a call to an http(s) server: MLflow's own HTTP session retries connection
errors and 408/429/5xx answers (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, default 7, back-off factor 2:
sleeps of 0, 4, 8, 16, 32, 64 and 120 s, about 4 min per call); `retrying` then retries whatever
still comes out as a transient error (connection refused after those retries, a locked SQLite file
with the embedded store, timeouts, a unique-constraint race inside the server's get-or-create of a
dataset or a model version).
Errors that would fail again (bad parameter, missing resource, already exists) are raised at once.

The budget: this layer alone rides out an outage of `budget_s()` seconds (10 attempts, 0.5 s
doubling up to 20 s: 91.5 s planned, at least 68 s with the jitter at its lowest), so a server
restart of up to a minute (`mlflow server` needs 7-12 s to answer again) drops nothing even where
MLflow's HTTP retries are turned off or lowered; with them on, each attempt waits out minutes by
itself. Against a server that stays down a worker's call therefore gives up only after
attempts x ~4 min: the driver and the CLI check `tracking.store.check_reachable` first, so a wrong
or dead tracking URI fails in seconds there instead.

Only wrap calls that are safe to repeat; `tracking` makes its non-idempotent steps (create a run,
create a model version) look-up-then-create so that a retry after a lost reply creates nothing twice.

Where waiting out an outage is the wrong answer, neither layer is used: the sweep lease's heartbeat
(`tracking.lease`) must succeed within seconds or not at all, so each of its calls is one request through
MLflow's `http_request` with `max_retries=0` and a timeout of `LeaseTiming.call_timeout_s` (5 s), and the
next beat is its retry.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import tenacity

log = logging.getLogger(__name__)

T = TypeVar("T")

ATTEMPTS = int(os.environ.get("LORALAND_TRACKING_RETRIES", "10"))
BASE_DELAY_S = float(os.environ.get("LORALAND_TRACKING_BACKOFF_S", "0.5"))
MAX_DELAY_S = 20.0
JITTER = 0.25  # each sleep is its planned delay times 1 +- JITTER

# Substrings of error messages that mean "try again later", whatever the exception type.
TRANSIENT_MARKERS = (
    "database is locked", "connection refused", "connection reset", "connection aborted", "max retries exceeded",
    "temporarily unavailable", "timed out", "timeout", "remote end closed", "bad gateway", "service unavailable",
    "failed to establish a new connection", "broken pipe", "too many requests",
    # The server's get-or-create (datasets, tags) raced another writer; the next attempt finds the row.
    "unique constraint failed", "duplicate key value violates unique constraint",
    # Concurrent registrations of one model took the same version number more times than the server retries.
    "model version creation error",
)
TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"})


def is_transient(error: BaseException) -> bool:
    """True for errors that a later attempt may not hit: the network, the server restarting, a lock."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if getattr(error, "error_code", None) in TRANSIENT_CODES:
        return True
    text = f"{type(error).__name__}: {error}".lower()
    return any(marker in text for marker in TRANSIENT_MARKERS)


def backoff_delays(attempts: int = ATTEMPTS, base_s: float = BASE_DELAY_S, max_s: float = MAX_DELAY_S) -> list[float]:
    """The sleeps between `attempts` tries: base, 2 base, 4 base, ... capped at `max_s` (before jitter)."""
    return [min(base_s * 2**i, max_s) for i in range(max(attempts - 1, 0))]


def budget_s(attempts: int = ATTEMPTS, base_s: float = BASE_DELAY_S, max_s: float = MAX_DELAY_S) -> float:
    """The shortest outage that makes `call_with_retry` give up: every sleep with the jitter at its lowest."""
    return sum(backoff_delays(attempts, base_s, max_s)) * (1 - JITTER)


def jittered_backoff(
    base_s: float = BASE_DELAY_S, max_s: float = MAX_DELAY_S
) -> Callable[[tenacity.RetryCallState], float]:
    """A tenacity wait: after attempt n, `backoff_delays`' n-th sleep times 1 +- JITTER."""

    def wait(state: tenacity.RetryCallState) -> float:
        return min(base_s * 2 ** (state.attempt_number - 1), max_s) * random.uniform(1 - JITTER, 1 + JITTER)

    return wait


def _log_retry(state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    delay = state.next_action.sleep if state.next_action else 0.0
    log.warning("tracking call %s failed (%s); retry %d in %.1fs", getattr(state.fn, "__name__", state.fn),
                str(error).splitlines()[0][:200] if error else "", state.attempt_number, delay)


def call_with_retry(fn: Callable[..., T], *args: Any, attempts: int = ATTEMPTS, base_s: float = BASE_DELAY_S,
                    max_s: float = MAX_DELAY_S, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, retried on transient errors (`is_transient`) with exponential back-off (+-JITTER), at most
    `attempts` tries; a final error, or the last attempt's, is raised as it is."""
    retrying_call = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(max(attempts, 1)), wait=jittered_backoff(base_s, max_s),
        retry=tenacity.retry_if_exception(is_transient), reraise=True, before_sleep=_log_retry,
        sleep=lambda seconds: time.sleep(seconds))  # looked up per call, so a test can replace `time.sleep`
    return retrying_call(fn, *args, **kwargs)


def retrying(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: every call of `fn` goes through `call_with_retry` with the module defaults."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return call_with_retry(fn, *args, **kwargs)

    return wrapper
