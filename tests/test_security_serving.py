"""The serving findings of issue 23 (M1, M2, M3, M6 and the serving lows), each a test that fails on the code before the
fix, against the real ingress app (`OpenAIIngress.__serve_build_asgi_app__`, the page's routes included) in this
process: no Ray, its base models' replicas stood in for by `LocalServer` (the fake engine of tests/fake_engine.py,
reached through the two handle calls the ingress makes), its registry a fixed view of mlflow entities.

`ingress_app` is also what tests/test_fuzz.py fuzzes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.catalog import load_catalog
from core.errors import ConfigError
from serving.api import (
    MAX_BODY_BYTES,
    MAX_PROMPT_CHARS,
    MAX_STOP_CHARS,
    APIError,
    CompletionRequest,
    GenerateRequest,
    parse_request,
)
from serving.config import BaseDeployment, IngressSettings, ServeConfig
from serving.engine import EngineError
from tests.fake_engine import FakeEngine, build_fake_engine, fake_adapter_folder
from tests.test_serving import version
from tests.test_web_data import card_of
from tests.tracking_fixtures import Server
from tracking.registry import TaskAdapters

FULL_KEY = "sk-fuzz-every-model-0123"
SCOPED_KEY = "sk-fuzz-colors-only-0123"
KEYS = f"keys:\n  - {{name: colors, key: {SCOPED_KEY}, models: ['*:demo_colors']}}\n"
BASES = ("tiny-llama", "tiny-mistral")
RUN_CARDS = {"run1": "demo_sentiment", "run2": "demo_sentiment", "colors1": "demo_colors"}


def published() -> dict[str, TaskAdapters]:
    """demo_sentiment on both bases (v2 on tiny-mistral the champion), demo_colors on tiny-llama; every run a card."""
    sentiment = [version("demo_sentiment", 1, "tiny-llama", 0.8), version("demo_sentiment", 2, "tiny-mistral", 0.9)]
    colors = version("demo_colors", 1, "tiny-llama", 0.5)
    sentiment[0]._run_id, sentiment[1]._run_id, colors._run_id = "run1", "run2", "colors1"
    return {"demo_sentiment": TaskAdapters("demo_sentiment", sentiment, champion="2"),
            "demo_colors": TaskAdapters("demo_colors", [colors], champion="1")}


class LocalCall:
    """What `handle.options(stream=True).generate.remote(...)` gives the ingress: events, and `cancel`."""

    def __init__(self, events: AsyncIterator[Any]) -> None:
        self.events = events

    def __anext__(self) -> Any:
        return self.events.__anext__()

    def cancel(self) -> None:
        """Nothing to stop in this process: the generator is closed when dropped."""


@dataclass
class LocalServer:
    """A base model's replica for the ingress alone: the fake engine, encoding as the replica does."""

    engine: FakeEngine
    chat_format: str
    encoded: list[int] = field(default_factory=list)  # the length of every prompt encoded

    def options(self, **_: Any) -> LocalServer:
        return self

    @property
    def generate(self) -> Any:
        return _Remote(lambda request, adapter: LocalCall(self.answer(request, adapter)))

    @property
    def prompt_tokens(self) -> Any:
        return _Remote(self.count)

    def encode(self, request: GenerateRequest) -> list[int]:
        from jobs.encoding import encode_prompt
        from serving.chat import render_chat

        text = request.prompt if request.prompt is not None else render_chat(list(request.messages),
                                                                             self.chat_format)
        self.encoded.append(len(text))
        return encode_prompt(self.engine.tokenizer, text)

    async def answer(self, request: GenerateRequest, adapter: str | None) -> AsyncIterator[Any]:
        from serving.replica import engine_error

        try:
            ids = await asyncio.to_thread(self.encode, request)
            max_tokens = request.max_tokens or max(1, self.engine.max_context_tokens - len(ids))
            async for delta in self.engine.generate(ids, adapter, request.sampling(max_tokens)):
                yield delta
        except EngineError as error:
            yield engine_error(error)

    async def count(self, prompt: str) -> tuple[int, int]:
        from jobs.encoding import encode_prompt

        ids = await asyncio.to_thread(encode_prompt, self.engine.tokenizer, prompt)
        return len(ids), self.engine.max_context_tokens


