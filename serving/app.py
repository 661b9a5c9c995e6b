"""The Ray Serve application: an OpenAI-compatible ingress in front of one deployment per base model.

- `OpenAIIngress` (FastAPI through `@serve.ingress()`: each replica builds its app once constructed, in
  `__serve_build_asgi_app__`, with the page's routes from `serving.webapp.page_routes` beside the API's, given this
  replica's resolver, keys, task cards and token counter) checks the bearer token, validates the request,
  resolves the `model` field to (base model, adapter id) against the registry (`serving.adapters`)
  and calls that base model's deployment through its handle with
  `.options(multiplexed_model_id=routing_id, stream=True)`, so Serve routes an adapter's requests to
  the replicas that already hold it; the routing id (`serving.replication`) spreads a hot adapter over
  several replicas and keeps the long tail on one each. It waits for the first event before answering, so an error
  that happens before any token (unknown adapter file, prompt too long, overload) gets its own
  status code; every wait is bounded by `ingress.request_timeout_s`.
- `BaseModelServer` (`serving.replica`: one base model's replica, its engine and multiplexed adapters) is bound once
  per base model, with its Serve options (`server_options`).

`build_app(args)` is the builder `serve run configs/serve/demo.yaml` imports (`args` is a ServeConfig
mapping); `deploy(config)` runs the same application from Python (`loraland serve`, the demo, tests).

No `from __future__ import annotations` here: FastAPI reads the route methods' annotations at run time.
"""

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.deployment import Deployment
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from core.paths import data_home
from serving.adapters import ModelResolver, Published, Route, read_registry
from serving.api import (
    DONE,
    APIError,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    generate_request,
    json_body,
    openai_app,
    read_body,
    sse,
)
from serving.auth import Caller, KeyRing, host_allowed, resolve_in_scope, visible_cards
from serving.config import BaseDeployment, ServeConfig, parse_serve_config
from serving.engine import Delta
from serving.engines import EngineFactory, build_engine
from serving.metrics import IngressMetrics
from serving.replica import RETRY_AFTER_S, BaseModelServer, server_options
from serving.replication import HotAdapterRouter
from serving.webapp import CardReader, PageSources, page_routes
from tracking import store
from tracking.cards import TaskCards

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the API


@dataclass
class Answer:
    """What one request produced (for the response body and the metrics)."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.prompt_tokens = max(self.prompt_tokens, delta.prompt_tokens)
        self.completion_tokens = max(self.completion_tokens, delta.completion_tokens)


def serve_error(error: Exception) -> APIError:
    """A failed call to a base model's deployment as the API answers it."""
    if isinstance(error, BackPressureError):
        return APIError(503, f"every replica of this model is busy: {error}; retry later", type="overloaded_error",
                        code="overloaded", retry_after_s=error.retry_after_s or RETRY_AFTER_S)
    if isinstance(error, DeploymentUnavailableError):
        return APIError(503, error.message, type="server_error", code="unavailable", retry_after_s=RETRY_AFTER_S)
    log.error("request to a base model replica failed: %r", error)
    return APIError(500, f"the model's replica failed ({type(error).__name__}); retry", type="server_error",
                    code="replica_failed")


async def prepend(first: Delta | APIError, rest: AsyncIterator[Delta | APIError]) -> AsyncIterator[Delta | APIError]:
    """`first` and then the rest of the events."""
    yield first
    async for event in rest:
        yield event


def replica_count(deployment: BaseDeployment) -> int:
    """Replicas the hot-adapter policy spreads over: the fixed count, or the autoscaling ceiling."""
    return deployment.autoscaling.max_replicas if deployment.autoscaling is not None else deployment.num_replicas


