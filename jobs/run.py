"""One worker job, end to end: fine-tune then evaluate, or evaluate the base zero-shot; result.json on disk.

A job whose `output_dir` (a folder, or an object store: `jobs/storage.py`) already holds result.json is done and is
not run again. The folder belongs to one job: `job.json` records its settings, and a job with other settings is
refused there (it would resume from, or return, another job's work).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.config import ConfigError, JobConfig, load_job_config, outcome_settings
from jobs.storage import JobStorage, join

RESULT_FILE = "result.json"
JOB_FILE = "job.json"


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
    def load(cls, path: Path) -> JobResult:
        return cls(**json.loads(path.read_text()))


def job_params(config: JobConfig) -> dict[str, Any]:
    """Every hyper-parameter of the job, flattened (`lora.r`, `training.learning_rate`, ...)."""
    params: dict[str, Any] = {"kind": config.kind, "base_model": config.base_model.name, "base_model.hf_id": config.base_model.hf_id,
                              "task": config.task.name, "task.metric": config.task.metric}
    return params | flat({section: getattr(config, section).model_dump(mode="json") for section in ("lora", "quantization", "training", "evaluation")})


def claim_output(storage: JobStorage, config: JobConfig) -> None:
    """Record the job's settings in its output folder, or check that the folder's record is of this job; a folder of
    another job (kind or any setting changed) is a one-line ConfigError naming the first differences."""
    identity = {"kind": config.kind, "base_model": config.base_model.hf_id, "task": config.task.name} | outcome_settings(config, config.kind)
    params = flat(identity)
    if storage.pull_file(JOB_FILE):
        saved = flat(json.loads((storage.local / JOB_FILE).read_text()))
        changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in params.items() if saved.get(key) != value]
        if changed:
            raise ConfigError(f"output_dir {config.output_dir}", [
                f"holds a job with other settings ({'; '.join(changed[:3])}); use another output_dir, or delete it to start over"])
        return
    storage.local.mkdir(parents=True, exist_ok=True)
    (storage.local / JOB_FILE).write_text(json.dumps(identity, indent=2))
    storage.push(JOB_FILE)


def flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"lora": {"r": 8}}` -> `{"lora.r": 8}`."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def run_job(config: JobConfig, on_step: Any = None, fault: Any = None) -> JobResult:
    """Run the job (or return its saved result if it already finished)."""
    from jobs.evaluate import evaluate_model
    from jobs.models import load_base_model, load_tokenizer, resolve_device
    from jobs.train import ADAPTER_DIR, CHECKPOINT_DIR, train

    storage = JobStorage(config.output_dir)
    output = storage.local
    claim_output(storage, config)
    if storage.pull_file(RESULT_FILE):
        done = JobResult.load(output / RESULT_FILE)
        if done.adapter_dir and storage.remote is not None:  # finished on another node: its scratch folder is not here
            storage.pull_dir(ADAPTER_DIR)
            done.adapter_dir = str(output / ADAPTER_DIR)
        return done
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
    storage.push(RESULT_FILE)
    storage.drop_scratch(CHECKPOINT_DIR)  # the store has them; a node running many jobs keeps no stale optimizer states
    return result


def cli_main(mode: str, argv: list[str] | None) -> int:
    """Shared command line of `python -m jobs.train` and `python -m jobs.evaluate`."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{mode}", description=f"{mode} one job without Ray")
    parser.add_argument("--config", required=True, help="job config YAML (see jobs/config.py: JobConfig)")
    if mode == "evaluate":
        parser.add_argument("--adapter", help="adapter folder to evaluate instead of the base model")
    args = parser.parse_args(argv)
    from jobs.models import DeviceUnavailable
    from jobs.train import TrainingError

    try:
        config = load_job_config(args.config)
        if mode == "evaluate":
            return _evaluate_cli(config, args.adapter)
        result = run_job(config.model_copy(update={"kind": "train"}), on_step=lambda step, m: print(f"step {step}: {m}", flush=True))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (TrainingError, DeviceUnavailable, FileNotFoundError, KeyError, ValueError) as exc:  # memory, device, adapter, data
        message = exc.args[0] if exc.args else exc
        print(f"error: {str(message).strip().splitlines()[0] if str(message).strip() else type(exc).__name__}", file=sys.stderr)
        return 2
    print(json.dumps({"score": result.score, "metric": result.metric, "adapter_dir": result.adapter_dir, **result.summary}))
    return 0


def _evaluate_cli(config: JobConfig, adapter: str | None) -> int:
    from jobs.evaluate import evaluate_model
    from jobs.models import check_adapter_dir, load_adapter, load_base_model, load_tokenizer, resolve_device
    if adapter is None:  # the base's own job, in a folder of its own beside the fine-tune's
        result = run_job(config.model_copy(update={"kind": "evaluate_base", "output_dir": join(config.output_dir, "evaluate_base")}))
        print(json.dumps({"score": result.score, "metric": result.metric, "examples": result.examples}))
        return 0
    check_adapter_dir(adapter)  # before the base is loaded
    model = load_adapter(load_base_model(config.base_model, config.quantization, resolve_device(config.device)), adapter)
    evaluation = evaluate_model(model, load_tokenizer(config.base_model), config.task, config.evaluation)
    print(json.dumps({"score": evaluation.score, "metric": evaluation.metric, "examples": evaluation.examples}))
    return 0
