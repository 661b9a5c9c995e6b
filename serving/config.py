"""The serve app config: which base models to serve, how many replicas, which adapters, API settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from jobs.config import StrictModel


class AutoscalingSettings(StrictModel):
    """Ray Serve autoscaling of one base model's replicas."""

    min_replicas: int = Field(default=1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(default=1, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(default=16, gt=0, description="Requests per replica the autoscaler aims for.")


class EngineSettings(StrictModel):
    """The batching engine inside each replica (serving/batching.py)."""

    max_batch_size: int = Field(default=64, ge=1, description="Requests decoded together in one forward pass.")
    device_adapter_slots: int = Field(default=0, ge=0, description="Adapters held on the accelerator at once; 0: sized from free memory.")
    host_adapter_slots: int = Field(default=256, ge=1, description="Adapters kept in host memory (LRU beyond).")
    max_lora_rank: int = Field(default=64, ge=1, description="Largest adapter rank a replica accepts (slots are sized by it).")
    target_modules: list[str] | None = Field(default=None, description="Modules adapters may target; default: the base model's linear layers.")
    pinned_adapters: list[str] = Field(default_factory=list, description="Adapter ids loaded at start and never evicted.")
    max_queued_requests: int = Field(default=256, ge=1, description="Requests waiting for a batch slot before 429/503.")
    max_running_per_adapter: int = Field(default=0, ge=0, description="Fairness bound: batch slots one adapter may hold while others wait; 0: half the batch.")
    loader_threads: int = Field(default=2, ge=1, description="Threads fetching adapters off the decode loop.")


class BaseDeployment(StrictModel):
    """One base model's deployment: replicas hold the base once and multiplex its adapters."""

    base_model: str = Field(description="Base model name from the catalogue.")
    precision: Literal["4bit", "bf16", "fp32"] = Field(default="4bit", description="How replicas hold the base weights.")
    num_replicas: int = Field(default=1, ge=1, description="Fixed replica count (ignored when autoscaling is set).")
    autoscaling: AutoscalingSettings | None = Field(default=None, description="Autoscale replicas instead of a fixed count.")
    max_adapters_per_replica: int = Field(default=16, ge=1, description="Adapters a replica keeps loaded (LRU beyond).")
    tasks: list[str] | Literal["all"] = Field(default="all", description="Tasks whose registered adapters are served.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPU share per replica (0 on a CPU).")
    device: Literal["auto", "cuda", "cpu"] = Field(default="auto", description="Where replicas run.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Batching engine settings.")


class ServeConfig(StrictModel):
    """An OpenAI-compatible multi-LoRA endpoint on Ray Serve."""

    name: str = Field(default="loraland", description="Serve application name.")
    host: str = Field(default="127.0.0.1", description="HTTP bind address.")
    port: int = Field(default=8000, gt=0, lt=65536, description="HTTP port.")
    route_prefix: str = Field(default="/", description="Route prefix of the application.")
    tracking_uri: str | None = Field(default=None, description="MLflow URI adapters come from; default: $MLFLOW_TRACKING_URI.")
    api_key: str | None = Field(default=None, description="Bearer token required on every request, if set.")
    max_context_tokens: int | None = Field(default=None, gt=0, description="Prompt + max_tokens limit; default: the model's.")
    adapter_cache_dir: str = Field(default="", description="Local disk cache for adapters; default: the data folder.")
    deployments: list[BaseDeployment] = Field(min_length=1, description="One deployment per served base model.")
