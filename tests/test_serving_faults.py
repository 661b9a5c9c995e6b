"""Faults against a real Ray Serve app on loopback, with API keys on: a replica killed mid-stream, the tracking server
unreachable at start and while serving, a full disk while caching an adapter, the 504 timeout path, and (marker
`soak`, excluded from `make test`) 10 minutes of mixed load with no leaked slots, KV cache or threads.

Faults are switched on with serving/faults.py's hook: the app's processes get `$LORALAND_FAULTS_DIR`, and a test
writes a fault's JSON file there (removed after each test). The fault tests share one app (tiny-llama and tiny-mistral,
one replica each) whose replicas run the fake engine (tests/fake_engine.py) over fake adapters on a `mlflow server` of
this module's own, reached through a TcpProxy that a test can cut and restore. The soak's leak check is the real
engine's: it runs a second app beside it over the tiny sweep's adapters, two per tiny-llama replica so they churn.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.ports import free_port
from serving.adapters import MIN_REFRESH_S, adapter_id
from serving.config import BaseDeployment, BatchingEngineConfig, IngressSettings, ServeConfig
from serving.faults import FAULTS_DIR_ENV
from tests.fake_engine import build_fake_engine, own_mlflow_server, publish_fake_adapters
from tests.test_serving import assert_openai_error
from tests.tracking_fixtures import BASES, TASKS, Sweep, TcpProxy

APP = "loraland-faults"
ADMIN = "sk-faults-admin-0123456789"
SCOPED = "sk-faults-sentiment-0123"  # demo_sentiment adapters and tiny-mistral only
TIMEOUT_S = 8.0  # ingress.request_timeout_s of the app
CHURN_TASKS = ("soak_a", "soak_b", "soak_c")  # extra tiny-llama adapters, so the soak loads and evicts


@dataclass
class FaultyEndpoint:
    app: str
    url: str
    proxy: TcpProxy
    faults: Path
    keys: Path
    cache: Path
    prompt: str
    versions: dict[str, str] = field(default_factory=dict)  # "<base>:<task>" -> registry version
    folders: dict[str, Path] = field(default_factory=dict)  # "<base>:<task>" -> the adapter folder registered

    def post(self, body: dict[str, Any], key: str | None = ADMIN, path: str = "/completions",
             url: str = "") -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post((url or self.url) + path, json=body, headers=headers, timeout=120)

    def complete(self, model: str, **body: Any) -> httpx.Response:
        return self.post({"model": model, "prompt": self.prompt, "max_tokens": 8, "temperature": 0} | body)

    def stream(self, model: str, max_tokens: int = 12, close_after: int | None = None, key: str = ADMIN) -> tuple[int,
                                                                                                                  list[Any]]:
        """(status, events): each `data:` payload parsed (`[DONE]` kept as the string); stops early after
        `close_after`."""
        body = {"model": model, "prompt": self.prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        events: list[Any] = []
        with httpx.stream("POST", self.url + "/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                          timeout=60) as response:
            if response.status_code != 200:
                response.read()
                return response.status_code, [response.json()]
            for line in response.iter_lines():
                if line.startswith("data: "):
                    payload = line[len("data: "):]
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
                if close_after is not None and len(events) >= close_after:
                    break
        return 200, events

    def inject(self, name: str, **fault: Any) -> None:
        (self.faults / f"{name}.json").write_text(json.dumps(fault))

    def adapter(self, model: str) -> str:
        return adapter_id(model.split(":")[1], self.versions[model])


def register_churn_adapters(sweep: Sweep) -> dict[str, str]:
    """CHURN_TASKS as registered models of their own, each a copy of a tiny-llama adapter of the sweep."""
    from tracking import registry

    runs = [sweep.job("train", "tiny-llama", task).run_id for task in TASKS] * len(CHURN_TASKS)
    return {f"tiny-llama:{task}": str(registry.register_adapter(run, task, "tiny-llama", 0.5, uri=sweep.uri))
            for run, task in zip(runs, CHURN_TASKS)}


def app_config(name: str, port: int, tracking_uri: str, keys: Path, cache: Path,
               deployments: list[BaseDeployment]) -> ServeConfig:
    return ServeConfig(name=name, port=port, route_prefix="/" if name == APP else f"/{name}", tracking_uri=tracking_uri,
                       api_keys_file=str(keys), adapter_cache_dir=str(cache), deployments=deployments,
                       ingress=IngressSettings(num_cpus=0, model_ttl_s=0.5, request_timeout_s=TIMEOUT_S))


def two_bases(tiny_llama_engine: BatchingEngineConfig | None = None) -> list[BaseDeployment]:
    """tiny-llama (all tasks) and tiny-mistral (the sweep's tasks), one replica each."""
    return [BaseDeployment(base_model="tiny-llama", device="cpu", num_cpus=0.5, max_adapters_per_replica=2,
                           engine=tiny_llama_engine or BatchingEngineConfig(max_batch_size=8)),
            BaseDeployment(base_model="tiny-mistral", device="cpu", num_cpus=0.5, tasks=list(TASKS),
                           engine=BatchingEngineConfig(max_batch_size=8))]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyEndpoint]:
    import ray
    from ray import serve

    from serving.app import deploy

    root = tmp_path_factory.mktemp("faults")
    (root / "faults").mkdir()
    keys = root / "api-keys.yaml"
    keys.write_text(f"keys:\n  - {{name: admin, key: {ADMIN}}}\n"
                    f"  - {{name: sentiment, key: {SCOPED}, models: ['*:demo_sentiment', tiny-mistral]}}\n")
    with own_mlflow_server(root / "mlflow") as uri:
        models = [f"{base}:{task}" for base in BASES for task in TASKS] + [f"tiny-llama:{task}" for task in CHURN_TASKS]
        published = publish_fake_adapters(uri, root / "adapters", models)
        versions = {model: version for model, (version, _) in published.items()}
        folders = {model: folder for model, (_, folder) in published.items()}
        proxy = TcpProxy(int(uri.rsplit(":", 1)[1]))
        proxy.start()
        config = app_config(APP, free_port(), proxy.uri, keys, root / "cache", two_bases())
        with pytest.MonkeyPatch.context() as env:  # inherited by the processes ray.init starts: this module's Ray only
            env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            env.setenv(FAULTS_DIR_ENV, str(root / "faults"))
            ray.init(_node_ip_address="127.0.0.1", num_cpus=4, include_dashboard=False, log_to_driver=False)
            try:
                url = deploy(config, build_fake_engine)
                yield FaultyEndpoint(APP, url, proxy, root / "faults", keys, root / "cache", "Review: a fine film.",
                                     versions, folders)
            finally:
                serve.shutdown()
                ray.shutdown()
                proxy.stop()


