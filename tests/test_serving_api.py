"""The OpenAI-compatible ingress, its errors, overload, adapter loading and metrics, against a real Serve app on
loopback whose replicas run the fake engine (tests/fake_engine.py): no model, the answering adapter stamped into every
answer.

Adapters are fake (readable safetensors, no training), registered on a real `mlflow server` of this module's own and
downloaded by the replicas' real adapter stores. Whether answers equal PEFT's is tests/test_serving.py's business, with
the real engine over a trained sweep.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from core.ports import free_port
from serving.adapters import AdapterStore, adapter_id
from serving.config import BaseDeployment, BatchingEngineConfig, IngressSettings, ServeConfig
from serving.engine import AdapterLoadError
from tests.fake_engine import (
    FAULTS,
    build_fake_engine,
    own_mlflow_server,
    publish_fake_adapter,
    publish_fake_adapters,
    stamp,
    weights_digest,
)
from tests.test_serving import API_KEY, Http, assert_openai_error
from tests.tracking_fixtures import BASES, TASKS

pytestmark = pytest.mark.cluster

PROMPT = "Review: a fine film. Sentiment:"
ADAPTER_IDS = [f"{base}:{task}" for base in BASES for task in TASKS]
TOKENS = 40  # an answer this long holds the whole stamp (about 30 tokens of the tiny tokenizer)


@dataclass
class ApiEndpoint(Http):
    metrics_port: int = 0
    uri: str = ""
    versions: dict[str, str] = field(default_factory=dict)  # "<base>:<task>" -> registry version
    folders: dict[str, Path] = field(default_factory=dict)  # adapter id -> the folder registered
    moving: tuple[str, str] = ("", "")  # versions of serve_moving: (first champion, promoted later)

    def stamp(self, adapter: str) -> str:
        """What the fake engine puts first in an answer of `adapter` whose weights are the registered ones."""
        return stamp(adapter, weights_digest(self.folders[adapter]))

    def adapter(self, model: str) -> str:
        return adapter_id(model.split(":")[1], self.versions[model])


def publish(uri: str, root: Path) -> tuple[dict[str, str], dict[str, Path], tuple[str, str]]:
    """Fake adapters for every base and task (tiny-llama's scoring higher), `serve_moving` (two tiny-llama versions,
    champion the first), `serve_corrupt` (unreadable weights) and `serve_pickle` (a pickle file in the folder)."""
    from tracking import registry

    published = {}
    for base, score in zip(BASES, (0.9, 0.7)):  # tiny-llama's adapters score higher: they are the champions
        published |= publish_fake_adapters(uri, root, [f"{base}:{task}" for task in TASKS], score)
    versions = {model: version for model, (version, _) in published.items()}
    folders = {adapter_id(model.split(":")[1], version): folder for model, (version, folder) in published.items()}
    first, second = root / "tiny-llama" / "demo_sentiment", root / "tiny-llama" / "demo_colors"
    moving = (publish_fake_adapter(uri, first, "serve_moving", "tiny-llama", 0.9),
              publish_fake_adapter(uri, second, "serve_moving", "tiny-llama", 0.1))
    registry.promote("serve_moving", moving[0], uri)
    folders |= {adapter_id("serve_moving", moving[0]): first, adapter_id("serve_moving", moving[1]): second}
    for task, extra in (("serve_corrupt", {"adapter_model.safetensors": b"\x00" * 64}),
                        ("serve_pickle", {"adapter_model.bin": b"\x80\x04."})):
        folder = shutil.copytree(first, root / task)
        for name, data in extra.items():
            (folder / name).write_bytes(data)
        publish_fake_adapter(uri, folder, task, "tiny-llama", 0.5)
    return versions, folders, moving


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiEndpoint]:
    import ray
    from ray import serve

    from serving.app import deploy

    root = tmp_path_factory.mktemp("serving-api")
    with own_mlflow_server(root / "mlflow") as uri:
        versions, folders, moving = publish(uri, root / "published")
        config = ServeConfig(
            name="loraland-api", port=free_port(), tracking_uri=uri, api_key=API_KEY,
            adapter_cache_dir=str(root / "cache"), ingress=IngressSettings(num_cpus=0, model_ttl_s=0.5),
            deployments=[
                BaseDeployment(base_model="tiny-llama", device="cpu", num_cpus=0.5, max_adapters_per_replica=4),
                BaseDeployment(base_model="tiny-mistral", device="cpu", num_cpus=0.5, tasks=list(TASKS)),
                # the overload case: one request decoding, one in the engine's queue, one in Serve's queue, the rest 503
                BaseDeployment(base_model="tiny-gemma", device="cpu", num_cpus=0.5, tasks=[], max_queued_requests=1,
                               engine=BatchingEngineConfig(max_batch_size=1, max_queued_requests=1)),
            ])
        metrics_port = free_port()
        # for this module's Ray only: the processes ray.init starts inherit it
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
            ray.init(_node_ip_address="127.0.0.1", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     _metrics_export_port=metrics_port)
            try:
                url = deploy(config, build_fake_engine)
                yield ApiEndpoint(url, metrics_port, uri, versions, folders, moving)
            finally:
                serve.shutdown()
                ray.shutdown()


def test_models_are_listed_and_each_answers_with_its_own_adapter(endpoint: ApiEndpoint) -> None:
    client = endpoint.client()
    listed = {model.id for model in client.models.list()}
    assert set(BASES) | {"tiny-gemma"} | set(ADAPTER_IDS) | set(TASKS) | {"serve_moving",
                                                                          "tiny-llama:serve_moving"} <= listed
    # gemma serves no tasks, mistral TASKS
    assert not {"tiny-gemma:demo_sentiment", "tiny-mistral:serve_moving"} & listed
    for model in ADAPTER_IDS:
        adapter = endpoint.adapter(model)
        response = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
        assert response.choices[0].text.startswith(endpoint.stamp(adapter)) and response.model == model
        assert response.system_fingerprint == adapter and response.usage.completion_tokens == TOKENS
        assert response.usage.total_tokens == response.usage.prompt_tokens + TOKENS and response.usage.prompt_tokens > 0
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                              max_tokens=TOKENS)
        assert chat.choices[0].message.content == response.choices[0].text and chat.choices[0].finish_reason == "length"
        chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                     max_tokens=TOKENS, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed in pieces
        assert chunks[-1].usage.completion_tokens == TOKENS and chunks[-1].choices == []
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    for task in TASKS:  # a task's champion: the best score, tiny-llama's
        response = client.completions.create(model=task, prompt=PROMPT, max_tokens=TOKENS)
        assert response.system_fingerprint == endpoint.adapter(f"tiny-llama:{task}")
    base = client.completions.create(model="tiny-mistral", prompt=PROMPT, max_tokens=8)
    assert base.system_fingerprint == "base" and base.choices[0].text.startswith(stamp(None))
    cut = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=TOKENS, stop=["quick"]).choices[0]
    full = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=TOKENS).choices[0]
    assert cut.finish_reason == "stop" and "quick" in full.text and cut.text == full.text[:full.text.index("quick")]


def test_every_error_has_its_status_and_openai_shape(endpoint: ApiEndpoint) -> None:
    import openai

    error = assert_openai_error(endpoint.post("/completions", {"model": "tiny-llama:no_such_task", "prompt": PROMPT}),
                                404, "model_not_found")
    assert error["param"] == "model" and "tiny-llama:no_such_task" in error["message"]
    assert_openai_error(endpoint.post("/chat/completions",
                                      {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
                        404)
    with pytest.raises(openai.NotFoundError):
        endpoint.client().completions.create(model="nope", prompt=PROMPT)
    bad = [{"model": "tiny-llama", "prompt": PROMPT, "temperature": -1},
           {"model": "tiny-llama", "prompt": PROMPT, "n": 3},
           {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 0}, {"model": "tiny-llama"}, ["not", "an", "object"],
           {"model": "tiny-llama", "prompt": PROMPT, "unknown_parameter": True}]
    for body in bad:
        assert_openai_error(endpoint.post("/completions", body), 400)
    assert_openai_error(endpoint.post("/completions", b"{not json"), 400, "invalid_json")
    assert_openai_error(endpoint.post("/chat/completions", {"model": "tiny-llama",
                                                            "messages": [{"role": "assistant", "content": "x"}]}), 400)
    with pytest.raises(openai.BadRequestError):
        endpoint.client().chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}],
                                                  temperature=5)
    too_long = assert_openai_error(endpoint.post("/completions", {"model": "tiny-llama:demo_sentiment",
                                                                  "prompt": PROMPT * 100}),
                                   400, "context_length_exceeded")
    assert "context" in too_long["message"]
    assert_openai_error(endpoint.post("/completions", {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 100000}),
                        400, "context_length_exceeded")
    assert_openai_error(endpoint.post("/completions", {"model": "tiny-llama", "prompt": PROMPT}, key=None), 401,
                        "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        endpoint.client(api_key="wrong").models.list()
    assert_openai_error(httpx.get(endpoint.url + "/nowhere", headers={"Authorization": f"Bearer {API_KEY}"}), 404)


@pytest.mark.parametrize("marker, status, code", [("[fake:overloaded]", 429, "overloaded"),
                                                  ("[fake:context_too_long]", 400, "context_length_exceeded"),
                                                  ("[fake:adapter_load_error]", 500, "adapter_load_failed")])
def test_an_engine_error_is_its_status_streamed_or_not(endpoint: ApiEndpoint, marker: str, status: int,
                                                       code: str) -> None:
    """Each per-request error of the Engine protocol, raised by the engine, as the API answers it (before any token,
    so a stream gets the status too), and the replica answers the next request."""
    assert marker in FAULTS
    for stream in (False, True):
        body = {"model": "tiny-llama:demo_colors", "prompt": f"{PROMPT} {marker}", "stream": stream}
        error = assert_openai_error(endpoint.post("/completions", body), status, code)
        assert marker in error["message"]
    again = endpoint.post("/completions", {"model": "tiny-llama:demo_colors", "prompt": PROMPT, "max_tokens": 4})
    assert again.status_code == 200


def test_overload_is_503_or_429_with_retry_after(endpoint: ApiEndpoint) -> None:
    """tiny-gemma holds 1 running + 1 queued in its engine and 1 in Serve's queue: a burst of 12 overflows."""
    body = {"model": "tiny-gemma", "prompt": PROMPT, "max_tokens": 48, "temperature": 0}
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: endpoint.post("/completions", body), range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429, 503} and statuses.count(200) >= 1, statuses
    rejected = [r for r in responses if r.status_code != 200]
    assert rejected, statuses
    for response in rejected:
        assert_openai_error(response, response.status_code, "overloaded")
        assert int(response.headers["Retry-After"]) >= 1
    assert endpoint.post("/completions", body).status_code == 200  # and it serves again once the burst is over
    refused = endpoint.post("/completions", body | {"prompt": f"{PROMPT} [fake:overloaded]"})  # the engine's own 429
    assert_openai_error(refused, 429, "overloaded")
    assert int(refused.headers["Retry-After"]) >= 1