@dataclass
class _Remote:
    call: Any

    def remote(self, *args: Any) -> Any:
        return self.call(*args)


def local_servers(root: Path) -> dict[str, LocalServer]:
    """A LocalServer per base of BASES, fetching fake adapter folders made on demand under `root`."""
    from serving.config import BatchingEngineConfig

    servers = {}
    for base in BASES:
        spec = load_catalog().base_model(base)

        def fetch(adapter: str, hf_id: str = spec.hf_id) -> Path:
            return fake_adapter_folder(root / adapter.replace("/", "@"), hf_id, seed=len(adapter))

        engine = build_fake_engine(spec, "fp32", "cpu", fetch, BatchingEngineConfig(max_batch_size=8,
                                                                                    max_queued_requests=64))
        servers[base] = LocalServer(engine, spec.chat_format)
    return servers


def ingress_app(tracking_uri: str, servers: dict[str, LocalServer], api_key: str | None = FULL_KEY,
                allowed_hosts: tuple[str, ...] = ()) -> FastAPI:
    """The real ingress's ASGI app over `servers`, the fixed registry view and the shipped tasks' cards; runs' scores
    are read from `tracking_uri` (the session's mlflow server, which has none of them: no scores)."""
    from serving.app import OpenAIIngress, as_deployment

    config = ServeConfig(api_key=api_key, allowed_hosts=list(allowed_hosts), ingress=IngressSettings(model_ttl_s=60),
                         deployments=[BaseDeployment(base_model=base, device="cpu") for base in BASES])
    cards = {run_id: card_of(task) for run_id, task in RUN_CARDS.items()}
    wrapper: Any = as_deployment(OpenAIIngress).func_or_class  # Serve's ASGI wrapper around the class
    ingress_class = wrapper.__bases__[0]  # the class itself, constructed outside Serve
    ingress = ingress_class(config, servers, tracking_uri,
                                          registry_reader=published, cards=cards.get)
    app: FastAPI = ingress.__serve_build_asgi_app__()
    return app


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LocalServer]:
    return local_servers(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def keyed(mlflow_server: Server, servers: dict[str, LocalServer]) -> Iterator[TestClient]:
    """The app with the every-model key and the colors-only key (from $LORALAND_API_KEYS)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LORALAND_API_KEYS", KEYS)
        env.delenv("LORALAND_API_KEYS_FILE", raising=False)
        app = ingress_app(mlflow_server.uri, servers)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


@pytest.fixture(scope="module")
def keyless(mlflow_server: Server, servers: dict[str, LocalServer]) -> Iterator[TestClient]:
    with pytest.MonkeyPatch.context() as env:
        env.delenv("LORALAND_API_KEYS", raising=False)
        env.delenv("LORALAND_API_KEYS_FILE", raising=False)
        app = ingress_app(mlflow_server.uri, servers, api_key=None, allowed_hosts=("serve.example",))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def served_list(message: str) -> str:
    return message.rsplit("served: ", 1)[-1]


# --------------------------------------------------------------------------- M1: the page under the key's scope


@pytest.mark.integration
def test_page_routes_apply_the_keys_scope_as_v1_does(keyed: TestClient) -> None:
    """M1: a key scoped to `*:demo_colors` sees, through /web/api, only what /v1/models lists for it: the task list, a
    task's page, its 404 (which lists no task outside the scope), examples, scores and the prompt route's model ids."""
    scoped, full = auth(SCOPED_KEY), auth(FULL_KEY)
    listed = {card["id"] for card in keyed.get("/v1/models", headers=scoped).json()["data"]}
    assert listed == {"demo_colors", "tiny-llama:demo_colors"}
    assert {t["name"] for t in keyed.get("/web/api/tasks", headers=full).json()["tasks"]} == {
        "demo_colors", "demo_sentiment"}
    tasks = keyed.get("/web/api/tasks", headers=scoped).json()["tasks"]
    assert [task["name"] for task in tasks] == ["demo_colors"]
    assert tasks[0]["base_models"] == ["tiny-llama"]
    for path in ("/web/api/tasks/demo_sentiment", "/web/api/tasks/demo_sentiment/example", "/web/api/tasks/nothing"):
        hidden = keyed.get(path, headers=scoped)
        assert hidden.status_code == 404, path
        assert served_list(hidden.json()["error"]["message"]) == "demo_colors", path
    for route in ("prompt", "score"):
        body = {"fields": {"review": "fine"}} if route == "prompt" else {"prediction": "a", "gold": "a"}
        assert keyed.post(f"/web/api/tasks/demo_sentiment/{route}", headers=scoped, json=body).status_code == 404
    detail = keyed.get("/web/api/tasks/demo_colors", headers=scoped).json()
    assert set(detail["models"]) <= listed and {row["model"] for row in detail["leaderboard"]} <= listed
    field = detail["fields"][0]["name"]
    probe = keyed.post("/web/api/tasks/demo_colors/prompt", headers=scoped,
                       json={"fields": {field: "red"}, "models": ["demo_sentiment"]})
    assert probe.status_code == 404 and probe.json()["error"]["code"] == "model_not_found"
    assert "demo_sentiment" not in served_list(probe.json()["error"]["message"])
    unknown = keyed.post("/web/api/tasks/demo_colors/prompt", headers=scoped,
                         json={"fields": {field: "red"}, "models": ["no-such-model"]})
    assert served_list(unknown.json()["error"]["message"]) == served_list(probe.json()["error"]["message"])
    allowed = keyed.post("/web/api/tasks/demo_colors/prompt", headers=scoped,
                         json={"fields": {field: "red"}, "models": ["demo_colors"]})
    assert allowed.status_code == 200 and allowed.json()["checks"]["demo_colors"]["fits"] is True
    everything = keyed.get("/web/api/tasks/demo_sentiment", headers=full).json()
    assert set(everything["models"]) == {"tiny-llama:demo_sentiment", "tiny-mistral:demo_sentiment", *BASES}


# --------------------------------------------------------------------------- M2: scoring bounded and off the loop


@pytest.mark.integration
def test_scores_are_capped_and_computed_off_the_event_loop(keyed: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """M2: the score route refuses text over MAX_SCORE_CHARS with a 400 naming the cap, and computes ROUGE-L in a
    worker thread, never on the event loop that serves /v1."""
    import serving.webapp as webapp

    threads: list[str] = []
    real = webapp.answer_score

    def recorded(*args: Any) -> float | None:
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(webapp, "answer_score", recorded)
    long = "word " * (webapp.MAX_SCORE_CHARS // 5) + "x"
    refused = keyed.post("/web/api/tasks/demo_sentiment/score", headers=auth(FULL_KEY),
                         json={"prediction": long, "gold": "positive"})
    assert refused.status_code == 400 and str(webapp.MAX_SCORE_CHARS) in refused.json()["error"]["message"]
    assert refused.json()["error"]["param"] == "prediction"
    scored = keyed.post("/web/api/tasks/demo_sentiment/score", headers=auth(FULL_KEY),
                        json={"prediction": "positive", "gold": "positive"})
    assert scored.status_code == 200 and scored.json()["score"] == 1.0
    assert threads and all(name.startswith("page-score") for name in threads), threads


# --------------------------------------------------------------------------- M3: bounded bodies and prompts


@pytest.mark.integration
def test_bodies_and_prompts_are_capped_before_anything_tokenizes(keyed: TestClient,
                                                                 servers: dict[str, LocalServer]) -> None:
    """M3: a body over MAX_BODY_BYTES is a 413 on every POST route (declared or streamed without a length), a prompt
    or chat over MAX_PROMPT_CHARS a 400 naming the cap, and neither reaches the replica's tokenizer."""
    before = sum(len(server.encoded) for server in servers.values())
    big = b'{"model": "tiny-llama", "prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
    for path in ("/v1/completions", "/v1/chat/completions", "/web/api/tasks/demo_sentiment/prompt",
                 "/web/api/tasks/demo_sentiment/score"):
        declared = keyed.post(path, headers=auth(FULL_KEY) | {"content-type": "application/json"}, content=big)
        assert declared.status_code == 413, path
        assert str(MAX_BODY_BYTES) in declared.json()["error"]["message"], path
        streamed = keyed.post(path, headers=auth(FULL_KEY) | {"content-type": "application/json"},
                              content=iter([big[:1000], big[1000:]]))
        assert streamed.status_code == 413, path
    prompt = "a" * (MAX_PROMPT_CHARS + 1)
    completion = keyed.post("/v1/completions", headers=auth(FULL_KEY), json={"model": "tiny-llama", "prompt": prompt})
    chat = keyed.post("/v1/chat/completions", headers=auth(FULL_KEY),
                      json={"model": "tiny-llama", "messages": [{"role": "system", "content": prompt[:1000]},
                                                                {"role": "user", "content": prompt[1000:]}]})
    for refused, param in ((completion, "prompt"), (chat, "messages")):
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param
        assert str(MAX_PROMPT_CHARS) in refused.json()["error"]["message"]
    assert sum(len(server.encoded) for server in servers.values()) == before
    fits = keyed.post("/v1/completions", headers=auth(FULL_KEY), json={"model": "tiny-llama", "prompt": "hi"})
    assert fits.status_code == 200


# --------------------------------------------------------------------------- lows


@pytest.mark.unit
def test_seeds_beyond_64_bits_and_long_stop_strings_are_400s() -> None:
    """Low: a seed beyond 64 bits was a 500 from the engine's generator, and stop strings were bounded in number only
    (each one is searched for after every token on the shared decode thread): both are 400s naming the parameter."""
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(APIError) as refused:
            parse_request(CompletionRequest, {"model": "m", "prompt": "p", "seed": seed})
        assert (refused.value.status, refused.value.param) == (400, "seed")
    assert parse_request(CompletionRequest, {"model": "m", "prompt": "p", "seed": 2**63 - 1}).seed == 2**63 - 1
    with pytest.raises(APIError) as long_stop:
        parse_request(CompletionRequest, {"model": "m", "prompt": "p", "stop": ["x" * (MAX_STOP_CHARS + 1)]})
    assert long_stop.value.param == "stop" and str(MAX_STOP_CHARS) in long_stop.value.message


@pytest.mark.unit
def test_a_malformed_keys_file_never_shows_a_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """M6: a keys file whose key is too short is refused naming the field and the problem, never the key (at start,
    and in the log when a reload fails); other fields still show what they got."""
    from serving.auth import KeyRing

    secret = "sk-live-abc123"
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - {{name: ops, key: {secret}, models: 7}}\n")
    with pytest.raises(ConfigError) as refused:
        KeyRing.from_settings(None, str(path))
    text = str(refused.value)
    assert secret not in text and "keys[0].key" in text and "16 characters" in text, text
    assert "keys[0].models" in text and "(got 7)" in text
    path.write_text(f"keys:\n  - {{name: ops, key: {'k' * 20}}}\n")
    ring = KeyRing.from_settings(None, str(path))
    path.write_text(f"keys:\n  - {{name: ops, key: {secret}}}\n")
    with caplog.at_level(logging.ERROR, logger="serving.auth"):
        ring.reload()
    assert "keys[0].key" in caplog.text and secret not in caplog.text
    assert ServeConfig.model_json_schema()["properties"]["api_key"].get("secret") is True  # the config's key too


@pytest.mark.unit
def test_deleting_the_keys_file_revokes_its_keys(tmp_path: Path) -> None:
    """Low: a keys file that is gone revokes its keys (it kept them before); the endpoint stays closed (401), and
    the page still says a key is needed when keys come only from a file."""
    from serving.auth import KeyRing

    path = tmp_path / "keys.yaml"
    path.write_text(KEYS)
    ring = KeyRing.from_settings(None, str(path))
    assert ring.authenticate(f"Bearer {SCOPED_KEY}").name == "colors" and ring.required
    path.unlink()
    with pytest.raises(APIError) as revoked:
        ring.authenticate(f"Bearer {SCOPED_KEY}")
    assert revoked.value.status == 401 and ring.required
    path.write_text(KEYS)
    assert ring.authenticate(f"Bearer {SCOPED_KEY}").name == "colors"


@pytest.mark.integration
def test_the_page_says_a_key_is_needed_when_keys_come_from_a_file_only(tmp_path: Path, mlflow_server: Server,
                                                                        servers: dict[str, LocalServer]) -> None:
    """Low: with keys only in a keys file (no `api_key`), the page's settings say a key is needed."""
    (tmp_path / "keys.yaml").write_text(KEYS)
    with pytest.MonkeyPatch.context() as env:
        env.delenv("LORALAND_API_KEYS", raising=False)
        env.setenv("LORALAND_API_KEYS_FILE", str(tmp_path / "keys.yaml"))
        app = ingress_app(mlflow_server.uri, servers, api_key=None)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/web/api/settings").json() == {"api_key_required": True}
        assert client.get("/web/api/tasks").status_code == 401


@pytest.mark.unit
def test_tracking_credentials_never_reach_clients_or_links() -> None:
    """Low: a tracking URI's `user:pass@` is cut from every API error body (a 503 names the tracking server) and from
    the page's MLflow links."""
    from serving.adapters import check_tracking, registry_unavailable
    from tracking.scores import run_link

    uri = "http://alice:s3cret@127.0.0.1:9/"
    with pytest.raises(ConnectionError) as down:
        check_tracking(uri, probe_s=0.2)
    body = bytes(registry_unavailable(str(down.value)).response().body).decode()
    assert "s3cret" not in body and "alice" not in body and "127.0.0.1:9" in body
    assert run_link(uri, "7", "r1") == "http://127.0.0.1:9/#/experiments/7/runs/r1"


@pytest.mark.integration
def test_a_keyless_endpoint_takes_json_only_and_checks_the_host(keyless: TestClient) -> None:
    """Low: without keys, a POST whose Content-Type is not JSON (a cross-site form) is a 415, and a Host that is not
    an IP address, localhost or an allowed name (DNS rebinding) a 400; keyed or not, /docs and the schema are not
    served (no Swagger from a CDN)."""
    body = '{"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}'
    for path in ("/v1/completions", "/web/api/tasks/demo_sentiment/score"):
        form = keyless.post(path, content=body, headers={"content-type": "text/plain"})
        assert form.status_code == 415 and form.json()["error"]["code"] == "invalid_content_type", path
    assert keyless.post("/v1/completions", content=body, headers={"content-type": "application/json"}).status_code \
        == 200
    for host, status in (("evil.example", 400), ("evil.example:8000", 400), ("127.0.0.1:8000", 200),
                         ("localhost", 200), ("[::1]:8000", 200), ("serve.example:80", 200)):
        answer = keyless.get("/v1/models", headers={"host": host})
        assert answer.status_code == status, host
    assert keyless.get("/v1/models", headers={"host": "evil.example"}).json()["error"]["code"] == "invalid_host"
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert keyless.get(path).status_code == 404, path


@pytest.mark.unit
def test_binding_every_interface_without_keys_is_warned_in_one_line() -> None:
    """Low: `loraland serve` (serving.app.deploy) warns in one line when it binds 0.0.0.0 without keys."""
    from serving.app import open_bind_warning

    config = ServeConfig(host="0.0.0.0", deployments=[BaseDeployment(base_model="tiny-llama")])
    warning = open_bind_warning(config, keys_required=False)
    assert warning is not None and "\n" not in warning and "0.0.0.0" in warning and "api_keys_file" in warning
    assert open_bind_warning(config, keys_required=True) is None
    assert open_bind_warning(config.model_copy(update={"host": "127.0.0.1"}), keys_required=False) is None


@contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """`app` behind uvicorn on loopback in a thread (one event loop, as in a Serve replica); yields its URL."""
    import uvicorn

    from core.ports import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            threading.Event().wait(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def probe_models(url: str, key: str) -> int:
    """/v1/models within 1 s (a bound on a hang, not a speed check): its status."""
    return httpx.get(f"{url}/v1/models", headers=auth(key), timeout=1.0).status_code


@pytest.mark.unit
def test_adapter_weights_are_size_and_shape_checked_before_being_read(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Low: an adapter file larger than a rank-`max_rank` adapter of the base can be, or whose safetensors header
    lists tensors of another shape, is refused before its weights are read (it used to be read whole first)."""
    import json

    import torch
    from safetensors.torch import save_file

    import serving.lora as lora

    layers = {"model.layers.0.self_attn.q_proj": (16, 16)}
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    read: list[str] = []

    def load_file(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        read.append(path)
        return {}

    monkeypatch.setattr(lora, "load_file", load_file)

    def adapter(name: str, a: torch.Tensor, b: torch.Tensor) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
        save_file({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, str(folder / "adapter_model.safetensors"))
        return folder

    wrong_shape = adapter("shape", torch.zeros(4, 32), torch.zeros(16, 4))
    with pytest.raises(lora.AdapterFormatError, match="has shapes"):
        lora.read_adapter(wrong_shape, layers, 8, torch.float32)
    too_big = adapter("big", torch.zeros(4, 16), torch.zeros(16, 4 + 2**18))
    with pytest.raises(lora.AdapterFormatError, match="bytes"):
        lora.read_adapter(too_big, layers, 8, torch.float32)
    assert read == []


@pytest.mark.unit
def test_a_slow_or_failing_registry_never_stalls_ids_of_the_cached_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """Low: while a registry read hangs, ids of the cached view still resolve (the read no longer holds a lock every
    request waits on), and a failing registry is read again only after a back-off, not on every request."""
    import serving.adapters as adapters

    monkeypatch.setattr(adapters, "REGISTRY_BACKOFF_S", 60.0)
    release, reads = threading.Event(), list[int]()

    def read() -> dict[str, TaskAdapters]:
        reads.append(len(reads))
        if len(reads) == 2:
            release.wait(30)  # the second read hangs until the test lets it go
        if len(reads) >= 3:
            raise ConnectionError("registry down")
        return published()

    resolver = adapters.ModelResolver({base: None for base in BASES}, read, ttl_s=0, timeout_s=30)

    async def scenario() -> None:
        assert (await resolver.resolve("demo_colors")).base_model == "tiny-llama"  # the first read: a view
        await asyncio.sleep(0.01)
        for _ in range(3):  # the second read hangs meanwhile: the cached view answers (1 s bounds a hang)
            assert (await asyncio.wait_for(resolver.resolve("demo_colors"), 1)).adapter == "loraland-demo_colors/1"
        release.set()
        while resolver.reading is not None:
            await asyncio.sleep(0.01)
        for _ in range(5):  # the third read fails: backing off, the view is served and the registry left alone
            assert (await resolver.resolve("demo_sentiment")).base_model == "tiny-mistral"
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(scenario(), 60))
    release.set()
    assert len(reads) == 3, reads


@pytest.mark.integration
def test_an_adapter_artifact_too_large_is_refused_before_it_is_downloaded(tmp_path: Path,
                                                                          mlflow_server: Server) -> None:
    """Low: adapter downloads had no size cap (the whole artifact was fetched, then read). The replica's store now
    refuses an artifact whose listed files exceed its cap before a byte is fetched, and the refusal names both sizes."""
    from tracking import registry, store

    folder = fake_adapter_folder(tmp_path / "adapter", load_catalog().base_model("tiny-llama").hf_id, seed=1)
    client = store.client(mlflow_server.uri)
    experiment = store.ensure_experiment("adapter-size-cap", mlflow_server.uri)
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(folder), store.ADAPTER_ARTIFACT)
    listed = registry.artifact_bytes(run.info.run_id, store.ADAPTER_ARTIFACT, mlflow_server.uri)
    assert listed == sum(path.stat().st_size for path in folder.iterdir())
    target = tmp_path / "downloaded"
    with pytest.raises(ValueError, match=f"holds {listed} bytes, more than the {listed - 1}"):
        registry.download_adapter(run.info.run_id, target, mlflow_server.uri, max_bytes=listed - 1)
    assert not target.exists() and not target.with_name(".downloaded.partial").exists()  # nothing was fetched
    assert (registry.download_adapter(run.info.run_id, target, mlflow_server.uri, max_bytes=listed) / "adapter_config"
            ".json").is_file()