@pytest.fixture
def endpoint(faulty: FaultyEndpoint) -> Iterator[FaultyEndpoint]:
    """The module's app, with every fault switched off and the tracking server reachable after the test."""
    try:
        yield faulty
    finally:
        for fault in faulty.faults.iterdir():
            fault.unlink()
        if not faulty.proxy._running.is_set():
            faulty.proxy.start()


def errors_of(events: list[Any]) -> list[dict[str, Any]]:
    return [event["error"] for event in events if isinstance(event, dict) and "error" in event]


def texts_of(events: list[Any]) -> str:
    return "".join(event["choices"][0]["text"] for event in events if isinstance(event, dict) and event.get("choices"))


def until_ok(ask: Any, seconds: float = 120) -> httpx.Response:
    """`ask()` repeated until it answers 200 (or `seconds` pass: the last answer)."""
    deadline = time.monotonic() + seconds
    response = ask()
    while response.status_code != 200 and time.monotonic() < deadline:
        time.sleep(1.0)
        response = ask()
    return response


# --------------------------------------------------------------------------- keys


@pytest.mark.integration
def test_keys_are_scoped_to_models_over_http(endpoint: FaultyEndpoint) -> None:
    listed = httpx.get(endpoint.url + "/models", headers={"Authorization": f"Bearer {SCOPED}"},
                       timeout=60).json()["data"]
    assert {card["id"] for card in listed} - {"demo_sentiment"} == {"tiny-mistral", "tiny-llama:demo_sentiment",
                                                                    "tiny-mistral:demo_sentiment"}  # and the champion
    assert endpoint.complete("tiny-mistral:demo_sentiment", max_tokens=2).status_code == 200
    assert endpoint.post({"model": "tiny-mistral:demo_sentiment", "prompt": "x", "max_tokens": 2},
                         key=SCOPED).status_code == 200
    denied = assert_openai_error(endpoint.post({"model": "tiny-llama:demo_colors", "prompt": "x"}, key=SCOPED), 404,
                                 "model_not_found")
    unknown = assert_openai_error(endpoint.post({"model": "tiny-llama:no_such_task", "prompt": "x"}, key=SCOPED), 404)
    assert denied == unknown | {"message": unknown["message"].replace("'tiny-llama:no_such_task'",
                                                                      "'tiny-llama:demo_colors'")}
    assert_openai_error(endpoint.post({"model": "tiny-llama", "prompt": "x"}, key=SCOPED), 404, "model_not_found")
    assert_openai_error(endpoint.post({"model": "tiny-llama", "prompt": "x"}, key=None), 401, "invalid_api_key")
    assert_openai_error(endpoint.post({"model": "tiny-llama", "prompt": "x"}, key="sk-not-a-key-0123456789"), 401)
    added = "sk-faults-added-0123456789"
    endpoint.keys.write_text(endpoint.keys.read_text() + f"  - {{name: added, key: {added}, models: [tiny-llama]}}\n")
    # no restart
    assert endpoint.post({"model": "tiny-llama", "prompt": "x", "max_tokens": 2}, key=added).status_code == 200


