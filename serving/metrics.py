"""Per-adapter metrics through Ray Serve's metrics API (exported in Prometheus format on every node's
metrics port, prefixed `ray_`; Serve adds the application, deployment and replica tags).

Ingress (per model id and adapter): requests by HTTP status, prompt and completion tokens, time to
first token, total latency. Base-model replicas (per adapter): adapter loads and their seconds,
replica cache hits and misses, and where a fetch found the files (local disk or a download).
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
BASE_TAG = "base"  # the adapter tag of requests to a base model without adapter


def adapter_tag(adapter: str | None) -> str:
    """The adapter tag of a request: its adapter id, or `base`."""
    return adapter or BASE_TAG


# Ray annotates `tag_keys` as `Tuple[str]` (one key) though it takes any number: these two helpers hold the only
# ignores.
def _counter(name: str, description: str, tag_keys: tuple[str, ...]) -> Counter:
    return Counter(name, description=description, tag_keys=tag_keys)  # type: ignore[arg-type]  # Ray's Tuple[str] annotation


def _histogram(name: str, description: str, tag_keys: tuple[str, ...]) -> Histogram:
    return Histogram(name, description=description, boundaries=SECONDS, tag_keys=tag_keys)  # type: ignore[arg-type]  # same


def _gauge(name: str, description: str, tag_keys: tuple[str, ...]) -> Gauge:
    return Gauge(name, description=description, tag_keys=tag_keys)  # type: ignore[arg-type]  # same


class IngressMetrics:
    """What the API sees of each request."""

    def __init__(self) -> None:
        tags = ("model", "adapter")
        self.requests = _counter("loraland_requests", "API requests by model id, adapter and HTTP status.",
                                 tags + ("status",))
        self.prompt_tokens = _counter("loraland_prompt_tokens", "Prompt tokens served.", tags)
        self.completion_tokens = _counter("loraland_completion_tokens", "Completion tokens served.", tags)
        self.ttft = _histogram("loraland_time_to_first_token_seconds", "Request arrival to first token.", tags)
        self.latency = _histogram("loraland_request_latency_seconds", "Request arrival to last token.", tags)
        self.copies = _gauge("loraland_adapter_replicas", "Replicas the ingress spreads an adapter's requests over "
                             "(serving/replication.py).", ("base_model", "adapter"))

    def spread(self, base_model: str, adapter: str, copies: int) -> None:
        self.copies.set(copies, tags={"base_model": base_model, "adapter": adapter})

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
        self.load_seconds = _histogram("loraland_adapter_load_seconds",
                                       "Adapter loads into the replica (fetch + read into host memory).", tags)
        self.cache = _counter("loraland_adapter_cache",
                              "Requests whose adapter the replica held (hit) or had to load (miss).",
                              tags + ("result",))
        self.fetches = _counter("loraland_adapter_fetches",
                                "Adapter folder fetches by source: the local disk cache or a registry download.",
                                tags + ("source",))
        self.resident = _gauge("loraland_adapter_resident", "1 while this replica holds the adapter in that tier "
                               "(device: an accelerator slot, host: host memory); 0 once it left.", tags + ("tier",))
        self.shown: dict[str, str] = {}  # adapter -> tier last exported as 1

    def _tags(self, adapter: str) -> dict[str, str]:
        return {"base_model": self.base_model, "adapter": adapter}

    def cache_lookup(self, adapter: str, hit: bool) -> None:
        self.cache.inc(tags=self._tags(adapter) | {"result": "hit" if hit else "miss"})

    def loaded(self, adapter: str, seconds: float) -> None:
        self.load_seconds.observe(seconds, tags=self._tags(adapter))

    def fetched(self, adapter: str, source: str, seconds: float) -> None:
        self.fetches.inc(tags=self._tags(adapter) | {"source": source})

    def residency(self, held: dict[str, str]) -> None:
        """Export where the replica holds each adapter now (`held`: adapter -> tier); adapters gone or moved drop to
        0."""
        for adapter, tier in self.shown.items():
            if held.get(adapter) != tier:
                self.resident.set(0, tags=self._tags(adapter) | {"tier": tier})
        for adapter, tier in held.items():
            self.resident.set(1, tags=self._tags(adapter) | {"tier": tier})
        self.shown = dict(held)
