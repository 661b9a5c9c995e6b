"""The sweep lease fences (issue 23, M5): a driver that cannot renew in time, or finds another's claim, stops
submitting; a second driver judges the first gone only by its own clock; two claims of one epoch cannot both win.

Each test drives two `SweepLease` objects standing for drivers on two hosts (their `identity`), against the session's
real `mlflow server`; their monotonic clock is one `ManualClock`, so no test depends on the machine's speed. The
scheduler's `submit_window` is the real one, submitting stand-in units that count their submissions per job.
"""

from __future__ import annotations

import json
import socket
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from core.errors import Conflict
from tests.tracking_fixtures import Server
from tracking.lease import TAG_DRIVER, LeaseLost, LeaseTiming, RestRecords, SweepLease

TIMING = LeaseTiming(heartbeat_s=10.0, renew_s=40.0, stale_s=60.0, call_timeout_s=0.5, watch_s=20.0)


class ManualClock:
    """A monotonic clock that moves only when told; `sleep` moves it (and runs `on_sleep`, another driver's beat)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.on_sleep: Callable[[], None] = lambda: None

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.on_sleep()


class StandIn:
    """A unit for `submit_window`: submitting it records (driver, job, clock) instead of starting a Ray task."""

    def __init__(self, job: str, driver: str, log: list[tuple[str, str, float]], clock: ManualClock) -> None:
        self.job, self.driver, self.log, self.clock = job, driver, log, clock
        self.demand = {"CPU": 1.0}

    def submit(self) -> object:
        self.log.append((self.driver, self.job, self.clock()))
        return object()


@pytest.fixture
def parent_run(mlflow_server: Server) -> str:
    """A fresh sweep parent run on the session's MLflow server."""
    from tracking import store

    experiment_id = store.ensure_experiment("lease-tests", mlflow_server.uri)
    return store.client(mlflow_server.uri).create_run(experiment_id).info.run_id


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def driver(run_id: str, uri: str, host: str, clock: ManualClock) -> SweepLease:
    return SweepLease(run_id, "lease-sweep", RestRecords(uri, TIMING.call_timeout_s), TIMING, identity=host,
                      clock=clock, sleep=clock.sleep)