# --------------------------------------------------------------------------- 504


@pytest.mark.integration
def test_a_generation_slower_than_the_request_timeout_is_504(endpoint: FaultyEndpoint) -> None:
    endpoint.inject("slow", base_model="tiny-mistral", adapter="base", after_tokens=2, delay_s=TIMEOUT_S + 4)
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(endpoint.complete, "tiny-mistral", max_tokens=16)
        streamed = pool.submit(endpoint.stream, "tiny-mistral", 16)
        error = assert_openai_error(first.result(), 504, "timeout")
        status, events = streamed.result()
    assert "request_timeout_s" in error["message"] and time.monotonic() - started < 3 * TIMEOUT_S
    assert status == 200 and len([e for e in events if isinstance(e, dict) and e.get("choices")]) >= 1  # tokens, then
    # the error event, then done
    assert [e["code"] for e in errors_of(events)] == ["timeout"] and events[-1] == "[DONE]"
    (endpoint.faults / "slow.json").unlink()
    assert endpoint.complete("tiny-mistral").status_code == 200


# --------------------------------------------------------------------------- disk full


@pytest.mark.integration
def test_a_full_disk_fails_only_that_adapter_and_caches_nothing_half_written(endpoint: FaultyEndpoint) -> None:
    full, other = "tiny-mistral:demo_colors", "tiny-mistral:demo_sentiment"
    endpoint.inject("disk_full", adapter=endpoint.adapter(full))
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda model: endpoint.complete(model), [full, other, full]))
    for response in (answers[0], answers[2]):
        error = assert_openai_error(response, 503, "cache_full")
        assert endpoint.adapter(full) in error["message"] and "no space left" in error["message"]
        assert int(response.headers["Retry-After"]) >= 1
    assert answers[1].status_code == 200 and answers[1].json()["system_fingerprint"] == endpoint.adapter(other)
    folder = endpoint.cache / f"loraland-demo_colors/{endpoint.versions[full]}"
    assert not folder.exists() and not list((endpoint.cache / ".staging").iterdir())  # nothing half-written kept
    (endpoint.faults / "disk_full.json").unlink()
    again = endpoint.complete(full)  # a transient failure is not remembered: the next request downloads afresh
    assert again.status_code == 200 and again.json()["system_fingerprint"] == endpoint.adapter(full)
    trained = endpoint.folders[full] / "adapter_model.safetensors"
    assert (folder / "adapter_model.safetensors").stat().st_size == trained.stat().st_size


