"""Shared helpers for tests: small job configs on the tiny offline models."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.catalog import load_catalog
from core.schemas import EvalSettings, LoraSettings, TrainingSettings
from jobs.config import JobConfig, JobKind

if TYPE_CHECKING:
    from serving.config import ServeConfig

FAST_TRAINING: dict[str, Any] = dict(
    micro_batch_size=16, gradient_accumulation_steps=1, learning_rate=1e-2, warmup_ratio=0.05,
    max_seq_length=128, checkpoint_every=1000, log_every=5, gradient_checkpointing=False,
)


def tiny_job(output_dir: Path, base: str = "tiny-llama", task: str = "demo_sentiment", kind: JobKind = "train",
             eval_limit: int = 64, lora: dict[str, Any] | None = None, **training: Any) -> JobConfig:
    """A job on a tiny model and a demo task that trains in seconds on the CPU."""
    catalog = load_catalog()
    return JobConfig(
        kind=kind, base_model=catalog.base_model(base), task=catalog.task(task), output_dir=str(output_dir),
        device="cpu",
        lora=LoraSettings(**({"target_modules": "all-linear"} | (lora or {}))),
        training=TrainingSettings(**(FAST_TRAINING | training)),
        evaluation=EvalSettings(limit=eval_limit, batch_size=32),
    )


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.1) -> Any:
    """Poll `condition` until it returns something truthy, and return that; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)
    return value


def assert_same_adapter(a_dir: str | Path, b_dir: str | Path, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """The two adapter folders hold the same tensors, to float tolerance (torch and safetensors imported here only)."""
    import torch
    from safetensors.torch import load_file

    a = load_file(str(Path(a_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(b_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol)


@contextmanager
def local_serve(config: ServeConfig, num_cpus: int, metrics_port: int | None = None) -> Iterator[str]:
    """Ray on 127.0.0.1 with `num_cpus` (its Prometheus metrics on `metrics_port` if given), the application deployed;
    yields its OpenAI base URL; shuts both down. For tests and the serving benchmarks."""
    import ray
    from ray import serve

    from serving.app import deploy

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep the local Ray (and every replica) on loopback
    ray.init(_node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port)
    try:
        yield deploy(config)
    finally:
        serve.shutdown()
        ray.shutdown()


def two_replica_config(name: str, tracking_uri: str, cache: Path, port: int, request_timeout_s: float,
                       **deployment: Any) -> ServeConfig:
    """The serving app with one base model's deployment of 2 CPU replicas (`deployment`: its other settings,
    `base_model` and `num_cpus` among them) behind an ingress that takes no CPU, its adapters from the registry at
    `tracking_uri`, cached in `cache`: the hot-adapter tests and the serving benchmark's `hot` part."""
    from serving.config import BaseDeployment, IngressSettings, ServeConfig

    return ServeConfig(name=name, port=port, tracking_uri=tracking_uri, adapter_cache_dir=str(cache),
                       ingress=IngressSettings(num_cpus=0, request_timeout_s=request_timeout_s),
                       deployments=[BaseDeployment(device="cpu", num_replicas=2, **deployment)])
