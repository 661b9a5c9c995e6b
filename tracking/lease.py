"""The sweep lease: one driver at a time submits a sweep's jobs, and a driver that lost the sweep stops submitting.

Two records on the sweep's parent run:
- the claim, params `loraland.lease.<epoch>` = a driver's token. MLflow never changes a param's value (the params
  table's key is (run, key): a second value is refused with INVALID_PARAMETER_VALUE, on SQLite, PostgreSQL and a
  server alike), so of two drivers claiming epoch n+1 at once exactly one succeeds: a compare-and-set, the only one
  MLflow's API offers (a tag is last-writer-wins). The holder is the token of the highest epoch; one param per claim.
- the heartbeat, tag `loraland.driver` = {epoch, token, host, pid, beat, released}, rewritten by the holder every
  `heartbeat_s` with beat + 1. It says who is alive, never who holds the sweep (a late write of a former holder may
  overwrite it; the params decide).

Fencing, with no clock of another host trusted:
- The holder renews by reading the params (a higher epoch: another driver took the sweep over) then writing the tag.
  Each call is one HTTP request with a `call_timeout_s` timeout and none of MLflow's own retries (minutes); a missed
  beat is retried at the next one. A holder whose last successful renewal *began* `renew_s` ago, by its own monotonic
  clock, has lost the sweep too. Lost is for good: `check()` then raises LeaseLost, one line; the scheduler calls it
  before each submission and on every step, so the driver stops and its Ray tasks end with it.
- Another driver judges the holder gone only by its own monotonic clock: the tag unchanged for `stale_s` while it
  watches. The tag it saw was written after the holder's renewal began, and `renew_s < stale_s`, so the holder has
  stopped submitting before the watcher may claim. On one host (same hostname, boot and PID namespace) a holder whose
  process is gone frees the sweep at once, and one still running is a Conflict at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil
from mlflow.exceptions import MlflowException

from core.errors import Conflict
from tracking.retry import call_with_retry
from tracking.store import client, is_server_uri, resolve_tracking_uri

log = logging.getLogger(__name__)

TAG_DRIVER = "loraland.driver"  # the holder's heartbeat (JSON)
CLAIM_PREFIX = "loraland.lease."  # + epoch: the claim params (write-once)


class LeaseLost(Conflict):
    """This driver no longer holds its sweep (another took it over, or it could not renew in time)."""


@dataclass(frozen=True)
class LeaseTiming:
    """The lease's clocks, all seconds of the observing driver's own monotonic clock."""

    heartbeat_s: float = 10.0  # the holder renews this often
    renew_s: float = 40.0  # the holder stops when no renewal that began within this succeeded
    stale_s: float = 60.0  # a watcher takes over after the heartbeat stayed unchanged this long
    call_timeout_s: float = 5.0  # one lease request (no retries: the next beat is the retry)
    watch_s: float = 1.0  # how often a watcher re-reads the heartbeat

    def __post_init__(self) -> None:
        if not self.heartbeat_s + self.call_timeout_s < self.renew_s < self.stale_s:
            raise ValueError("lease timing: need heartbeat_s + call_timeout_s < renew_s < stale_s")


class RunRecords(Protocol):
    """The three calls the lease makes on a run, each tried once."""

    def read(self, run_id: str) -> tuple[dict[str, str], dict[str, str]]: ...  # (params, tags)

    def set_tag(self, run_id: str, key: str, value: str) -> None: ...

    def log_param(self, run_id: str, key: str, value: str) -> None: ...  # INVALID_PARAMETER_VALUE if taken


class RestRecords:
    """A tracking server's REST API through MLflow's own request function (its credentials: basic auth, token), with
    `timeout_s` per request and no retries."""

    def __init__(self, uri: str, timeout_s: float) -> None:
        from mlflow.utils.credentials import get_default_host_creds

        self.creds, self.timeout_s = get_default_host_creds(uri.rstrip("/")), timeout_s

    def _call(self, endpoint: str, method: str, body: dict[str, str]) -> dict[str, Any]:
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        data = {"params": body} if method == "GET" else {"json": body}
        response = http_request(self.creds, f"/api/2.0/mlflow/{endpoint}", method, max_retries=0,
                                timeout=self.timeout_s, **data)
        return dict(verify_rest_response(response, endpoint).json())

    def read(self, run_id: str) -> tuple[dict[str, str], dict[str, str]]:
        data = self._call("runs/get", "GET", {"run_id": run_id})["run"].get("data", {})
        return ({p["key"]: p["value"] for p in data.get("params", [])},
                {t["key"]: t["value"] for t in data.get("tags", [])})

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._call("runs/set-tag", "POST", {"run_id": run_id, "key": key, "value": value})

    def log_param(self, run_id: str, key: str, value: str) -> None:
        self._call("runs/log-parameter", "POST", {"run_id": run_id, "key": key, "value": value})


class ClientRecords:
    """Any other store (SQLite on this machine) through MlflowClient, each call tried once."""

    def __init__(self, uri: str) -> None:
        self.client = client(uri)

    def read(self, run_id: str) -> tuple[dict[str, str], dict[str, str]]:
        data = self.client.get_run(run_id).data
        return dict(data.params), dict(data.tags)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def log_param(self, run_id: str, key: str, value: str) -> None:
        self.client.log_param(run_id, key, value)


def records_for(uri: str | None, timing: LeaseTiming) -> RunRecords:
    """The lease's records at the tracking URI `uri`: REST with short timeouts for a server, the client otherwise."""
    resolved = resolve_tracking_uri(uri)
    return RestRecords(resolved, timing.call_timeout_s) if is_server_uri(resolved) else ClientRecords(resolved)


