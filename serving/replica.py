"""A base model's replica: the Ray Serve deployment `BaseModelServer` and its Serve options.

`BaseModelServer` holds one base model and an engine (built by the `serving.engines.EngineFactory` it is given: the
batching engine or vLLM, by the deployment's `engine.kind`), loads adapters through `@serve.multiplexed` (LRU of
`max_adapters_per_replica`), renders chats in the base's chat format, and streams `Delta`s back; per-request engine
errors come back as `APIError` events, never as a replica failure. Serve's health check asks the engine whether its
decode loop is alive. `serving.app` binds one such deployment per base model behind the ingress.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from core.catalog import load_catalog
from serving import faults
from serving.adapters import AdapterStore, AdapterUnavailable
from serving.api import APIError, GenerateRequest
from serving.chat import render_chat
from serving.config import BaseDeployment
from serving.engine import (
    AdapterLoadError,
    ContextTooLong,
    Delta,
    Engine,
    EngineError,
    EngineOverloaded,
    InvalidRequest,
)
from serving.engines import EngineFactory
from serving.metrics import ReplicaMetrics
from serving.replication import adapter_of

HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 30.0
RETRY_AFTER_S = 1.0
RESIDENCY_PERIOD_S = 1.0  # how often a replica re-exports its adapter residency (on requests and health checks)


def engine_error(error: EngineError) -> APIError:
    """An engine's per-request error as the API answers it."""
    if isinstance(error, ContextTooLong):
        return APIError(400, str(error), code="context_length_exceeded", param="max_tokens")
    if isinstance(error, InvalidRequest):
        return APIError(400, str(error), code="invalid_value")
    if isinstance(error, EngineOverloaded):
        return APIError(429, f"the model is overloaded: {error}; retry later", type="overloaded_error",
                        code="overloaded", retry_after_s=error.retry_after_s)
    if isinstance(error, AdapterUnavailable):
        return APIError(503, str(error), type="server_error", code=error.code, retry_after_s=RETRY_AFTER_S)
    if isinstance(error, AdapterLoadError):
        return APIError(500, str(error), type="server_error", code="adapter_load_failed")
    return APIError(500, f"generation failed: {error}", type="server_error", code="generation_failed")


@dataclass(eq=False)
class ResidentAdapter:
    """What `@serve.multiplexed` keeps per loaded adapter; leaving its LRU removes it from `resident`."""

    adapter: str
    resident: "dict[str, ResidentAdapter]" = field(repr=False)

    def __del__(self) -> None:
        if self.resident.get(self.adapter) is self:
            del self.resident[self.adapter]


@serve.deployment
class BaseModelServer:
    """One base model's replica: the base weights once, its adapters multiplexed, an engine generating.

    `build_engine` makes the engine (as Ray Serve LLM's server takes its engine class): `app_for` passes
    `serving.engines.build_engine`, which builds the one the deployment's `engine.kind` names; tests pass a fake."""

    def __init__(self, deployment: BaseDeployment, tracking_uri: str, cache_dir: str, max_context_tokens: int | None,
                 build_engine: EngineFactory) -> None:
        spec = load_catalog().base_model(deployment.base_model)
        self.chat_format = spec.chat_format
        self.metrics = ReplicaMetrics(spec.name)
        self.store = AdapterStore(spec, Path(cache_dir), tracking_uri, on_fetch=self.metrics.fetched)
        self.engine: Engine = build_engine(spec, deployment.precision, deployment.device, self.store, deployment.engine,
                                           max_context_tokens)
        self.resident: dict[str, ResidentAdapter] = {}
        self.residency_reported = -RESIDENCY_PERIOD_S

        async def load(routing: str) -> ResidentAdapter:  # a plain function: Serve keeps its LRU on it (of routing ids)
            self.metrics.loaded(adapter_of(routing), await self.engine.prefetch(adapter_of(routing)))
            self.resident[routing] = ResidentAdapter(routing, self.resident)
            return self.resident[routing]

        self.load_adapter = serve.multiplexed(max_num_models_per_replica=deployment.max_adapters_per_replica)(load)

    async def generate(self, request: GenerateRequest, adapter: str | None = None) -> AsyncIterator[Delta | APIError]:
        """Stream the answer with the request's adapter: Serve's multiplexed model id (a routing id, see
        serving/replication.py), else `adapter` (a hot adapter sent to any replica); neither: the base model."""
        routing = serve.get_multiplexed_model_id() or adapter or ""
        adapter = adapter_of(routing) or None
        try:
            if adapter is not None:
                self.metrics.cache_lookup(adapter, hit=routing in self.resident)
                await self.load_adapter(routing)
            self.report_residency()
            prompt_ids = await asyncio.to_thread(self.encode, request)  # a long prompt must not stall the loop
            max_tokens = request.max_tokens or max(1, self.engine.max_context_tokens - len(prompt_ids))
            sent = 0
            async for delta in self.engine.generate(prompt_ids, adapter, request.sampling(max_tokens)):
                # a no-op unless a test switched faults on (serving/faults.py)
                await faults.before_delta(self.store.base.name, adapter, sent)
                yield delta
                sent += 1
        except EngineError as error:
            yield engine_error(error)

    def encode(self, request: GenerateRequest) -> list[int]:
        """Prompt token ids exactly as evaluation encodes prompts (BOS + text); a chat in the base's format."""
        from jobs.encoding import encode_prompt

        text = request.prompt if request.prompt is not None else render_chat(list(request.messages), self.chat_format)
        return encode_prompt(self.engine.tokenizer, text)

    async def prompt_tokens(self, prompt: str) -> tuple[int, int]:
        """(tokens of `prompt` as a completion request encodes it, the engine's context): the page's check before
        sending (tokenized off the replica's event loop)."""
        from jobs.encoding import encode_prompt

        ids = await asyncio.to_thread(encode_prompt, self.engine.tokenizer, prompt)
        return len(ids), self.engine.max_context_tokens

    def resources(self) -> dict[str, float]:
        """What this replica holds now (batch rows, slots, KV cache bytes, threads): the soak test's leak check."""
        return faults.held_resources(self.engine)

    def report_residency(self) -> None:
        """Export which adapters this replica holds, in which tier (at most every RESIDENCY_PERIOD_S)."""
        now = time.monotonic()
        if now - self.residency_reported >= RESIDENCY_PERIOD_S:
            self.residency_reported = now
            self.metrics.residency(self.engine.residency())

    def check_health(self) -> None:
        """Serve's health check: fails when the engine's decode loop has died (Serve then replaces the replica); also
        re-exports the adapter residency, so an idle replica's metrics stay current."""
        self.engine.check_health()
        self.report_residency()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def server_options(deployment: BaseDeployment) -> dict[str, Any]:
    """Serve options of a base model's deployment. A replica accepts what its engine can hold (batch +
    engine queue); beyond that Serve queues up to `max_queued_requests`, then answers 503."""
    options: dict[str, Any] = {
        "name": f"base-{deployment.base_model}",
        "ray_actor_options": {"num_cpus": deployment.num_cpus, "num_gpus": deployment.num_gpus},
        "max_ongoing_requests": deployment.engine.replica_capacity,
        "max_queued_requests": deployment.max_queued_requests,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
    }
    if deployment.autoscaling is not None:
        options["autoscaling_config"] = deployment.autoscaling.model_dump()
    else:
        options["num_replicas"] = deployment.num_replicas
    return options