# --------------------------------------------------------------------------- tracking server down


@pytest.mark.integration
def test_tracking_server_unreachable_while_serving(endpoint: FaultyEndpoint) -> None:
    cached, not_downloaded, never_seen = "tiny-llama:demo_sentiment", "tiny-llama:soak_a", "tiny-mistral:soak_never"
    assert endpoint.complete(cached).status_code == 200
    assert endpoint.complete("tiny-mistral:demo_sentiment").status_code == 200  # in the view: its champion route known
    endpoint.proxy.stop()
    # An id missing from a view read under MIN_REFRESH_S ago is a plain 404 (the registry answered a moment ago); let
    # the view age past that, so the ingress must read the registry again and finds it down.
    time.sleep(MIN_REFRESH_S + 0.2)
    try:
        assert endpoint.complete(cached).json()["system_fingerprint"] == endpoint.adapter(cached)  # cached: answers
        assert endpoint.complete("tiny-llama").status_code == 200  # a base model needs no registry
        for model in (never_seen, not_downloaded):  # not in the last view; in it but never fetched by a replica
            unknown = assert_openai_error(endpoint.complete(model), 503, "registry_unavailable")
            assert endpoint.proxy.uri.split("//")[1] in unknown["message"], unknown
        assert endpoint.adapter(not_downloaded) in unknown["message"]
    finally:
        endpoint.proxy.start()
    back = until_ok(lambda: endpoint.complete(not_downloaded), 60)
    assert back.status_code == 200 and back.json()["system_fingerprint"] == endpoint.adapter(not_downloaded)


@pytest.mark.integration
def test_tracking_server_unreachable_at_start(endpoint: FaultyEndpoint) -> None:
    """A second app whose tracking server is down when it starts: base models answer, adapters get a 503 naming the
    cause, and they answer once the server is back."""
    from ray import serve

    from serving.app import app_for

    down = TcpProxy(endpoint.proxy.target[1])  # not started: nothing listens on its port
    name = "loraland-cold"
    config = app_config(name, 8000, down.uri, endpoint.keys, endpoint.cache.with_name("cold-cache"),
                        [BaseDeployment(base_model="tiny-llama", device="cpu", num_cpus=0.5)])
    serve.run(app_for(config, build_fake_engine), name=name, route_prefix=f"/{name}")
    url = endpoint.url.removesuffix("/v1") + f"/{name}/v1"
    try:
        assert endpoint.post({"model": "tiny-llama", "prompt": endpoint.prompt, "max_tokens": 2},
                             url=url).status_code == 200
        adapter = {"model": "tiny-llama:demo_sentiment", "prompt": endpoint.prompt, "max_tokens": 2}
        error = assert_openai_error(endpoint.post(adapter, url=url), 503, "registry_unavailable")
        assert down.uri.split("//")[1] in error["message"]
        down.start()
        back = until_ok(lambda: endpoint.post(adapter, url=url), 60)
        assert back.status_code == 200
        assert back.json()["system_fingerprint"] == endpoint.adapter("tiny-llama:demo_sentiment")
    finally:
        serve.delete(name)
        down.stop()


# --------------------------------------------------------------------------- a replica dies