@serve.deployment
@serve.ingress()  # the app is built per replica, once constructed: `__serve_build_asgi_app__`
class OpenAIIngress:
    """`/v1/models`, `/v1/completions`, `/v1/chat/completions` over the base models' deployments; the page at `/`."""

    def __init__(self, config: ServeConfig, servers: dict[str, DeploymentHandle], tracking_uri: str,
                 registry_reader: Callable[[], Published] | None = None, cards: CardReader | None = None) -> None:
        """`registry_reader` and `cards` default to reading `tracking_uri` (tests of the ingress alone pass their
        own, with handles that are not Serve's)."""
        self.servers = servers
        self.tracking_uri = tracking_uri
        self.keys = KeyRing.from_settings(config.api_key, config.api_keys_file)  # serving/auth.py
        self.allowed_hosts = config.allowed_hosts
        self.timeout_s = config.ingress.request_timeout_s
        served = {d.base_model: None if d.tasks == "all" else frozenset(d.tasks) for d in config.deployments}
        self.resolver = ModelResolver(served, registry_reader or partial(read_registry, tracking_uri),
                                      config.ingress.model_ttl_s, config.ingress.request_timeout_s)
        self.cards = cards or TaskCards(tracking_uri)
        self.metrics = IngressMetrics()
        self.hot = {d.base_model: HotAdapterRouter(d.hot_adapters, replica_count(d)) for d in config.deployments}

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The replica's ASGI app, which Serve (2.60's late-bound ingress) asks for once this replica is constructed:
        the OpenAI routes over this replica's methods, and the page's routes (serving/webapp.py) over what it reads."""
        app = openai_app()
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{model:path}", self.model, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"], openapi_extra=json_body(
            CompletionRequest))
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"],
                          openapi_extra=json_body(ChatCompletionRequest))
        app.include_router(page_routes(PageSources(self.resolver, self.keys, self.cards, self.count_tokens,
                                                   self.tracking_uri)))
        app.middleware("http")(self.check_host)
        return app

    async def check_host(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Without keys, a request must name this endpoint in `Host` (an IP address, localhost or one of
        `allowed_hosts`): a DNS-rebinding page, which sends its own domain name, gets a 400."""
        if not self.keys.required and not host_allowed(request.headers.get("host"), self.allowed_hosts):
            return APIError(400, "the Host header names none of this endpoint's names; add it to `allowed_hosts` in "
                                 "the serve config, or configure API keys", code="invalid_host").response()
        return await call_next(request)

    async def models(self, request: Request) -> dict[str, Any]:
        return {"object": "list", "data": visible_cards(await self.resolver.cards(), self.caller(request))}

    async def model(self, model: str, request: Request) -> dict[str, Any]:
        route = await resolve_in_scope(self.resolver, self.caller(request), model)
        return {"id": model, "object": "model", "created": 0, "owned_by": route.base_model}

    async def completions(self, request: Request) -> Response:
        return await self.answer(request, CompletionRequest)

    async def chat_completions(self, request: Request) -> Response:
        return await self.answer(request, ChatCompletionRequest)

    def caller(self, request: Request) -> Caller:
        """The key's holder and model scope (serving/auth.py); 401 for a missing or unknown key."""
        return self.keys.authenticate(request.headers.get("authorization"))

    async def answer(self, request: Request, schema: type[CompletionRequest | ChatCompletionRequest]) -> Response:
        """Validate, route, and answer once the first event is in: JSON, an SSE stream, or the error."""
        started = time.perf_counter()
        caller = self.caller(request)
        parsed = await read_body(request, schema, json_type_required=not self.keys.required)
        route = await resolve_in_scope(self.resolver, caller, parsed.model)
        routing = self.hot[route.base_model].route(route.adapter)  # hot adapters spread over replicas
        if route.adapter:
            self.metrics.spread(route.base_model, route.adapter, self.hot[route.base_model].copies[route.adapter])
        handle = self.servers[route.base_model].options(multiplexed_model_id=routing, stream=True)
        response = handle.generate.remote(generate_request(parsed), route.adapter)
        assert not isinstance(response, DeploymentResponse)  # a stream=True handle's call streams
        events = self.events(response)
        completion = Completion(chat=schema is ChatCompletionRequest, model=parsed.model, adapter=route.adapter or "")
        first = await anext(events, None) or APIError(500, "the model returned no answer", type="server_error")
        if isinstance(first, APIError):
            await events.aclose()
            self.record(route, first.status, started, Answer())
            return first.response()
        self.metrics.first_token(route.model, route.adapter, time.perf_counter() - started)
        headers = {"X-Loraland-Adapter": completion.adapter or "base"}
        if parsed.stream:
            return StreamingResponse(self.stream(first, events, completion, route, parsed.include_usage(), started),
                                     media_type="text/event-stream", headers=headers)
        answer = Answer()
        try:
            async for event in prepend(first, events):
                if isinstance(event, APIError):
                    self.record(route, event.status, started, Answer())
                    return event.response()
                answer.add(event)
        finally:
            await events.aclose()
        self.record(route, 200, started, answer)
        body = completion.body(answer.text, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens)
        return JSONResponse(body, headers=headers)

    def record(self, route: Route, status: int, started: float, answer: Answer) -> None:
        self.metrics.finished(route.model, route.adapter, status, time.perf_counter() - started, answer.prompt_tokens,
                              answer.completion_tokens)

    async def stream(self, first: Delta, events: AsyncGenerator[Delta | APIError, None], completion: Completion,
                     route: Route, include_usage: bool, started: float) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        answer, status = Answer(), 200
        try:
            if completion.chat:
                yield sse(completion.chunk(None, first=True))
            async for event in prepend(first, events):
                if isinstance(event, APIError):  # failed midway: the status is sent already, so an error event
                    status = event.status
                    yield sse(event.body())
                    break
                answer.add(event)
                if event.text:
                    yield sse(completion.chunk(event.text))
                if event.finish_reason:
                    yield sse(completion.chunk(None, event.finish_reason))
            if include_usage and status == 200:
                yield sse(completion.usage_chunk(answer.prompt_tokens, answer.completion_tokens))
            yield DONE
        finally:
            await events.aclose()
            self.record(route, status, started, answer)

    async def events(self, response: DeploymentResponseGenerator) -> AsyncGenerator[Delta | APIError, None]:
        """The replica's events, each waited for at most `request_timeout_s`; Serve's failures as APIErrors."""
        ended = False  # the call finished or failed by itself: nothing to cancel (cancel() would re-raise its error)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(response.__anext__(), self.timeout_s)
                except StopAsyncIteration:
                    ended = True
                    return
                except asyncio.TimeoutError:
                    yield APIError(504, f"no token for {self.timeout_s:g} s (ingress.request_timeout_s)",
                                   type="server_error", code="timeout")
                    return
                except Exception as error:
                    ended = True
                    yield serve_error(error)
                    return
                yield event
                if isinstance(event, APIError):
                    return
        finally:
            if not ended:
                response.cancel()  # the client left or a timeout: the replica stops generating

    async def count_tokens(self, base_model: str, prompt: str) -> tuple[int, int] | None:
        """(prompt tokens as a completion request encodes them, context) from the base's replica, for the page's
        check before sending; None when it cannot say within 30 s."""
        try:
            return await asyncio.wait_for(self.servers[base_model].prompt_tokens.remote(prompt), 30)
        except Exception:
            return None


