"""Per-adapter metrics through Ray Serve's metrics API (exported in Prometheus format on every node's
metrics port, prefixed `ray_`; Serve adds the application, deployment and replica tags).

Ingress (per model id and adapter): requests by HTTP status, prompt and completion tokens, time to
first token, total latency. Base-model replicas (per adapter): adapter loads and their seconds,
replica cache hits and misses, and where a fetch found the files (local disk or a download).
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
BASE_TAG = "base"  # the adapter tag of requests to a base model without adapter


def adapter_tag(adapter: str | None) -> str:
    return adapter or BASE_TAG


class IngressMetrics:
    """What the API sees of each request."""

    def __init__(self) -> None:
        tags = ("model", "adapter")
        self.requests = Counter("loraland_requests", description="API requests by model id, adapter and HTTP status.",
                                tag_keys=tags + ("status",))
        self.prompt_tokens = Counter("loraland_prompt_tokens", description="Prompt tokens served.", tag_keys=tags)
        self.completion_tokens = Counter("loraland_completion_tokens", description="Completion tokens served.", tag_keys=tags)
        self.ttft = Histogram("loraland_time_to_first_token_seconds", description="Request arrival to first token.",
                              boundaries=SECONDS, tag_keys=tags)
        self.latency = Histogram("loraland_request_latency_seconds", description="Request arrival to last token.",
                                 boundaries=SECONDS, tag_keys=tags)

    def first_token(self, model: str, adapter: str | None, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"model": model, "adapter": adapter_tag(adapter)})

    def finished(self, model: str, adapter: str | None, status: int, seconds: float, prompt_tokens: int,
                 completion_tokens: int) -> None:
        tags = {"model": model, "adapter": adapter_tag(adapter)}
        self.requests.inc(tags=tags | {"status": str(status)})
        if status == 200:
            self.latency.observe(seconds, tags=tags)
            for counter, tokens in ((self.prompt_tokens, prompt_tokens), (self.completion_tokens, completion_tokens)):
                if tokens > 0:  # Ray counters refuse 0
                    counter.inc(tokens, tags=tags)


class ReplicaMetrics:
    """What a base model's replica sees of its adapters."""

    def __init__(self, base_model: str) -> None:
        self.base_model = base_model
        tags = ("base_model", "adapter")
        self.load_seconds = Histogram("loraland_adapter_load_seconds", description="Adapter loads into the replica "
                                      "(fetch + read into host memory).", boundaries=SECONDS, tag_keys=tags)
        self.cache = Counter("loraland_adapter_cache", description="Requests whose adapter the replica held (hit) or "
                             "had to load (miss).", tag_keys=tags + ("result",))
        self.fetches = Counter("loraland_adapter_fetches", description="Adapter folder fetches by source: the local "
                               "disk cache or a registry download.", tag_keys=tags + ("source",))

    def _tags(self, adapter: str) -> dict[str, str]:
        return {"base_model": self.base_model, "adapter": adapter}

    def cache_lookup(self, adapter: str, hit: bool) -> None:
        self.cache.inc(tags=self._tags(adapter) | {"result": "hit" if hit else "miss"})

    def loaded(self, adapter: str, seconds: float) -> None:
        self.load_seconds.observe(seconds, tags=self._tags(adapter))

    def fetched(self, adapter: str, source: str, seconds: float) -> None:
        self.fetches.inc(tags=self._tags(adapter) | {"source": source})
