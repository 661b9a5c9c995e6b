"""The sweep's evaluators: one Ray actor per base model whose evaluations are under way, holding that base once in a
multi-LoRA engine (serving/evaluation.py), through which its base evaluations and each fine-tune's adapter are scored
(`evaluation.engine: evaluator`).

Why an actor and not `ray.data.llm`: a sweep's evaluations do not exist together as one dataset; they arrive one by one
as fine-tunes finish training, over hours. An async actor takes each as it comes (`evaluate`), and every evaluation
running on it submits all its rows to the one engine, so rows of different adapters share its continuous batches; each
call then records its own job exactly once (result.json, the job's MLflow run) and returns its small result dict, as a
job task does. `ray.data.llm` would batch one finished dataset at a time and leave the per-job record to a second pass.

- The actor is created when the first evaluation of its base is submitted (`EvaluatorPool.submit`) and ended when its
  base has no evaluation submitted that has not ended (`EvaluatorPool.settle`), so its GPU share goes back to training.
- It asks for plan's GPU share of an engine holding the base (`plan.evaluator_memory_gb`) and `cpus_per_job`.
- Faults: the actor restarts whenever it dies (`max_restarts=-1`: node lost, process killed) and its calls are not
  retried by Ray (`max_task_retries=0`): an unfinished evaluation fails with ActorDiedError / ActorUnavailableError,
  which the scheduler resubmits as it does a job whose node died (not counted as a failure), to the restarted actor.
  The engine is built in the constructor but a failure there is kept, not raised (a constructor that raises would be
  taken for a lost node again and again): every call then raises it, counted against `retries.max_failures`.
- An adapter that cannot be loaded (serving.engine.AdapterLoadError) fails its own job at once (its run ends FAILED
  with the error; no retry: the same files fail the same way), and the engine goes on with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from jobs.config import JobConfig
from orchestrator.workers import this_node


@dataclass(frozen=True)
class Tracking:
    """Where a sweep's jobs are tracked: experiment, parent run, tracking URI."""

    experiment_id: str
    parent_run_id: str
    uri: str


async def evaluate_job(engine: Any, job: JobConfig, tracking: Tracking,
                       base_score: Awaitable[float | None] | None = None) -> dict[str, Any]:
    """Evaluate `job` through `engine` (its base, or its fine-tune's adapter from its output folder or store) and record
    it as a job does: result.json (`jobs.run.record_result`), then the job's MLflow run ended FINISHED with its score,
    predictions table and failed generations, and a fine-tune's lift over `base_score` (awaited: its base evaluation
    running beside it; else looked up in MLflow). A job whose result.json exists is only recorded. Returns its score,
    job key, node and wall time; `{"error": ...}` when its adapter cannot be loaded (its run then ends FAILED)."""
    from jobs.run import finished_result, record_result, saved_training
    from jobs.storage import JobStorage
    from serving.evaluation import AdapterLoadError, evaluate_through
    from tracking.tracker import JobTracker

    started = time.monotonic()
    storage = JobStorage(job.output_dir)
    tracker = JobTracker.for_job(job, tracking.experiment_id, tracking.parent_run_id, tracking.uri)
    await asyncio.to_thread(tracker.start)
    try:
        result = await asyncio.to_thread(finished_result, storage, job)
        if result is None:
            trained = await asyncio.to_thread(saved_training, storage) if job.kind == "train" else None
            if job.kind == "train" and trained is None:
                raise RuntimeError(f"job {job.job_key}: {job.output_dir} holds no trained adapter (trained.json); "
                                   "its training has to run first")
            adapter = trained.adapter_dir if trained is not None else None
            evaluation = await evaluate_through(engine, job.task, job.evaluation, adapter)
            result = await asyncio.to_thread(record_result, job, storage, evaluation, trained)
        before = await base_score if base_score is not None else None
        # the step curves went to the run as it trained (orchestrator/workers.py): not sent a second time
        await asyncio.to_thread(tracker.finish, dataclasses.replace(result, history=[]), before)
    except AdapterLoadError as error:
        message = f"job {job.job_key}: its adapter did not load ({error})"
        await asyncio.to_thread(tracker.fail, message)
        return {"error": message, "job_key": job.job_key, "node": this_node()}
    except BaseException as error:
        await asyncio.to_thread(tracker.fail, f"{type(error).__name__}: {error}")
        raise
    return {"score": result.score, "job_key": job.job_key, "node": this_node(), "wall_s": time.monotonic() - started}