@pytest.fixture
def stuck_server() -> Iterator[str]:
    """An address that accepts connections and never answers: a tracking server stuck mid-request."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def submit_all(queue: deque[Any], lease: SweepLease) -> None:
    from orchestrator.scheduler import submit_window

    submit_window(queue, {}, 1.0, {"CPU": 100.0}, lease.check)


@pytest.mark.integration  # the session's mlflow server
def test_a_stalled_heartbeat_fences_the_holder_before_another_driver_takes_over(
        parent_run: str, mlflow_server: Server, stuck_server: str, clock: ManualClock) -> None:
    """M5: driver A's heartbeat is stuck in a request to a server that never answers. Each beat gives up after its
    short timeout (no minutes of MLflow's retries); A stops submitting once no renewal succeeded for `renew_s`, which
    is before driver B, watching A's heartbeat unchanged for `stale_s` by its own clock, takes the sweep. Every job is
    submitted once: A's before it was fenced, B's after."""
    a, b = (driver(parent_run, mlflow_server.uri, host, clock) for host in ("host-a", "host-b"))
    log: list[tuple[str, str, float]] = []
    a.claim()
    submit_all(deque([StandIn("job-0", "a", log, clock)]), a)
    a.records = RestRecords(stuck_server, TIMING.call_timeout_s)  # from here A's requests hang
    clock.on_sleep = a.renew  # A beats (and fails) while B watches
    b.claim()  # watches A's heartbeat for stale_s, then takes epoch 2
    assert b.epoch == 2 and "timed out" in a.last_error.lower(), a.last_error
    with pytest.raises(LeaseLost, match="could not renew it") as lost:
        submit_all(deque([StandIn("job-1", "a", log, clock)]), a)
    assert len(str(lost.value).splitlines()) == 1
    submit_all(deque([StandIn(job, "b", log, clock) for job in ("job-1", "job-2")]), b)
    assert Counter(job for _, job, _ in log) == {"job-0": 1, "job-1": 1, "job-2": 1}
    assert [who for who, _, _ in log] == ["a", "b", "b"]


@pytest.mark.integration  # the session's mlflow server
def test_a_driver_that_finds_another_claim_stops_for_good(parent_run: str, mlflow_server: Server,
                                                          clock: ManualClock) -> None:
    """M5: the heartbeat reads before it writes: once another driver holds a newer claim, the first one's next beat
    finds it and the first submits nothing more, even if the newer holder goes away again (lost is for good). Its
    heartbeat never overwrites the newer holder's record."""
    a, b = (driver(parent_run, mlflow_server.uri, host, clock) for host in ("host-a", "host-b"))
    log: list[tuple[str, str, float]] = []
    a.claim()
    b.take(a.epoch + 1)  # B took the sweep (say it judged A gone)
    a.renew()
    with pytest.raises(LeaseLost, match=r"another driver \(pid .* took it over"):
        submit_all(deque([StandIn("job-0", "a", log, clock)]), a)
    b.release()
    a.renew()
    with pytest.raises(LeaseLost):
        a.check()
    assert log == []
    tags = b.records.read(parent_run)[1]
    assert json.loads(tags[TAG_DRIVER])["token"] == b.token  # A wrote nothing after B's claim


@pytest.mark.integration  # the session's mlflow server
def test_two_claims_of_one_epoch_cannot_both_win(parent_run: str, mlflow_server: Server, clock: ManualClock) -> None:
    """M5: the claim is a write-once MLflow param, so of two drivers claiming epoch 1 at once (both saw the sweep
    free) the second is refused in one line; retrying one's own claim is harmless."""
    a, b = (driver(parent_run, mlflow_server.uri, host, clock) for host in ("host-a", "host-b"))
    a.take(1)
    a.take(1)
    with pytest.raises(Conflict, match="another driver claimed it at the same moment"):
        b.take(1)
    a.check()


@pytest.mark.integration  # the session's mlflow server
def test_skewed_clock_stamps_of_another_host_decide_nothing(parent_run: str, mlflow_server: Server,
                                                             clock: ManualClock) -> None:
    """M5: a holder on another host whose heartbeat carries a timestamp an hour old (its clock is behind) but keeps
    beating is alive: the watcher stops in one line instead of taking its sweep. Stamped an hour ahead but silent, it is
    gone after `stale_s` of the watcher's own clock."""
    a, b = (driver(parent_run, mlflow_server.uri, host, clock) for host in ("host-a", "host-b"))
    a.claim()

    def skewed_beat(seen: float) -> None:
        a.beat += 1
        record = json.loads(a.record()) | {"seen": seen}
        a.records.set_tag(parent_run, TAG_DRIVER, json.dumps(record))

    skewed_beat(clock() - 3600)
    clock.on_sleep = lambda: skewed_beat(clock() - 3600)
    with pytest.raises(Conflict, match="heartbeat moved while this driver watched") as refused:
        b.claim()
    assert len(str(refused.value).splitlines()) == 1 and b.epoch == 0
    skewed_beat(clock() + 3600)
    clock.on_sleep = lambda: None
    b.claim()
    assert b.epoch == a.epoch + 1


@pytest.mark.integration  # the session's mlflow server
def test_a_holder_on_this_host_is_judged_by_its_process(parent_run: str, mlflow_server: Server,
                                                        clock: ManualClock) -> None:
    """On one host the watcher need not wait: a holder whose process ended frees the sweep at once; one still running
    is a one-line Conflict at once (its process start time tells a reused PID apart)."""
    import subprocess
    import sys

    from tracking.lease import host_identity, process_started

    here = host_identity()
    a, b = driver(parent_run, mlflow_server.uri, here, clock), driver(parent_run, mlflow_server.uri, here, clock)
    clock.on_sleep = lambda: pytest.fail("a holder on this host needs no watching")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        a.claim()
        record = json.loads(a.record()) | {"pid": child.pid, "pid_started": process_started(child.pid)}
        a.records.set_tag(parent_run, TAG_DRIVER, json.dumps(record))
        with pytest.raises(Conflict, match=f"pid {child.pid} on"):
            b.claim()
    finally:
        child.kill()
        child.wait()
    b.claim()
    assert b.epoch == a.epoch + 1


@pytest.mark.unit
def test_lease_timing_keeps_the_holder_fenced_before_a_watcher_may_take_over() -> None:
    """The holder's deadline (`renew_s`) must fall before a watcher's (`stale_s`), and leave room for a beat."""
    with pytest.raises(ValueError, match="renew_s < stale_s"):
        LeaseTiming(renew_s=60.0, stale_s=60.0)
    with pytest.raises(ValueError):
        LeaseTiming(heartbeat_s=10.0, call_timeout_s=5.0, renew_s=12.0)