def host_identity() -> str:
    """This host and PID namespace (hostname, boot id, PID namespace inode): drivers sharing it can compare PIDs."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "/".join(parts)


def process_started(pid: int) -> float | None:
    """When process `pid` of this host started (psutil), None when there is none."""
    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.Error, ValueError):  # none, not ours to see, or not a valid PID
        return None


def newest_claim(params: dict[str, str]) -> tuple[int, str | None]:
    """(highest epoch, its token) of the claim params; (0, None) when the sweep was never claimed."""
    epochs = {int(key[len(CLAIM_PREFIX):]): value for key, value in params.items()
              if key.startswith(CLAIM_PREFIX) and key[len(CLAIM_PREFIX):].isdigit()}
    return (max(epochs), epochs[max(epochs)]) if epochs else (0, None)


def who(record: dict[str, Any]) -> str:
    return f"pid {record.get('pid')} on {record.get('host')}"


class SweepLease:
    """One driver's lease on one sweep: `claim` it, `renew` it every `heartbeat_s` (`sweep_lease` runs a thread),
    `check` it before each submission, `release` it at the end. `identity`, `clock` and `sleep` are this host's
    (tests pass others to stand for drivers on other hosts)."""

    def __init__(self, run_id: str, sweep_name: str, records: RunRecords, timing: LeaseTiming = LeaseTiming(),
                 identity: str | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.run_id, self.sweep_name, self.records, self.timing = run_id, sweep_name, records, timing
        self.identity = identity or host_identity()
        self.pid_started = process_started(os.getpid())
        self.clock, self.sleep = clock, sleep
        self.token = uuid.uuid4().hex
        self.epoch, self.beat, self.renewed_at = 0, 0, 0.0
        self.lost: str | None = None
        self.last_error = "no renewal tried yet"
        self._lock = threading.Lock()

    def record(self, released: bool = False) -> str:
        """This driver's heartbeat tag value."""
        return json.dumps({"epoch": self.epoch, "token": self.token, "host": socket.gethostname(),
                           "space": self.identity, "pid": os.getpid(), "pid_started": self.pid_started,
                           "beat": self.beat, "released": released})

    def claim(self) -> None:
        """Take the sweep: at once when it is free (never claimed, released, or its holder's process on this host is
        gone), after watching its heartbeat stay unchanged for `stale_s` otherwise; a one-line Conflict when the holder
        is alive (its heartbeat moved, or its process runs here) or another driver claimed the same epoch first."""
        watched: tuple[str | None, float] | None = None  # (heartbeat seen, when first seen)
        while True:
            params, tags = call_with_retry(self.records.read, self.run_id)
            epoch, _ = newest_claim(params)
            heartbeat = tags.get(TAG_DRIVER)
            free, alive = self.judge(epoch, parse(heartbeat))
            if free:
                return self.take(epoch + 1)
            if watched is not None and watched[0] != heartbeat:
                alive = f"{who(parse(heartbeat))}: its heartbeat moved while this driver watched"
            if alive is not None:
                raise self.conflict(alive)
            if watched is None:
                watched = (heartbeat, self.clock())
            elif self.clock() - watched[1] >= self.timing.stale_s:
                return self.take(epoch + 1)
            self.sleep(self.timing.watch_s)

    def judge(self, epoch: int, record: dict[str, Any]) -> tuple[bool, str | None]:
        """(free, the holder when known to be alive) from what this host can tell without a clock: never claimed or
        released is free; a holder on this host is free when its process is gone, else alive; (False, None) is unknown
        (watch its heartbeat)."""
        if epoch == 0 or (record.get("epoch") == epoch and record.get("released")):
            return True, None
        if record.get("epoch") != epoch or record.get("space") != self.identity:
            return False, None
        if process_started(int(record.get("pid", -1))) == record.get("pid_started"):
            return False, who(record)
        return True, None

    def take(self, epoch: int) -> None:
        """Claim `epoch` (write-once) and write the first heartbeat; Conflict when another driver claimed it first."""
        started = self.clock()
        try:  # retried safely: the same value again is a no-op
            call_with_retry(self.records.log_param, self.run_id, f"{CLAIM_PREFIX}{epoch}", self.token)
        except MlflowException as error:
            if error.error_code != "INVALID_PARAMETER_VALUE":
                raise
            raise self.conflict("another driver claimed it at the same moment") from None
        self.epoch, self.renewed_at = epoch, started
        with contextlib.suppress(Exception):  # the heartbeat writes it again within heartbeat_s
            self.records.set_tag(self.run_id, TAG_DRIVER, self.record())

    def renew(self) -> None:
        """One heartbeat: the claims read (a newer one than ours: lost for good), then the tag written with beat + 1. A
        failed call is logged and left to the next beat; `check` stops the driver when none succeeds in `renew_s`."""
        if self.lost is not None:
            return
        started = self.clock()
        try:
            params, tags = self.records.read(self.run_id)
            epoch, token = newest_claim(params)
            if (epoch, token) != (self.epoch, self.token):
                self.lose(f"another driver ({who(parse(tags.get(TAG_DRIVER)))}) took it over")
                return
            self.beat += 1
            self.records.set_tag(self.run_id, TAG_DRIVER, self.record())
        except Exception as error:  # a missed beat: the next one retries, `check` decides when it is too late
            self.last_error = (str(error).strip().splitlines() or [type(error).__name__])[0][-300:]
            log.warning("sweep %s: lease heartbeat failed (%s)", self.sweep_name, self.last_error)
            return
        with self._lock:
            self.renewed_at = max(self.renewed_at, started)

    def check(self) -> None:
        """Raise LeaseLost (one line) when this driver may no longer submit: taken over, or no renewal that began in the
        last `renew_s` succeeded."""
        with self._lock:
            late = self.clock() - self.renewed_at
        if self.lost is None and late >= self.timing.renew_s:
            self.lose(f"could not renew it for {late:.0f}s (last error: {self.last_error})")
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def lose(self, why: str) -> None:
        self.lost = (f"sweep {self.sweep_name}: this driver lost the sweep's lease: {why}; it stopped submitting "
                     "(its running jobs end with it); run the sweep again once the other driver is gone")

    def release(self) -> None:
        """Mark the heartbeat released if the sweep is still ours, so the next driver takes it at once."""
        with contextlib.suppress(Exception):
            params, _ = self.records.read(self.run_id)
            if self.lost is None and newest_claim(params) == (self.epoch, self.token):
                self.records.set_tag(self.run_id, TAG_DRIVER, self.record(released=True))

    def conflict(self, holder: str) -> Conflict:
        return Conflict(f"sweep {self.sweep_name} is being run by another driver ({holder}); wait for it to end, or "
                        "stop it (`ray job stop`); a driver that died frees the sweep after "
                        f"{self.timing.stale_s:.0f}s")


def parse(heartbeat: str | None) -> dict[str, Any]:
    """A heartbeat tag's record ({} when absent or not ours)."""
    with contextlib.suppress(ValueError, TypeError):
        record = json.loads(heartbeat or "")
        return record if isinstance(record, dict) else {}
    return {}


@contextlib.contextmanager
def sweep_lease(run_id: str, sweep_name: str, uri: str | None = None,
                timing: LeaseTiming = LeaseTiming()) -> Iterator[SweepLease]:
    """Hold the sweep for this driver while the block runs (`SweepLease.claim`, a heartbeat thread, `release`); the
    block calls the lease's `check` before each submission."""
    lease = SweepLease(run_id, sweep_name, records_for(uri, timing), timing)
    lease.claim()
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(timing.heartbeat_s):
            lease.renew()

    beating = threading.Thread(target=heartbeat, name="sweep-lease", daemon=True)
    beating.start()
    try:
        yield lease
    finally:
        stop.set()
        beating.join()
        lease.release()
