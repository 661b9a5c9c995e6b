"""Which engine a replica runs: the deployment's `engine.kind` picks the module that builds it.

`BaseModelServer` takes an `EngineFactory` through its constructor (as Ray Serve LLM's server takes its engine
class): `app_for` passes `build_engine` below, tests pass a fake. Each engine's module (torch, vLLM) is imported
only inside the replica that builds it, so the driver and the ingress never load them.
"""

from __future__ import annotations

from typing import Protocol

from core.schemas import BaseModelSpec, QuantizationSettings
from serving.config import EngineConfig, VllmEngineConfig
from serving.engine import AdapterFetcher, Engine


class EngineFactory(Protocol):
    """Builds a started engine over `spec` held in `precision` on `device`; adapters come from `fetch`; prompt +
    max_tokens stays within `max_context_tokens` (None: the model's own context)."""

    def __call__(self, spec: BaseModelSpec, precision: str, device: str, fetch: AdapterFetcher, config: EngineConfig,
                 max_context_tokens: int | None = None) -> Engine: ...


def build_engine(spec: BaseModelSpec, precision: str | QuantizationSettings, device: str, fetch: AdapterFetcher,
                 config: EngineConfig, max_context_tokens: int | None = None) -> Engine:
    """The engine `config.kind` names: `serving.batching` (ours) or `serving.vllm_engine`. `precision` is a serve
    deployment's ("4bit", "bf16", "fp32") or a job's quantization settings (evaluation holds the base as the job)."""
    if isinstance(config, VllmEngineConfig):
        from serving.vllm_engine import build_engine as build_vllm_engine

        held = precision if isinstance(precision, str) else precision_of(precision)
        return build_vllm_engine(spec, held, device, fetch, config, max_context_tokens)
    from serving.batching import build_engine as build_batching_engine

    return build_batching_engine(spec, precision, device, fetch, config, max_context_tokens)


def precision_of(quant: QuantizationSettings) -> str:
    """A serve deployment's precision nearest a job's quantization settings (4-bit nf4 or fp4: "4bit")."""
    if quant.load_in_4bit:
        return "4bit"
    return "bf16" if quant.compute_dtype == "bfloat16" else "fp32"
