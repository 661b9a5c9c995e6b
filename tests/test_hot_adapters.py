"""Hot adapters across replicas (serving/replication.py): the policy as pure functions, and the spreading against a
real 2-replica Serve app on loopback (adapters in a SQLite registry, their weights in the replicas' disk cache)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import httpx
import pytest
from prometheus_client.samples import Sample
from pydantic import ValidationError

from serving.config import BatchingEngineConfig, HotAdapterSettings, ReplicaBounds
from serving.replication import ANY_REPLICA, HotAdapterRouter, RequestRates, adapter_of, copies_for, routing_id, task_of

HOT, TAIL = "loraland-legal/3", "loraland-rare/1"
T = TypeVar("T")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- the policy (unit)


@pytest.mark.unit
@pytest.mark.parametrize("share, replicas, bounds, expected", [
    (0.5, 2, ReplicaBounds(), 2),  # half of the traffic on 2 replicas: both
    (0.002, 2, ReplicaBounds(), 1),  # the long tail: one each
    (0.3, 4, ReplicaBounds(), 3),  # ceil(0.3 * 4 / 0.5)
    (0.9, 4, ReplicaBounds(max_replicas=2), 2),  # the ceiling wins over the rate
    (0.0, 4, ReplicaBounds(min_replicas=4), 4),  # a champion on every replica, however rare
    (0.0, 2, ReplicaBounds(min_replicas=8), 2),  # a floor above the replica count: every replica
    (1.0, 1, ReplicaBounds(), 1),  # one replica: nothing to spread
])
def test_copies_follow_the_share_within_bounds(share: float, replicas: int, bounds: ReplicaBounds,
                                               expected: int) -> None:
    assert copies_for(share, replicas, bounds, replica_share=0.5) == expected


@pytest.mark.unit
def test_routing_ids_name_the_adapter_and_bounds_are_checked() -> None:
    assert [routing_id(HOT, copy) for copy in range(3)] == [HOT, f"{HOT}#1", f"{HOT}#2"]
    assert {adapter_of(routing_id(HOT, copy)) for copy in range(3)} == {HOT} and adapter_of("") == ""
    assert task_of(HOT) == "legal" and task_of("not-an-adapter") == ""
    with pytest.raises(ValidationError, match="below min_replicas"):
        ReplicaBounds(min_replicas=3, max_replicas=2)


@pytest.mark.unit
def test_request_rates_decay_with_their_half_life() -> None:
    clock = Clock()
    rates = RequestRates(half_life_s=10, clock=clock)
    assert rates.record(HOT) == pytest.approx(1 / 20)  # a share needs 20 recent requests behind it (MIN_EVIDENCE)
    for _ in range(98):
        rates.record(HOT)
    assert rates.record(TAIL) == pytest.approx(0.01)
    clock.now = 10.0  # one half-life
    assert rates.record(HOT) == pytest.approx(50.5 / 51)
    clock.now = 300.0  # thirty half-lives: the old traffic is forgotten
    assert rates.record(TAIL) == pytest.approx(1 / 20) and HOT not in rates.counts


@pytest.mark.unit
def test_router_spreads_a_hot_adapter_and_keeps_the_tail_on_one_replica() -> None:
    clock = Clock()
    two = HotAdapterRouter(HotAdapterSettings(), replicas=2, clock=clock)
    routes = [two.route(HOT if index % 2 else f"loraland-t{index}/1") for index in range(400)]  # HOT takes half
    assert set(routes[201::2]) == {ANY_REPLICA}  # hot: Serve balances it over both replicas
    assert all(route == f"loraland-t{index}/1" for index, route in enumerate(routes) if index % 2 == 0)  # tail: sticky
    assert two.route(None) == ANY_REPLICA and two.copies[HOT] == 2

    four = HotAdapterRouter(HotAdapterSettings(), replicas=4, clock=clock)
    routes = [four.route(HOT if index % 10 < 3 else f"loraland-t{index}/1") for index in range(1000)]  # HOT takes 30%
    spread = [route for index, route in enumerate(routes) if index % 10 < 3][-30:]
    assert set(spread) == {HOT, f"{HOT}#1", f"{HOT}#2"} and four.copies[HOT] == 3  # 3 of 4 replicas, in turn

    pinned = HotAdapterRouter(HotAdapterSettings(adapters={"legal": ReplicaBounds(min_replicas=4)}), replicas=4,
                              clock=clock)
    assert pinned.route(HOT) == ANY_REPLICA  # the task's floor: on every replica from its first request
    held = HotAdapterRouter(HotAdapterSettings(adapters={HOT: ReplicaBounds(max_replicas=1)}), replicas=2, clock=clock)
    assert {held.route(HOT) for _ in range(50)} == {HOT}  # the adapter's own ceiling


# --------------------------------------------------------------------------- a real 2-replica app (cluster)


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, list[str]]]:
    """The app with 2 replicas of tiny-llama and 4 adapters; task bench_0002 on every replica (its floor), the others
    spread by their traffic alone."""
    from core.catalog import load_catalog
    from core.ports import free_port
    from core.schemas import QuantizationSettings
    from jobs.models import load_base_model
    from serving.synthetic import publish_adapters
    from tests.helpers import local_serve, two_replica_config

    root = tmp_path_factory.mktemp("hot")
    spec = load_catalog().base_model("tiny-llama")
    uri = f"sqlite:///{root}/mlflow.db"
    models = publish_adapters(uri, root / "cache", load_base_model(spec, QuantizationSettings(), "cpu"), spec, 4)
    hot = HotAdapterSettings(adapters={"bench_0002": ReplicaBounds(min_replicas=2)})
    config = two_replica_config("hot-test", uri, root / "cache", free_port(), 120, base_model="tiny-llama",
                                num_cpus=0.5, hot_adapters=hot, engine=BatchingEngineConfig(max_batch_size=8))
    metrics_port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # this module's Ray only
        with local_serve(config, num_cpus=2, metrics_port=metrics_port) as url:
            yield url, metrics_port, models


def wait_for_export(read: Callable[[int], dict[str, T]], metrics_port: int, done: Callable[[dict[str, T]], bool],
                    timeout_s: float = 90) -> dict[str, T]:
    """`read(metrics_port)` once `done` accepts it, or after `timeout_s` (replicas re-export residency on requests and
    health checks; Ray's agent exports every few seconds)."""
    deadline, found = time.monotonic() + timeout_s, read(metrics_port)
    while time.monotonic() < deadline and not done(found):
        time.sleep(2)
        found = read(metrics_port)
    return found


def exported(metrics_port: int) -> list[Sample]:
    """Every sample Ray's Prometheus endpoint exports now."""
    from tests.test_serving_api import exported_samples

    return exported_samples(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text)


def residency(metrics_port: int) -> dict[str, set[str]]:
    """Adapter -> the replicas that export it as resident (value 1, any tier)."""
    held: dict[str, set[str]] = {}
    for sample in exported(metrics_port):
        if sample.name == "ray_loraland_adapter_resident" and sample.value == 1:
            held.setdefault(sample.labels["adapter"], set()).add(sample.labels["replica"])
    return held


def spread(metrics_port: int) -> dict[str, float]:
    """Adapter -> the replicas the ingress last decided to spread its requests over."""
    return {sample.labels["adapter"]: sample.value for sample in exported(metrics_port)
            if sample.name == "ray_loraland_adapter_replicas"}


@pytest.mark.cluster
def test_a_hot_adapter_is_served_by_both_replicas_and_the_tail_by_one(two_replicas: tuple[str, int, list[str]]) -> None:
    from serving.replica import RESIDENCY_PERIOD_S

    url, metrics_port, models = two_replicas
    hot, tail, floored = (f"loraland-{model.split(':')[1]}/1" for model in models[:3])

    def ask(model: str) -> str:
        response = httpx.post(f"{url}/completions", json={"model": model, "prompt": "the sky is", "max_tokens": 8,
                                                          "temperature": 0}, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    ask(models[0])  # the hot adapter's first request: under MIN_EVIDENCE, one copy, so Serve puts it on one replica
    ask(models[1])  # a tail adapter: the same
    wait_for_export(residency, metrics_port, lambda held: hot in held and tail in held)  # Serve's routers learn where
    # now nearly all the traffic: from its 6th recent request on, its share (> 1/4 of
    with ThreadPoolExecutor(4) as pool:
        hot_answers = list(pool.map(ask, [models[0]] * 48))  # MIN_EVIDENCE) wants both replicas; 4 at a time fit in
        # one replica's batch, so Serve would keep them all on the replica that holds it (no fallback) if copies
        # stayed 1
    assert len(set(hot_answers)) == 1  # every replica answers the same for the same adapter
    held = wait_for_export(residency, metrics_port, lambda held: len(held.get(hot, ())) == 2)
    for _ in range(2):  # once Serve's routers know where it is (they learn from the replicas' reports), it stays there
        ask(models[1])
    time.sleep(RESIDENCY_PERIOD_S)
    ask(models[1])  # its replica re-exports its residency on this request
    held = wait_for_export(residency, metrics_port, lambda held: False, timeout_s=15)
    assert len(held.get(hot, ())) == 2, held  # the hot adapter: resident on both replicas, from its traffic
    assert len(held.get(tail, ())) == 1, held  # the tail adapter: on one

    ask(models[2])  # one request, a tiny share: only its task's floor gives it both replicas
    copies = wait_for_export(spread, metrics_port, lambda copies: floored in copies)  # (Ray drops gauges left unset)
    assert copies.get(floored) == 2, copies
