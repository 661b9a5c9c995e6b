"""One worker job, end to end: fine-tune then evaluate, or evaluate the base zero-shot; result.json on disk.

A job whose `output_dir` already holds result.json is done and is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.config import ConfigError, JobConfig, load_job_config

RESULT_FILE = "result.json"


@dataclass
class JobResult:
    """What a job hands to the orchestrator and tracking."""

    job_key: str
    kind: str
    base_model: str
    task: str
    metric: str
    score: float
    examples: int
    adapter_dir: str | None
    params: dict[str, Any]
    summary: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Write atomically (a job killed mid-write leaves no half result)."""
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.write_text(json.dumps(asdict(self)))
        staging.replace(path)

    @classmethod
    def load(cls, path: Path) -> "JobResult":
        return cls(**json.loads(path.read_text()))


def job_params(config: JobConfig) -> dict[str, Any]:
    """Every hyper-parameter of the job, flattened (`lora.r`, `training.learning_rate`, ...)."""
    params: dict[str, Any] = {"kind": config.kind, "base_model": config.base_model.name, "base_model.hf_id": config.base_model.hf_id,
                              "task": config.task.name, "task.metric": config.task.metric}
    for section in ("lora", "quantization", "training", "evaluation"):
        for key, value in getattr(config, section).model_dump(mode="json").items():
            params[f"{section}.{key}"] = value
    return params


def run_job(config: JobConfig, on_step: Any = None, fault: Any = None) -> JobResult:
    """Run the job (or return its saved result if it already finished)."""
    from jobs.evaluate import evaluate_model
    from jobs.models import load_base_model, load_tokenizer, resolve_device
    from jobs.train import train

    output = Path(config.output_dir)
    if (output / RESULT_FILE).is_file():
        return JobResult.load(output / RESULT_FILE)
    output.mkdir(parents=True, exist_ok=True)
    if config.kind == "evaluate_base":
        tokenizer = load_tokenizer(config.base_model)
        model = load_base_model(config.base_model, config.quantization, resolve_device(config.device))
        trained = None
    else:
        trained, model, tokenizer = train(config, on_step=on_step, fault=fault)
    evaluation = evaluate_model(model, tokenizer, config.task, config.evaluation)
    result = JobResult(
        job_key=config.job_key, kind=config.kind, base_model=config.base_model.name, task=config.task.name,
        metric=evaluation.metric, score=evaluation.score, examples=evaluation.examples,
        adapter_dir=trained.adapter_dir if trained else None, params=job_params(config),
        summary=trained.summary if trained else {}, history=trained.history if trained else [],
        predictions=evaluation.predictions,
    )
    result.save(output / RESULT_FILE)
    return result


def cli_main(mode: str, argv: list[str] | None) -> int:
    """Shared command line of `python -m jobs.train` and `python -m jobs.evaluate`."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{mode}", description=f"{mode} one job without Ray")
    parser.add_argument("--config", required=True, help="job config YAML (see jobs/config.py: JobConfig)")
    if mode == "evaluate":
        parser.add_argument("--adapter", help="adapter folder to evaluate instead of the base model")
    args = parser.parse_args(argv)
    try:
        config = load_job_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if mode == "evaluate":
        return _evaluate_cli(config, args.adapter)
    result = run_job(config.model_copy(update={"kind": "train"}), on_step=lambda step, m: print(f"step {step}: {m}", flush=True))
    print(json.dumps({"score": result.score, "metric": result.metric, "adapter_dir": result.adapter_dir, **result.summary}))
    return 0


def _evaluate_cli(config: JobConfig, adapter: str | None) -> int:
    from jobs.evaluate import evaluate_model
    from jobs.models import load_adapter, load_base_model, load_tokenizer, resolve_device

    if adapter is None:
        result = run_job(config.model_copy(update={"kind": "evaluate_base"}))
        print(json.dumps({"score": result.score, "metric": result.metric, "examples": result.examples}))
        return 0
    model = load_adapter(load_base_model(config.base_model, config.quantization, resolve_device(config.device)), adapter)
    evaluation = evaluate_model(model, load_tokenizer(config.base_model), config.task, config.evaluation)
    print(json.dumps({"score": evaluation.score, "metric": evaluation.metric, "examples": evaluation.examples}))
    return 0