# --------------------------------------------------------------------------- building and running


def as_deployment(decorated: object) -> Deployment:
    """What a `@serve.deployment` class is at run time (type checkers keep a decorated class's own type)."""
    assert isinstance(decorated, Deployment)
    return decorated


def app_for(config: ServeConfig, engine: EngineFactory = build_engine) -> serve.Application:
    """The application: the ingress bound to one deployment per base model, whose replicas build their engine with
    `engine` (default: the one each deployment's config names; tests pass a fake)."""
    uri = store.resolve_tracking_uri(config.tracking_uri)
    cache_dir = str(Path(config.adapter_cache_dir or data_home() / "adapter-cache").resolve())
    servers = {d.base_model: as_deployment(BaseModelServer).options(**server_options(d))
               .bind(d, uri, cache_dir, config.max_context_tokens, engine) for d in config.deployments}
    ingress = as_deployment(OpenAIIngress).options(num_replicas=config.ingress.num_replicas,
                                                   ray_actor_options={"num_cpus": config.ingress.num_cpus},
                                                   max_ongoing_requests=config.ingress.max_ongoing_requests)
    return ingress.bind(config, servers, uri)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder of a Ray Serve config file (`import_path: serving.app:build_app`); `args`
    is a ServeConfig mapping (see configs/serve/demo.yaml)."""
    return app_for(parse_serve_config(args, "application args"))


def open_bind_warning(config: ServeConfig, keys_required: bool) -> str | None:
    """One line when `config` binds every interface and no key is configured; None otherwise."""
    if config.host not in ("0.0.0.0", "::") or keys_required:
        return None
    return (f"serving on {config.host} without API keys: anyone who reaches port {config.port} may call every model; "
            "set api_keys_file (or $LORALAND_API_KEYS_FILE), or bind 127.0.0.1")


def deploy(config: ServeConfig, engine: EngineFactory = build_engine) -> str:
    """Start Serve's HTTP proxy on the config's host and port (Ray must be connected) and run the
    application (replicas build their engine with `engine`), waiting until every replica is up; returns the OpenAI
    base URL."""
    warning = open_bind_warning(config, KeyRing.from_settings(config.api_key, config.api_keys_file).required)
    if warning:
        log.warning(warning)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(app_for(config, engine), name=config.name, route_prefix=config.route_prefix)
    return f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}/v1"