@pytest.mark.integration
def test_a_replica_killed_mid_stream_ends_its_streams_with_an_error_and_is_replaced(endpoint: FaultyEndpoint) -> None:
    """Base-model streams (trained adapters may stop after a token or two; a base model's stream runs to max_tokens)."""
    endpoint.inject("slow", adapter="base", after_tokens=1, delay_s=0.3)  # streams long enough to overlap
    endpoint.inject("crash", base_model="tiny-llama", adapter="base", after_tokens=4)
    with ThreadPoolExecutor(4) as pool:
        survivors = [pool.submit(endpoint.stream, "tiny-mistral", 24) for _ in range(2)]  # on the other replica
        time.sleep(0.5)
        doomed = [pool.submit(endpoint.stream, "tiny-llama", 40) for _ in range(2)]  # on the replica that dies
        for stream in doomed:
            status, events = stream.result(timeout=90)  # no hang
            assert status == 200 and events[-1] == "[DONE]", events
            assert [error["code"] for error in errors_of(events)] == ["replica_failed"], events
        for stream in survivors:
            status, events = stream.result(timeout=90)
            assert status == 200 and not errors_of(events) and events[-1] == "[DONE]"
            assert any(e["choices"][0]["finish_reason"] for e in events if isinstance(e, dict) and e.get("choices"))
    assert (endpoint.faults / "crash.json.fired").exists()
    (endpoint.faults / "slow.json").unlink()
    victim = "tiny-llama:demo_sentiment"  # an adapter of the replica that died
    again = until_ok(lambda: endpoint.complete(victim), 180)  # Serve starts a new replica in its place
    assert again.status_code == 200 and again.json()["system_fingerprint"] == endpoint.adapter(victim)


# --------------------------------------------------------------------------- soak


@pytest.fixture(scope="module")
def soaked(faulty: FaultyEndpoint, tiny_sweep: Sweep,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyEndpoint]:
    """A second app beside the fault tests' one, for the soak: the real engine over the tiny sweep's trained adapters
    (on the session's `mlflow server`), two host and device slots on tiny-llama so that adapters churn."""
    from ray import serve

    from serving.app import app_for

    versions = {f"{base}:{task}": str(job.model_version) for (kind, base, task), job in tiny_sweep.jobs.items()
                if kind == "train"}
    versions |= register_churn_adapters(tiny_sweep)
    name, cache = "loraland-soak", tmp_path_factory.mktemp("soak-cache")
    churning = BatchingEngineConfig(device_adapter_slots=2, host_adapter_slots=2, max_batch_size=8)
    config = app_config(name, 8000, tiny_sweep.uri, faulty.keys, cache, two_bases(churning))
    serve.run(app_for(config), name=name, route_prefix=f"/{name}")
    prompt = tiny_sweep.job("train", "tiny-llama", TASKS[0]).result.predictions[0]["prompt"]
    try:
        yield FaultyEndpoint(name, faulty.url.removesuffix("/v1") + f"/{name}/v1", faulty.proxy, faulty.faults,
                             faulty.keys, cache, prompt, versions)
    finally:
        serve.delete(name)


def replica_resources(app: str, deployment: str) -> dict[str, float]:
    from ray import serve

    return serve.get_deployment_handle(deployment, app).resources.remote().result(timeout_s=60)


def all_resources(app: str) -> dict[str, dict[str, float]]:
    return {deployment: replica_resources(app, deployment) for deployment in ("base-tiny-llama", "base-tiny-mistral")}


def quiet_resources(app: str, seconds: float = 60) -> dict[str, dict[str, float]]:
    """Every replica's resources once no request is running or queued (or after `seconds`)."""
    deadline = time.monotonic() + seconds
    found = all_resources(app)
    while any(r["rows"] or r["pending"] for r in found.values()) and time.monotonic() < deadline:
        time.sleep(1.0)
        found = all_resources(app)
    return found


