"""One worker job, end to end: fine-tune then evaluate, or evaluate the base zero-shot; result.json on disk.

A job whose `output_dir` (a folder, or an object store: `jobs/storage.py`) already holds result.json is done and is
not run again. The folder belongs to one job: `job.json` records its settings, and a job with other settings is
refused there (it would resume from, or return, another job's work).

A fine-tune comes in two steps when the sweep evaluates through a shared engine (orchestrator/evaluator.py):
`train_step` trains, saves the adapter, then `trained.json` (the marker that training is done, with its summary), and
the evaluation comes later, elsewhere, through `record_result`. A job whose folder holds `trained.json` is not trained
again: `train_step` returns the saved training and `run_job` only evaluates.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from core.errors import Conflict
from jobs.checkpoints import ADAPTER_DIR, CHECKPOINT_DIR
from jobs.config import JobConfig, outcome_settings
from jobs.evaluate import EvalResult, evaluate_model
from jobs.models import CausalLM, load_adapter, load_base_model, load_tokenizer, resolve_device
from jobs.result import RESULT_FILE, JobResult, flat, job_params
from jobs.sandbox import check_code_task
from jobs.storage import JobStorage
from jobs.train import Fault, StepCallback, TrainResult, train

JOB_FILE = "job.json"
TRAINED_FILE = "trained.json"  # written after the adapter: training is done, the evaluation is left
__all__ = ["JOB_FILE", "RESULT_FILE", "TRAINED_FILE", "JobResult", "claim_output", "run_job", "train_step"]


def claim_output(storage: JobStorage, config: JobConfig) -> None:
    """Record the job's settings in its output folder, or check that the folder's record is of this job; a folder of
    another job (kind or any setting changed) is a one-line Conflict naming the first differences."""
    identity = {"kind": config.kind, "base_model": config.base_model.hf_id, "task": config.task.name}
    identity |= outcome_settings(config, config.kind)
    params = flat(identity)
    if storage.pull_file(JOB_FILE):
        saved = flat(json.loads((storage.local / JOB_FILE).read_text()))
        changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in params.items() if saved.get(key) != value]
        if changed:
            raise Conflict(f"output_dir {config.output_dir}: holds a job with other settings "
                           f"({'; '.join(changed[:3])}); use another output_dir, or delete it to start over")
        return
    storage.local.mkdir(parents=True, exist_ok=True)
    (storage.local / JOB_FILE).write_text(json.dumps(identity, indent=2))
    storage.push(JOB_FILE)


def finished_result(storage: JobStorage, config: JobConfig) -> JobResult | None:
    """Claim the job's output folder (`claim_output`); the result saved there if the job already finished, else None."""
    output = storage.local
    claim_output(storage, config)
    if not storage.pull_file(RESULT_FILE):
        output.mkdir(parents=True, exist_ok=True)
        return None
    done = JobResult.load(output / RESULT_FILE)
    if done.adapter_dir and storage.remote is not None:  # finished on another node: its scratch folder is not here
        storage.pull_dir(ADAPTER_DIR)
        done.adapter_dir = str(output / ADAPTER_DIR)
    return done


def run_job(config: JobConfig, on_step: StepCallback | None = None, fault: Fault | None = None) -> JobResult:
    """Run the job (or return its saved result if it already finished): train (unless its training is done) and
    evaluate in this process with `jobs.evaluate` (today's path; a sweep may evaluate through its shared engine
    instead, orchestrator/evaluator.py)."""
    storage = JobStorage(config.output_dir)
    done = finished_result(storage, config)
    if done is not None:
        return done
    check_code_task(config.task.metric, config.evaluation.unconfined_code)  # before training (jobs.sandbox)
    device = resolve_device(config.device)
    trained = saved_training(storage) if config.kind == "train" else None
    tokenizer = load_tokenizer(config.base_model)
    if config.kind == "evaluate_base":
        model: CausalLM = load_base_model(config.base_model, config.quantization, device)
    elif trained is not None:  # trained by a sweep that evaluates elsewhere: only the evaluation is left
        model = load_adapter(load_base_model(config.base_model, config.quantization, device), trained.adapter_dir)
    else:
        trained, model, tokenizer = train(config, on_step=on_step, fault=fault)
        save_training(storage, trained)
    return record_result(config, storage, evaluate_model(model, tokenizer, config.task, config.evaluation), trained)


def train_step(config: JobConfig, on_step: StepCallback | None = None, fault: Fault | None = None) -> TrainResult:
    """A fine-tune's training without its evaluation: claim the output folder, train (resuming from its checkpoint),
    save the adapter and `trained.json`. A job trained before (or finished) returns its saved training at once."""
    storage = JobStorage(config.output_dir)
    done = finished_result(storage, config)
    if done is not None and done.adapter_dir:  # finished, perhaps before trained.json existed
        return TrainResult(done.adapter_dir, done.summary, done.history)
    trained = saved_training(storage)
    if trained is None:
        check_code_task(config.task.metric, config.evaluation.unconfined_code)  # before training (jobs.sandbox)
        trained = train(config, on_step=on_step, fault=fault)[0]
        save_training(storage, trained)
    return trained


def save_training(storage: JobStorage, trained: TrainResult) -> None:
    """Mark the job's training done: `trained.json` (summary, history, the training sample), written atomically and
    pushed after the adapter, so a store holding it holds the whole adapter."""
    saved = asdict(trained) | {"adapter_dir": ADAPTER_DIR}
    staging = storage.local / f".{TRAINED_FILE}.{os.getpid()}"
    staging.write_text(json.dumps(saved))
    staging.replace(storage.local / TRAINED_FILE)
    storage.push(TRAINED_FILE)


def saved_training(storage: JobStorage) -> TrainResult | None:
    """The training the job's folder (or store) holds, its adapter fetched into `storage.local` when the store is
    remote; None when training is not done."""
    if not storage.pull_file(TRAINED_FILE):
        return None
    saved = json.loads((storage.local / TRAINED_FILE).read_text())
    if storage.remote is not None:
        storage.pull_dir(ADAPTER_DIR)
    return TrainResult(**(saved | {"adapter_dir": str(storage.local / ADAPTER_DIR)}))


def record_result(config: JobConfig, storage: JobStorage, evaluation: EvalResult,
                  trained: TrainResult | None) -> JobResult:
    """The job's result from its evaluation (and training), saved as result.json in its output folder (and store); the
    scratch checkpoints are dropped."""
    result = JobResult(
        job_key=config.job_key, kind=config.kind, base_model=config.base_model.name, task=config.task.name,
        metric=evaluation.metric, score=evaluation.score, examples=evaluation.examples,
        adapter_dir=trained.adapter_dir if trained else None, params=job_params(config, evaluation.worked_examples),
        summary=trained.summary if trained else {}, history=trained.history if trained else [],
        predictions=evaluation.predictions, failed_generations=evaluation.failed,
        training_examples=trained.examples if trained else [], worked_examples=evaluation.worked_examples,
    )
    result.save(storage.local / RESULT_FILE)
    storage.push(RESULT_FILE)
    storage.drop_scratch(CHECKPOINT_DIR)  # the store has them; a node running many jobs keeps no stale optimizer states
    return result