class Evaluator:
    """The body of an evaluator actor (async: its evaluations run concurrently on one engine)."""

    def __init__(self, job: JobConfig) -> None:
        from serving.evaluation import build_evaluation_engine, evaluator_engine_config, local_adapter

        self.engine: Any = None
        self.error = ""
        self.base_scores: dict[str, asyncio.Future[float | None]] = {}  # task -> its base evaluation's score here
        try:
            self.engine = build_evaluation_engine(job.base_model, job.quantization, job.device, local_adapter,
                                                  evaluator_engine_config(job.evaluation))
        except Exception as error:  # raised by every call (counted), not here (see the module doc)
            self.error = f"the evaluator of {job.base_model.name} did not start: {type(error).__name__}: {error}"

    async def evaluate(self, job: JobConfig, experiment_id: str, parent_run_id: str, uri: str) -> dict[str, Any]:
        """`evaluate_job` through this evaluator's engine. A fine-tune whose base evaluation runs here too waits for
        its score (its lift needs it) before it finishes its run."""
        if self.engine is None:
            raise RuntimeError(self.error)
        tracking = Tracking(experiment_id, parent_run_id, uri)
        if job.kind == "train":
            return await evaluate_job(self.engine, job, tracking, self.base_scores.get(job.task.name))
        score = self.base_scores[job.task.name] = asyncio.get_running_loop().create_future()
        try:
            result = await evaluate_job(self.engine, job, tracking)
        except BaseException:
            score.set_result(None)  # the fine-tunes look their base score up in MLflow
            raise
        score.set_result(result.get("score"))
        return result

    def shutdown(self) -> None:
        """Stop the engine (before the actor is killed: its threads and memory go)."""
        if self.engine is not None:
            self.engine.shutdown()


class EvaluatorPool:
    """The driver's side: an evaluator actor per base model while that base has evaluations under way.

    `demand[base]` is the Ray demand of its evaluator (`evaluator_demands`); `actor` the actor's class (`Evaluator`;
    tests pass a stand-in with its `evaluate` and `shutdown`). Used by `units.EvaluationUnit`."""

    def __init__(self, demand: dict[str, dict[str, float]], actor: type = Evaluator) -> None:
        self.demand, self.actor = demand, actor
        self.actors: dict[str, Any] = {}
        self.outstanding: dict[str, set[Any]] = {}  # base -> ObjectRefs of its evaluations not yet seen ended

    def submit(self, job: JobConfig, *tracking: str) -> Any:
        """Send `job` to its base's evaluator (created now if it has none); returns the call's ObjectRef."""
        base = job.base_model.name
        if base not in self.actors:
            self.actors[base] = self._start(job)
        ref = self.actors[base].evaluate.options(name=job.job_key).remote(job, *tracking)
        self.outstanding.setdefault(base, set()).add(ref)
        return ref

    def settle(self, base: str) -> None:
        """End `base`'s evaluator when none of the evaluations sent to it is still running."""
        import ray

        refs = list(self.outstanding.get(base, ()))
        ended, running = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
        self.outstanding[base] = set(running)
        if not running and base in self.actors:
            self._stop(self.actors.pop(base))

    def close(self) -> None:
        """End every evaluator (the sweep is over, or its driver is stopping)."""
        for base in list(self.actors):
            self._stop(self.actors.pop(base))
        self.outstanding.clear()

    def _start(self, job: JobConfig) -> Any:
        import ray

        from orchestrator.resources import ray_options

        options = ray_options(self.demand[job.base_model.name])
        actor: Any = ray.remote(self.actor)
        return actor.options(max_restarts=-1, max_task_retries=0, max_concurrency=1000, **options).remote(job)

    @staticmethod
    def _stop(actor: Any) -> None:
        import ray

        with contextlib.suppress(Exception):  # already dead (its node lost) or never started
            ray.get(actor.shutdown.remote(), timeout=30)
        ray.kill(actor, no_restart=True)


@contextlib.contextmanager
def evaluator_pool(jobs: Sequence[JobConfig], sweep: Any) -> Iterator[EvaluatorPool | None]:
    """The sweep's evaluators for `jobs` under `evaluation.engine: evaluator` (None under `generate`: each job
    evaluates itself); every evaluator is ended on the way out."""
    if sweep.evaluation.engine != "evaluator":
        yield None
        return
    pool = EvaluatorPool(evaluator_demands(jobs, sweep.resources))
    try:
        yield pool
    finally:
        pool.close()


def evaluator_demands(jobs: Sequence[JobConfig], resources: Any) -> dict[str, dict[str, float]]:
    """Each base model's evaluator demand: `cpus_per_job`, the sweep's custom resources, and unless on the CPU plan's
    GPU share of an engine holding the base with a full batch of its longest evaluation."""
    from orchestrator.plan import evaluator_memory_gb, gpu_share

    by_base: dict[str, list[JobConfig]] = {}
    for job in jobs:
        by_base.setdefault(job.base_model.name, []).append(job)
    demands = {}
    for base, members in by_base.items():
        demand = {"CPU": resources.cpus_per_job, **resources.custom}
        if resources.device != "cpu":
            demand["GPU"] = gpu_share(evaluator_memory_gb(members), resources)[0]
        demands[base] = demand
    return demands
