"""Serving: the OpenAI-compatible Ray Serve app over adapters published by a tiny sweep.

Unit tests cover the pieces alone (model-id resolution over real registry entities, chat formats,
request validation, adapter file checks, serve configs and their engine settings, the health check). The
cluster-tier tests start a real Serve app with the real engine on loopback (Ray on 127.0.0.1, HTTP on a free port)
in front of the session's real `mlflow server`, and talk to it with the official `openai` client: every adapter's
greedy answer must equal what the same adapter gives offline (PEFT + `jobs.evaluate.generate`). The ingress's
errors, overload, adapter loading and metrics are tests/test_serving_api.py's, over the fake engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

from core.errors import ConfigError
from core.paths import PROJECT_ROOT
from core.ports import free_port
from orchestrator.cli import main as cli
from serving.adapters import adapter_id, check_adapter_files, model_ids, resolve
from serving.api import APIError, ChatCompletionRequest, CompletionRequest, parse_request
from serving.chat import Message, render_chat
from serving.config import BaseDeployment, IngressSettings, ServeConfig, load_serve_config
from serving.engine import AdapterLoadError
from tests.tracking_fixtures import BASES, TASKS, Sweep
from tracking.registry import TaskAdapters

API_KEY = "sk-test-loraland"
PROMPTS_PER_ADAPTER = 3
MAX_TOKENS = 12  # every greedy request here and offline asks for this many tokens


# --------------------------------------------------------------------------- unit: pieces alone


def version(task: str, number: int, base: str, score: float) -> ModelVersion:
    tags = [ModelVersionTag("loraland.base_model", base), ModelVersionTag("loraland.score", repr(score))]
    return ModelVersion(f"loraland-{task}", str(number), 0, tags=tags)


@pytest.mark.unit
def test_model_ids_resolve_to_base_pair_and_champion() -> None:
    published = {
        "sentiment": TaskAdapters("sentiment",
                                  [version("sentiment", 1, "llama", 0.9), version("sentiment", 2, "mistral", 0.7),
                                                version("sentiment", 3, "llama", 0.95)], champion="2"),
        "colors": TaskAdapters("colors", [version("colors", 1, "gemma", 0.5)], champion="1"),  # gemma is not served
        "math": TaskAdapters("math", [version("math", 1, "llama", 0.2)], champion=None),
    }
    served = {"llama": None, "mistral": frozenset({"sentiment"})}
    assert resolve("llama", published, served).adapter is None
    assert resolve("llama:sentiment", published, served).adapter == "loraland-sentiment/3"  # best llama version
    assert resolve("mistral:sentiment", published, served).adapter == "loraland-sentiment/2"  # the champion, on mistral
    sentiment = resolve("sentiment", published, served)
    assert (sentiment.base_model, sentiment.adapter) == ("mistral", "loraland-sentiment/2")
    assert resolve("llama:math", published, served).adapter == "loraland-math/1"
    for unknown in ("gemma", "colors", "math", "mistral:math", "llama:colors", "nope", "llama:", ":sentiment"):
        assert resolve(unknown, published, served) is None, unknown
    ids = [model_id for model_id, _ in model_ids(published, served)]
    assert ids == ["llama", "mistral", "llama:math", "llama:sentiment", "mistral:sentiment", "sentiment"]


@pytest.mark.unit
def test_resolver_reuses_its_view_and_survives_a_registry_outage() -> None:
    """One registry read per TTL; when a read fails the last view is served; with no view yet, a 503."""
    import asyncio

    from serving.adapters import ModelResolver

    published = {"sentiment": TaskAdapters("sentiment", [version("sentiment", 1, "llama", 0.9)], champion="1")}
    reads: list[str] = []

    def read() -> dict[str, TaskAdapters]:
        reads.append("read")
        if len(reads) > 1:
            raise ConnectionError("registry down")
        return published

    async def scenario() -> None:
        resolver = ModelResolver({"llama": None}, read, ttl_s=3600, timeout_s=5)
        assert (await resolver.resolve("sentiment")).adapter == "loraland-sentiment/1"
        assert (await resolver.resolve("llama:sentiment")).adapter == "loraland-sentiment/1" and len(reads) == 1
        resolver.ttl_s = 0  # every call re-reads now (in the background: the view answers meanwhile), and reads fail
        assert (await resolver.resolve("sentiment")).adapter == "loraland-sentiment/1"
        while resolver.reading is not None:
            await asyncio.sleep(0.01)
        assert len(reads) == 2 and (await resolver.resolve("sentiment")).adapter == "loraland-sentiment/1"
        assert (await resolver.resolve("llama")).adapter is None  # a base model needs no registry at all
        with pytest.raises(APIError) as caught:
            await ModelResolver({"llama": None}, read, ttl_s=0, timeout_s=5).resolve("sentiment")
        assert caught.value.status == 503 and caught.value.code == "registry_unavailable" and caught.value.retry_after_s

    asyncio.run(scenario())


@pytest.mark.parametrize("chat_format, expected", [
    ("llama2", "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST]"),
    ("mistral", "[INST] Be brief.\n\nHi [/INST]Hello</s>[INST] Bye [/INST]"),
    ("zephyr",
     "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n<|user|>\nBye</s>\n<|assistant|>\n"),
    ("gemma", "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
              "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"),
    ("phi", "Instruct: Be brief.\n\nHi\nOutput: Hello\nInstruct: Bye\nOutput:"),
    ("plain", "Be brief.\nHi\nHello\nBye"),
])
@pytest.mark.unit
def test_chat_formats(chat_format: str, expected: str) -> None:
    messages = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello"),
                Message("user", "Bye")]
    assert render_chat(messages, chat_format) == expected


@pytest.mark.parametrize("schema, body, param", [
    (CompletionRequest, {"model": "m", "prompt": "p", "temperature": -1}, "temperature"),
    (CompletionRequest, {"model": "m", "prompt": "p", "n": 2}, "n"),
    (CompletionRequest, {"model": "m", "prompt": "p", "max_tokens": 0}, "max_tokens"),
    (CompletionRequest, {"model": "m", "prompt": "p", "top_p": 0}, "top_p"),
    (CompletionRequest, {"model": "m", "prompt": "p", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    (CompletionRequest, {"model": "m", "prompt": "p", "logprobs": 2}, "logprobs"),
    (CompletionRequest, {"model": "m", "prompt": "p", "frequency_penalty": 0.5}, "frequency_penalty"),
    (CompletionRequest, {"model": "m", "prompt": "p", "bogus": 1}, "bogus"),
    (CompletionRequest, {"model": "m", "prompt": ["a", "b"]}, "prompt"),
    (CompletionRequest, {"model": "m"}, "prompt"),
    (ChatCompletionRequest, {"model": "m", "messages": []}, "messages"),
    (ChatCompletionRequest,
     {"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages"),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    (ChatCompletionRequest,
     {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
])
@pytest.mark.unit
def test_bad_parameters_are_400_naming_the_parameter(schema: type, body: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_request(schema, body)
    error = caught.value
    assert error.status == 400 and error.param == param and error.type == "invalid_request_error"
    assert set(error.body()["error"]) == {"message", "type", "param", "code"} and param in error.message


@pytest.mark.unit
def test_valid_requests_parse_with_openai_defaults() -> None:
    completion = parse_request(CompletionRequest, {"model": "m", "prompt": ["p"], "stop": "x"})
    parsed = (completion.max_tokens, completion.temperature, completion.stop_strings(), completion.prompt_text())
    assert parsed == (16, 1.0, ("x",), "p")
    chat = parse_request(ChatCompletionRequest, {"model": "m", "max_completion_tokens": 5, "messages": [
        {"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert [m.to_message() for m in chat.messages] == [Message("system", "be brief"), Message("user", "hi")]


def adapter_folder(root: Path, base_hf_id: str, extra: dict[str, bytes] | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                          "base_model_name_or_path": base_hf_id}))
    (root / "adapter_model.safetensors").write_bytes(b"checked by the engine")
    (root / "README.md").write_text("model card")
    for name, data in (extra or {}).items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("extra, message", [
    ({"adapter_model.bin": b"pickle"}, "pickle weights and code are refused"),
    ({"modeling_custom.py": b"import os"}, "pickle weights and code are refused"),
    ({"adapter_config.json": b"{not json"}, "not valid JSON"),
    ({"adapter_config.json": json.dumps({"base_model_name_or_path": "tiny/tiny-mistral"}).encode()},
     "names base model 'tiny/tiny-mistral'"),
])
@pytest.mark.unit
def test_adapter_files_only_json_and_safetensors_of_this_base(tmp_path: Path, extra: dict[str, bytes],
                                                              message: str) -> None:
    from core.catalog import load_catalog

    base = load_catalog().base_model("tiny-llama")
    check_adapter_files(adapter_folder(tmp_path / "ok", base.hf_id), base)
    with pytest.raises(AdapterLoadError, match=message):
        check_adapter_files(adapter_folder(tmp_path / "bad", base.hf_id, extra), base)


@pytest.mark.unit
def test_serve_config_file_is_ray_serve_format_and_ours() -> None:
    """configs/serve/demo.yaml is what `serve run` reads (Ray's schema, our builder) and what `loraland serve` reads."""
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from serving.app import build_app
    from serving.replica import server_options

    path = PROJECT_ROOT / "configs/serve/demo.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert schema.http_options.host == "127.0.0.1" and schema.applications[0].import_path == "serving.app:build_app"
    config = load_serve_config(path)
    assert (config.name, config.host, config.port, config.route_prefix) == ("loraland-demo", "127.0.0.1", 8000, "/")
    assert [d.base_model for d in config.deployments] == ["tiny-llama", "tiny-mistral"]
    assert isinstance(build_app(schema.applications[0].args), Application)
    options = server_options(config.deployments[0])
    assert options["max_ongoing_requests"] == 64 + 256 and options["num_replicas"] == 1
    scaled = server_options(BaseDeployment(base_model="tiny-llama", autoscaling={"min_replicas": 0, "max_replicas": 4}))
    assert "num_replicas" not in scaled and scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4,
                                                                             "target_ongoing_requests": 16}