def test_corrupt_adapters_fail_only_their_own_requests(endpoint: ApiEndpoint) -> None:
    good_model = "tiny-llama:demo_sentiment"
    bodies = [{"model": m, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
              for m in ("tiny-llama:serve_corrupt", good_model, "tiny-llama:serve_pickle", good_model,
                        "tiny-llama:serve_corrupt")]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: endpoint.post("/completions", body), bodies))
    good = endpoint.stamp(endpoint.adapter(good_model))
    for body, response in zip(bodies, responses):
        if body["model"] == good_model:
            assert response.status_code == 200 and response.json()["choices"][0]["text"].startswith(good)
            continue
        error = assert_openai_error(response, 500, "adapter_load_failed")
        assert "loraland-serve_" in error["message"]  # names the adapter
    pickled = assert_openai_error(endpoint.post("/completions", bodies[2]), 500, "adapter_load_failed")
    assert "pickle" in pickled["message"]
    corrupt = assert_openai_error(endpoint.post("/chat/completions",
                                                {"model": "tiny-llama:serve_corrupt", "stream": True,
                                                                       "messages": [{"role": "user",
                                                                                     "content": PROMPT}]}),
                                  500)
    assert "unreadable" in corrupt["message"] or "safetensors" in corrupt["message"].lower()
    again = endpoint.client().completions.create(model=good_model, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert again.choices[0].text.startswith(good)  # the replica goes on


def test_a_moved_champion_is_served_without_restart(endpoint: ApiEndpoint) -> None:
    from tracking import registry

    first, promoted = (adapter_id("serve_moving", version) for version in endpoint.moving)
    client = endpoint.client()
    response = client.completions.create(model="serve_moving", prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert response.system_fingerprint == first and response.choices[0].text.startswith(endpoint.stamp(first))
    registry.promote("serve_moving", endpoint.moving[1], endpoint.uri)
    deadline = time.monotonic() + 60
    while response.system_fingerprint != promoted and time.monotonic() < deadline:
        time.sleep(0.2)  # the ingress re-reads the registry every model_ttl_s (0.5 s here)
        response = client.completions.create(model="serve_moving", prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert response.system_fingerprint == promoted
    assert response.choices[0].text.startswith(endpoint.stamp(promoted))  # the new version's weights, not the old ones
    assert weights_digest(endpoint.folders[promoted]) != weights_digest(endpoint.folders[first])


def test_one_download_per_adapter_however_many_ask(endpoint: ApiEndpoint, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from core.catalog import load_catalog
    from tracking import registry

    downloads: list[str] = []
    real_download = registry.download_adapter

    def counted(ref: str, dst: Any = None, uri: Any = None, max_bytes: int | None = None) -> Path:
        downloads.append(ref)
        time.sleep(0.2)  # widen the window in which the other threads ask
        return real_download(ref, dst, uri, max_bytes)

    monkeypatch.setattr(registry, "download_adapter", counted)
    sources: list[str] = []
    store = AdapterStore(load_catalog().base_model("tiny-mistral"), tmp_path, endpoint.uri,
                         on_fetch=lambda adapter, source, seconds: sources.append(source))
    adapter = endpoint.adapter("tiny-mistral:demo_colors")
    start = threading.Barrier(8)

    def fetch() -> Path:
        start.wait()
        return store(adapter)

    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: fetch(), range(8)))
    assert len(downloads) == 1 and len(set(folders)) == 1 and sorted(sources) == ["disk"] * 7 + ["download"]
    assert weights_digest(folders[0]) == weights_digest(endpoint.folders[adapter])
    # a tiny-llama adapter, refused by a tiny-mistral store
    with pytest.raises(AdapterLoadError, match="names base model"):
        store(endpoint.adapter("tiny-llama:demo_colors"))


def test_per_adapter_metrics_are_exported_for_prometheus(endpoint: ApiEndpoint) -> None:
    client = endpoint.client()
    model = "tiny-mistral:demo_sentiment"
    adapter = endpoint.adapter(model)
    for _ in range(2):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
    wanted = [("ray_loraland_requests_total", {"model": model, "adapter": adapter, "status": "200"}),
              ("ray_loraland_time_to_first_token_seconds_bucket", {}), ("ray_loraland_request_latency_seconds_count",
                                                                        {}),
              ("ray_loraland_completion_tokens_total", {}), ("ray_loraland_adapter_load_seconds_count", {}),
              ("ray_loraland_adapter_cache_total", {"result": "hit"}),
              ("ray_loraland_adapter_fetches_total", {"source": "download"})]
    found: list[Sample] = []
    deadline = time.monotonic() + 90
    # Ray's agent exports what replicas reported within a few seconds, not all at once
    while time.monotonic() < deadline:
        found = exported_samples(httpx.get(f"http://127.0.0.1:{endpoint.metrics_port}/metrics", timeout=10).text)
        if not missing_samples(found, wanted) and sample_sum(found, *wanted[0]) >= 2:
            break
        time.sleep(1.0)
    assert missing_samples(found, wanted) == []
    assert sample_sum(found, *wanted[0]) >= 2  # this model's two successful requests


def exported_samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def matches(sample: Sample, name: str, labels: dict[str, str]) -> bool:
    return sample.name == name and labels.items() <= sample.labels.items()


def missing_samples(found: list[Sample], wanted: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
    """The (name, labels) pairs of `wanted` that no sample of `found` has (a sample may carry more labels)."""
    return [(name, labels) for name, labels in wanted if not any(matches(sample, name, labels) for sample in found)]


def sample_sum(found: list[Sample], name: str, labels: dict[str, str]) -> float:
    return sum(sample.value for sample in found if matches(sample, name, labels))
