"""`JobTracker`: what a worker uses to log one job to its run, from the first step to the adapter.

    tracker = JobTracker.for_job(config, experiment_id, parent_run_id, uri=uri)
    with tracker:                                   # start(): find or create the job's run
        result = run_job(config, on_step=tracker.on_step)
        tracker.finish(result, base_score)          # everything else, run FINISHED, adapter registered
    # an exception inside the block ends the run FAILED with the error as the `loraland.error` tag

- `on_step` never blocks training: step metrics are buffered and a background thread sends them
  every `flush_interval_s`; a batch that fails stays buffered and is sent later. `finish` sends what
  is left (retried), so nothing is dropped at job end, and also logs the history of any step the
  callback never saw (a job resumed from its result file, or run without the callback).
- A retried job reuses its run (found by the `loraland.job_key` tag) instead of making a second one.
- System metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) are sampled every
  `system_metrics_interval_s` by MLflow's monitor, logged as `system/...`.
- Peak memory: `start` resets the process's peak (`jobs.peak_memory.reset_peak_memory`: a reused Ray worker
  must not inherit an earlier job's), `finish` logs `peak_memory_mb` for every job kind (a train job's
  own figure, measured at the end of training, takes precedence).
- What the job is comes from its own config (`for_job`: the whole task entry, whichever catalogue it came from), and
  what it trained on from its result (`JobResult.training_examples`, in memory only): nothing is looked up again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import pandas as pd
from mlflow.entities import DatasetInput, InputTag, Metric, RunTag

from core.schemas import TaskSpec
from jobs.config import JobConfig
from jobs.result import JobResult
from tracking import store
from tracking.cards import evaluation_settings, publish_task_card
from tracking.registry import register_adapter, update_champion
from tracking.retry import call_with_retry

log = logging.getLogger(__name__)


class JobTracker:
    """Logs one job (train or evaluate_base) to its child run of the sweep's experiment.

    `task_spec` is the job's task entry (`for_job` passes the job config's): its category and metric become tags, its
    data source the datasets' source. Without it (a tracker built by hand) those tags are not set and the datasets'
    source is unknown."""

    def __init__(self, experiment_id: str, job_key: str, base_model: str, task: str, kind: str = "train", *,
                 parent_run_id: str | None = None, sweep: str | None = None, uri: str | None = None,
                 system_metrics: bool = True, system_metrics_interval_s: float = 10.0, flush_interval_s: float = 5.0,
                 register: bool = True, device: str = "cpu", task_spec: TaskSpec | None = None):
        if not job_key:
            raise ValueError("a tracked job needs a job_key (its run is found again by it)")
        if task_spec is not None and task_spec.name != task:
            raise ValueError(f"task {task!r} and its entry {task_spec.name!r} differ")
        self.experiment_id, self.job_key, self.kind = experiment_id, job_key, kind
        self.base_model, self.task, self.task_spec = base_model, task, task_spec
        self.parent_run_id, self.sweep = parent_run_id, sweep or job_key.split("/", 1)[0]
        self.uri = store.resolve_tracking_uri(uri)
        self.system_metrics, self.system_metrics_interval_s = system_metrics, system_metrics_interval_s
        self.flush_interval_s, self.register, self.device = flush_interval_s, register, device
        self.run_id: str | None = None
        self.model_version: str | None = None
        self._buffer: list[Metric] = []
        self._logged_steps: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._monitor: Any = None
        self._started = 0.0
        self._ended = False

    @classmethod
    def for_job(cls, config: JobConfig, experiment_id: str, parent_run_id: str | None = None, uri: str | None = None,
                **options: Any) -> JobTracker:
        """A tracker for the job `config` describes: its own task entry, peak memory measured on its device."""
        defaults: dict[str, Any] = {"device": _job_device(config.device), "task_spec": config.task}
        return cls(experiment_id, config.job_key, config.base_model.name, config.task.name, config.kind,
                   parent_run_id=parent_run_id, uri=uri, **(defaults | options))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Find or create the job's run, set it RUNNING, start system metrics and the step flusher; reset the peak
        memory."""
        from jobs.peak_memory import reset_peak_memory

        reset_peak_memory(self.device)
        tags = {store.TAG_ROLE: "job", store.TAG_JOB_KEY: self.job_key, store.TAG_KIND: self.kind,
                store.TAG_SWEEP: self.sweep, store.TAG_BASE_MODEL: self.base_model, store.TAG_TASK: self.task}
        if self.task_spec is not None:
            tags |= {store.TAG_CATEGORY: self.task_spec.category, store.TAG_METRIC: self.task_spec.metric}
        if self.parent_run_id:
            tags[store.TAG_PARENT] = self.parent_run_id
        run, created = store.find_or_create_run(self.experiment_id, store.tag_filter(job_key=self.job_key),
                                                f"{self.base_model}.{self.task}.{self.kind}", tags, self.uri)
        self.run_id = run.info.run_id
        if not created:  # a retried job: the same run again
            call_with_retry(self._client.update_run, self.run_id, "RUNNING")
        self._started = time.monotonic()
        if self.system_metrics:
            self._start_system_metrics(resume=not created)
        self._flusher = threading.Thread(target=self._flush_loop, name=f"tracker-{self.run_id[:8]}", daemon=True)
        self._flusher.start()
        return self.run_id

    def __enter__(self) -> JobTracker:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.run_id is None or self._ended:
            return
        self.fail(f"{exc_type.__name__}: {exc}" if exc_type else "job ended without a result")

    # ------------------------------------------------------------------ step metrics

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """`jobs.train.StepCallback`: buffer the step's metrics (loss, learning_rate, tokens_per_second, ...)."""
        now = int(time.time() * 1000)
        items = [store.metric(key, value, step, now) for key, value in metrics.items() if _finite(value)]
        with self._lock:
            self._buffer += items
            self._logged_steps.add(int(step))

    __call__ = on_step

    def flush(self) -> None:
        """Send the buffered step metrics now (retried); on failure they stay buffered and the error is raised."""
        with self._lock:
            batch, self._buffer = self._buffer, []
        if not batch:
            return
        try:
            store.log_metrics(self._require_run(), batch, self.uri)
        except Exception:
            with self._lock:
                self._buffer = batch + self._buffer
            raise

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
            except Exception as error:
                log.warning("step metrics of %s not sent yet: %s", self.job_key, str(error).splitlines()[0][:200])

    # ------------------------------------------------------------------ the end

    def finish(self, result: JobResult, base_score: float | None = None) -> str:
        """Log everything the job produced and end the run FINISHED; returns the run id.

        Params (every hyper-parameter), metrics (`score` and the metric's own name, `base_score`,
        `lift`, the training summary: peak memory, wall time, tokens/s, ...), step curves not yet
        sent, the evaluation (and training) dataset as inputs, the per-example predictions as a table,
        and the adapter folder as the `adapter/` artifact. For a train job whose `base_score` is not
        given, the finished evaluate_base run of the same (base model, task) is looked up. A train
        job's adapter is then registered and the task's champion alias updated (`register=True`).
        """
        run_id = self._require_run()
        self._stop_background()
        if self.kind == "train" and base_score is None:
            base_score = store.find_base_score(self.experiment_id, result.base_model, result.task, self.uri)
        store.log_params(run_id, {"job_key": result.job_key, **result.params}, self.uri)
        self._log_history(result.history)
        self.flush()
        store.log_metrics(run_id, [store.metric(k, v) for k, v in self._final_metrics(result, base_score).items()],
                          self.uri)
        existing = {item.path for item in call_with_retry(self._client.list_artifacts, run_id)}
        self._log_datasets(result)
        if result.predictions and store.PREDICTIONS_FILE not in existing:  # log_table appends: never twice
            call_with_retry(self._client.log_table, run_id, pd.DataFrame(result.predictions), store.PREDICTIONS_FILE)
        if result.adapter_dir:
            call_with_retry(self._client.log_artifacts, run_id, result.adapter_dir, store.ADAPTER_ARTIFACT)
        if result.adapter_dir and self.task_spec is not None:  # what the page shows of the task (tracking/cards.py)
            publish_task_card(run_id, self.task_spec, evaluation_settings(result.params), self.uri,
                              result.worked_examples)
        call_with_retry(self._client.set_terminated, run_id, "FINISHED")
        self._ended = True
        if self.register and self.kind == "train" and result.adapter_dir:
            self.model_version = register_adapter(run_id, result.task, result.base_model, result.score, result.job_key,
                                                  self.uri)
            update_champion(result.task, self.uri)
        return run_id

    def detach(self) -> None:
        """Send the step metrics and stop the background threads, leaving the run RUNNING: the job's evaluation,
        recorded elsewhere by another tracker (orchestrator/evaluator.py), finishes it."""
        self._stop_background()
        self.flush()
        self._ended = True

    def fail(self, error: str) -> None:
        """End the run FAILED with `error` as the `loraland.error` tag (step metrics sent first)."""
        run_id = self._require_run()
        self._stop_background()
        try:
            self.flush()
        finally:
            call_with_retry(self._client.log_batch, run_id, tags=[RunTag(store.TAG_ERROR, error[:5000])])
            call_with_retry(self._client.set_terminated, run_id, "FAILED")
            self._ended = True

    # ------------------------------------------------------------------ helpers

    @property
    def _client(self) -> Any:
        return store.client(self.uri)

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("JobTracker.start() was not called")
        return self.run_id

    def _start_system_metrics(self, resume: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.system_metrics_interval_s,
                                                 resume_logging=resume, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as error:
            log.warning("system metrics off for %s: %s", self.job_key, error)
            self._monitor = None

    def _stop_background(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            monitor.finish()
            try:  # one last sample at job end: a job shorter than the sampling interval still gets its system metrics
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                call_with_retry(monitor.mlflow_logger.flush)
            except Exception as error:
                log.warning("last system metrics sample of %s not logged: %s", self.job_key, error)

    def _log_history(self, history: list[dict[str, float]]) -> None:
        """Buffer the steps of `history` the step callback never saw."""
        for entry in history:
            step = int(entry.get("step", 0))
            if step not in self._logged_steps:
                self.on_step(step, {k: v for k, v in entry.items() if k != "step"})

    def _final_metrics(self, result: JobResult, base_score: float | None) -> dict[str, float]:
        from jobs.peak_memory import peak_memory_mb

        values: dict[str, float] = {"score": result.score, result.metric: result.score,
                                    "eval_examples": float(result.examples),
                                    "eval_failed_generations": float(result.failed_generations),
                                    "job_wall_time_s": time.monotonic() - self._started,
                                    "peak_memory_mb": peak_memory_mb(self.device)}
        if result.kind == "evaluate_base":
            values["base_score"] = result.score
        elif base_score is not None:
            values |= {"base_score": base_score, "lift": result.score - base_score}
        values |= {key: result.summary[key] for key in result.summary}
        return {key: float(value) for key, value in values.items() if _finite(value)}

    def _log_datasets(self, result: JobResult) -> None:
        """The evaluation rows (prompt, gold) and the training examples the result carries (prompt, completion, as
        trained on) as the run's inputs."""
        from mlflow.data.pandas_dataset import from_pandas

        frames = []
        if result.predictions:
            frames.append(("evaluation", pd.DataFrame({"prompt": [p["prompt"] for p in result.predictions],
                                                       "gold": [str(p["gold"]) for p in result.predictions]}), "gold"))
        if result.training_examples:
            frames.append(("training", pd.DataFrame(result.training_examples, columns=["prompt", "completion"]),
                           "completion"))
        inputs = []
        for context, frame, target in frames:
            source = _dataset_source(self.task_spec, context)
            dataset = from_pandas(frame, source=source, name=f"{result.task}-{context}", targets=target)
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
        if inputs:
            call_with_retry(self._client.log_inputs, self._require_run(), inputs)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _job_device(preference: str) -> str:
    """The device a job asking for `preference` runs on (`jobs.models.resolve_device`; cpu when cuda is asked for
    but absent: the job itself then fails with the reason)."""
    from jobs.models import DeviceUnavailable, resolve_device

    try:
        return resolve_device(preference)
    except DeviceUnavailable:
        return "cpu"


def _dataset_source(task: TaskSpec | None, context: str) -> Any:
    """Where the task's data comes from, as an MLflow dataset source (Hub id, or the catalogue's source)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    if task is None:
        return CodeDatasetSource({"loraland.source": "unknown"})
    source = task.eval.dataset if context == "evaluation" and task.eval else task.dataset
    split = source.eval_split if context == "evaluation" else source.train_split
    if source.kind == "hf":
        return HuggingFaceDatasetSource(path=source.id, config_name=source.config, split=split)
    return CodeDatasetSource({"loraland.source": f"{source.kind}:{source.id}", "loraland.split": split})