@pytest.mark.unit
def test_bad_serve_config_is_one_line_per_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications:\n  - import_path: serving.app:build_app\n    args:\n      port: 9\n"
                   "      deployments: [{base_model: nope, precision: 8bit}]\n")
    assert cli(["serve", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {bad}: applications[].args.port: set it on the application entry (name, route_prefix) "
                     "or in http_options (host, port), not in args"]
    bad.write_text("deployments: [{base_model: nope, precision: 8bit}]\n")
    assert cli(["serve", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "precision" in lines[0] and "unknown base model 'nope'" in lines[1]
    bad.write_text("deployments: [{base_model: tiny-llama, engine: {target_modules: [fc1]}}]\n")  # a phi layer name
    assert cli(["serve", str(bad)]) == 2
    assert "deployments[0].engine.target_modules: none of ['fc1'] is a linear layer" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        load_serve_config(tmp_path / "missing.yaml")


@pytest.mark.unit
def test_engine_settings_that_disagree_are_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The engine is picked by `kind` (batching when absent); settings that disagree are refused, one line each, naming
    the field; an unknown kind names the known ones."""
    bad = tmp_path / "serve.yaml"
    bad.write_text("deployments:\n"
                   "  - {base_model: tiny-llama, max_adapters_per_replica: 100, num_gpus: 1, device: cuda,\n"
                   "     engine: {kind: vllm, max_loras: 70, max_cpu_loras: 64}}\n"
                   "  - {base_model: tiny-mistral, max_adapters_per_replica: 8, engine: {host_adapter_slots: 4,\n"
                   "     device_adapter_slots: 2, pinned_adapters: [a, b], max_running_per_adapter: 80}}\n"
                   "  - {base_model: tiny-gemma, engine: {kind: tgi}}\n")
    assert cli(["serve", str(bad)]) == 2
    lines = [line.removeprefix(f"error: {bad}: ") for line in capsys.readouterr().err.strip().splitlines()]
    expected = ["deployments[0].max_adapters_per_replica: Serve would keep more adapters per replica than vLLM's "
                "max_cpu_loras (64)", "deployments[0].engine.max_loras: exceeds max_cpu_loras (64)",
                "deployments[1].engine.pinned_adapters: 2 pinned adapters leave no free slot of "
                "device_adapter_slots (2)",
                "deployments[1].max_adapters_per_replica: Serve would keep more adapters per replica than the engine's "
                "host_adapter_slots (4)", "deployments[1].engine.max_running_per_adapter: exceeds max_batch_size (64)",
                "deployments[2].engine: Input tag 'tgi' found using 'kind' does not match any of the expected tags: "
                "'batching', 'vllm'"]
    assert len(lines) == len(expected) and all(line.startswith(start) for line, start in zip(lines, expected)), lines
    assert "(got 100)" in lines[0] and "(got ['a', 'b'])" in lines[2]
    fine = load_serve_config(PROJECT_ROOT / "configs/serve/demo.yaml").deployments[0]
    assert fine.engine.kind == "batching"
    vllm = BaseDeployment(base_model="tiny-llama", num_gpus=1, max_adapters_per_replica=8, engine={"kind": "vllm"})
    assert vllm.engine.kind == "vllm" and vllm.engine.max_cpu_loras >= 8


@pytest.mark.unit
def test_health_check_fails_when_the_decode_loop_dies(tmp_path: Path) -> None:
    """Serve's health check on a base model's replica is the engine's: alive, then dead after shutdown."""
    from serving.engines import build_engine
    from serving.replica import BaseModelServer

    server = BaseModelServer.func_or_class(BaseDeployment(base_model="tiny-llama", device="cpu"),
                                           "sqlite:///" + str(tmp_path / "m.db"), str(tmp_path / "cache"), None,
                                           build_engine)
    server.check_health()
    server.engine.shutdown()
    with pytest.raises(RuntimeError, match="decode loop"):
        server.check_health()


# --------------------------------------------------------------------------- cluster: a real app on loopback


@dataclass
class Http:
    """An app's OpenAI base URL, with the official client and raw HTTP, both with the test's key by default."""

    url: str

    def client(self, api_key: str = API_KEY) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=120)

    def post(self, path: str, body: Any, key: str | None = API_KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(self.url + path, content=content, headers=headers | {"Content-Type": "application/json"},
                          timeout=120)


@dataclass
class Endpoint(Http):
    sweep: Sweep
    offline: dict[tuple[str, str], str]  # (model id or adapter id, prompt) -> greedy answer offline
    prompts: dict[str, list[str]] = field(default_factory=dict)  # task -> eval prompts


def offline_answers(uri: str, task: str, version: str, prompts: list[str], max_new_tokens: int, dst: Path) -> list[str]:
    """What the adapter of `task` version `version` answers offline: PEFT on the 4-bit base, one prompt at a time."""
    from core.catalog import load_catalog
    from jobs.evaluate import generate
    from jobs.models import load_tokenizer
    from tracking.registry import load_adapter_model, model_uri

    model = load_adapter_model(model_uri(task, version), device="cpu", uri=uri, dst=dst)
    base = model.peft_config["default"].base_model_name_or_path
    spec = next(s for s in load_catalog().base_models.values() if s.hf_id == base)
    return [generate(model, load_tokenizer(spec), [prompt], max_new_tokens, 1)[0] for prompt in prompts]


def chat_prompt(base: str, prompt: str) -> str:
    from core.catalog import load_catalog

    return render_chat([Message("user", prompt)], load_catalog().base_model(base).chat_format)


@pytest.fixture(scope="module")
def endpoint(tiny_sweep: Sweep, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    import ray
    from ray import serve

    from serving.app import deploy

    root = tmp_path_factory.mktemp("serving")
    prompts = {task: [p["prompt"] for p in tiny_sweep.job("train", BASES[0],
                                                          task).result.predictions[:PROMPTS_PER_ADAPTER]]
               for task in TASKS}
    offline: dict[tuple[str, str], str] = {}
    for base in BASES:
        for task in TASKS:
            job = tiny_sweep.job("train", base, task)
            asked = prompts[task] + [chat_prompt(base, prompts[task][0])]
            answers = offline_answers(tiny_sweep.uri, task, job.model_version, asked, MAX_TOKENS,
                                      root / "offline" / base / task)
            offline |= {(f"{base}:{task}", prompt): answer for prompt, answer in zip(asked, answers)}
            offline |= {(adapter_id(task, job.model_version), prompt): answer for prompt, answer in zip(asked, answers)}
    config = ServeConfig(
        name="loraland-test", port=free_port(), tracking_uri=tiny_sweep.uri, api_key=API_KEY,
        adapter_cache_dir=str(root / "cache"),
        ingress=IngressSettings(num_cpus=0, model_ttl_s=0.5, request_timeout_s=120),
        deployments=[
            BaseDeployment(base_model="tiny-llama", device="cpu", num_cpus=0.5, max_adapters_per_replica=4),
            BaseDeployment(base_model="tiny-mistral", device="cpu", num_cpus=0.5, tasks=list(TASKS)),
        ])
    with pytest.MonkeyPatch.context() as env:  # for this module's Ray only: the processes ray.init starts inherit it
        env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
        ray.init(_node_ip_address="127.0.0.1", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            url = deploy(config)
            yield Endpoint(url, tiny_sweep, offline, prompts)
        finally:
            serve.shutdown()
            ray.shutdown()


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The status, and OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code, error
    return error


ADAPTER_IDS = [f"{base}:{task}" for base in BASES for task in TASKS]


@pytest.mark.cluster
def test_openai_client_lists_completes_chats_and_streams(endpoint: Endpoint) -> None:
    client = endpoint.client()
    listed = {model.id for model in client.models.list()}
    assert set(BASES) | set(ADAPTER_IDS) | set(TASKS) <= listed
    answered = []
    for model in ADAPTER_IDS:
        base, task = model.split(":")
        max_tokens = MAX_TOKENS
        for prompt in endpoint.prompts[task]:
            response = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
            assert response.choices[0].text.strip() == endpoint.offline[(model, prompt)], (model, prompt)
            trained = adapter_id(task, endpoint.sweep.job("train", base, task).model_version)
            assert response.model == model and response.system_fingerprint == trained
            usage = response.usage
            assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
            answered.append(response.choices[0].text.strip())
        prompt = endpoint.prompts[task][0]
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=max_tokens, temperature=0)
        assert chat.choices[0].message.content.strip() == endpoint.offline[(model, chat_prompt(base, prompt))]
        assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
        chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                     max_tokens=max_tokens, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens and chunks[-1].choices == []
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert reasons == [chat.choices[0].finish_reason]
        streamed = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed).strip() == endpoint.offline[(model, prompt)]
    assert any(answered), "every adapter answered nothing: the comparison would prove little"
    base = client.completions.create(model="tiny-mistral", prompt=endpoint.prompts[TASKS[0]][0], max_tokens=5,
                                     temperature=0)
    assert base.system_fingerprint == "base" and base.usage.completion_tokens >= 1


@pytest.mark.cluster
def test_task_champion_and_stop_strings(endpoint: Endpoint) -> None:
    from tracking import registry

    client = endpoint.client()
    for task in TASKS:
        champion = registry.champion(task, endpoint.sweep.uri)
        prompt = endpoint.prompts[task][0]
        response = client.completions.create(model=task, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert response.system_fingerprint == adapter_id(task, champion.version)
        assert response.choices[0].text.strip() == endpoint.offline[(adapter_id(task, champion.version), prompt)]
    prompt = endpoint.prompts["demo_colors"][0]
    full = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=0).choices[0]
    assert full.finish_reason == "length" and len(full.text) > 2
    cut = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=0,
                                    stop=[full.text[2:4]]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(full.text[2:4])]


@pytest.mark.cluster
def test_concurrent_requests_for_different_adapters_all_answer_correctly(endpoint: Endpoint) -> None:
    client = endpoint.client()
    asks = [(model, prompt) for model in ADAPTER_IDS for prompt in endpoint.prompts[model.split(":")[1]]] * 2

    def ask(model: str, prompt: str) -> str:
        return client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                         temperature=0).choices[0].text.strip()

    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda item: ask(*item), asks))
    assert answers == [endpoint.offline[item] for item in asks]