@dataclass
class Tally:
    """What the soak's requests got, by kind and status."""

    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, status: int, problem: str | None = None) -> None:
        with self.lock:
            key = f"{kind}:{status}"
            self.counts[key] = self.counts.get(key, 0) + 1
            if problem:
                self.problems.append(f"{key}: {problem}")


def one_soak_request(endpoint: FaultyEndpoint, rng: random.Random, tally: Tally) -> None:
    """A random request of the mix; what it must get: 200 for good ones, its 4xx for bad ones, 429/503 under load."""
    models = [m for m in endpoint.versions if m.startswith("tiny-llama:")] + ["tiny-llama", "tiny-mistral:demo_colors"]
    kind = rng.choice(["complete", "stream", "cancel", "chat", "bad", "unknown", "no_key", "forbidden"])
    model = rng.choice(models)
    try:
        if kind in ("stream", "cancel"):
            status, events = endpoint.stream(model, rng.randint(4, 24), close_after=2 if kind == "cancel" else None)
            ok = status == 200 and (kind == "cancel" or events[-1] == "[DONE]")
            tally.add(kind, status, None if ok or status in (429, 503) else str(events[-2:]))
            return
        body: dict[str, Any] = {"model": model, "prompt": endpoint.prompt, "max_tokens": rng.randint(1, 16)}
        expected, key = 200, ADMIN
        if kind == "chat":
            body = {"model": model, "messages": [{"role": "user", "content": endpoint.prompt}], "max_tokens": 8}
        elif kind == "bad":
            body, expected = body | {"temperature": -1}, 400
        elif kind == "unknown":
            body, expected = body | {"model": "tiny-llama:no_such_task"}, 404
        elif kind == "no_key":
            expected, key = 401, "sk-wrong-0123456789abc"
        elif kind == "forbidden":
            body, expected, key = body | {"model": "tiny-llama:demo_colors"}, 404, SCOPED  # out of scope: as unknown
        response = endpoint.post(body, key=key, path="/chat/completions" if kind == "chat" else "/completions")
        shaped = response.status_code == 200 or set(response.json().get("error", {})) == {"message", "type", "param",
                                                                                          "code"}
        ok = shaped and response.status_code in (expected, 429, 503)
        tally.add(kind, response.status_code, None if ok else response.text[:200])
    except Exception as error:  # a hang (timeout) or a broken answer: neither answered nor refused
        tally.add(kind, 0, f"{type(error).__name__}: {error}")


@pytest.mark.soak
@pytest.mark.cluster
def test_soak_mixed_load_leaks_nothing(soaked: FaultyEndpoint) -> None:
    seconds = float(os.environ.get("LORALAND_SOAK_S", "600"))
    users = 6
    warm = Tally()
    rng = random.Random(0)
    for _ in range(40):  # every pool and lazy thread exists before the baseline
        one_soak_request(soaked, rng, warm)
    before = quiet_resources(soaked.app)
    tally = Tally()
    deadline = time.monotonic() + seconds

    def user(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            one_soak_request(soaked, rng, tally)

    with ThreadPoolExecutor(users) as pool:
        list(pool.map(user, range(1, users + 1)))
    after = quiet_resources(soaked.app)
    answered = sum(n for key, n in tally.counts.items() if key.endswith(":200"))
    print(f"\nsoak {seconds:.0f}s, {users} users: {sum(tally.counts.values())} requests, {answered} answered (200), "
          f"{sum(tally.counts.values()) - answered} refused; by kind:status {dict(sorted(tally.counts.items()))}")
    print(f"before: {before}\nafter:  {after}")
    assert tally.problems == [], tally.problems[:20]
    for deployment, held in after.items():
        assert (held["rows"], held["pending"], held["slots_held"], held["kv_bytes"]) == (0, 0, 0, 0), (deployment, held)
        assert held["threads"] <= before[deployment]["threads"] + 2, (deployment, before[deployment], held)
