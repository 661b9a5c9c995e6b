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
- Faults: Ray neither restarts the actor (`max_restarts=0`) nor retries its calls (`max_task_retries=0`); an unfinished
  evaluation fails with ActorDiedError / ActorUnavailableError, and the pool starts a new actor when the scheduler
  resubmits it (`EvaluatorPool.submit` finds the old one dead). Why it died decides the rest (`actor_failure`,
  from the GCS's record of the actor's death): with its node (preemption, scale-down, a dead machine) the scheduler
  resubmits the evaluation as it does a job whose node died (not counted as a failure, up to `max_node_losses`);
  otherwise (its process crashed, ran out of memory or was killed) the evaluation fails with Ray's one-line reason,
  counted against `retries.max_failures`, and after `retries.max_failures` such deaths of one base's evaluator the pool
  starts no other: that base's evaluations then fail at once, naming the cause. So an evaluator that dies on start
  (its base cannot load) is not restarted without bound even with `max_node_losses: -1`.
  The engine is built in the constructor but an exception there is kept, not raised: every call then raises it,
  counted against `retries.max_failures`, and the actor (alive) is not restarted.
- An adapter that cannot be loaded (serving.engine.AdapterLoadError) fails its own job at once (its run ends FAILED
  with the error; no retry: the same files fail the same way), and the engine goes on with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter
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
    tests pass a stand-in with its `evaluate` and `shutdown`); `max_restarts` how many times one base's evaluator may
    die other than with its node before the pool starts no other. Used by `units.EvaluationUnit`."""

    def __init__(self, demand: dict[str, dict[str, float]], actor: type = Evaluator, max_restarts: int = 3) -> None:
        self.demand, self.actor, self.max_restarts = demand, actor, max_restarts
        self.actors: dict[str, Any] = {}
        self.outstanding: dict[str, set[Any]] = {}  # base -> ObjectRefs of its evaluations not yet seen ended
        self.deaths: Counter[str] = Counter()  # base -> its evaluators that died other than with their node
        self.given_up: dict[str, str] = {}  # base -> why its evaluations fail at once

    def submit(self, job: JobConfig, *tracking: str) -> Any:
        """Send `job` to its base's evaluator (started now if it has none, or if it died); returns the call's ObjectRef,
        or, once that base's evaluator has died more than `max_restarts` times, a ref to `{"error": ...}`."""
        import ray

        base = job.base_model.name
        self._forget_dead(base)
        if base in self.given_up:
            return ray.put({"error": f"job {job.job_key}: {self.given_up[base]}", "job_key": job.job_key})
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

    def _forget_dead(self, base: str) -> None:
        """Drop `base`'s evaluator if it died; count a death other than with its node, giving up past `max_restarts`."""
        actor = self.actors.get(base)
        death = actor_death(actor._actor_id.hex()) if actor is not None else None
        if death is None:
            return
        del self.actors[base]
        if death.with_node:
            return
        self.deaths[base] += 1
        if self.deaths[base] > self.max_restarts:
            self.given_up[base] = (f"the evaluator of {base} died {self.deaths[base]} times, not with its node, and is "
                                   f"not started again (retries.max_failures: {self.max_restarts}); last: "
                                   f"{death.cause}; its worker's log in Ray's session folder says why")

    def _start(self, job: JobConfig) -> Any:
        import ray

        from orchestrator.resources import ray_options

        options = ray_options(self.demand[job.base_model.name])
        actor: Any = ray.remote(self.actor)
        return actor.options(max_restarts=0, max_task_retries=0, max_concurrency=1000, **options).remote(job)

    @staticmethod
    def _stop(actor: Any) -> None:
        import ray

        with contextlib.suppress(Exception):  # already dead (its node lost) or never started
            ray.get(actor.shutdown.remote(), timeout=30)
        ray.kill(actor, no_restart=True)


@dataclass(frozen=True)
class ActorDeath:
    """Why an actor died, as the GCS recorded it: with its node (NODE_DIED, or drained) or not, and its cause."""

    with_node: bool
    cause: str


def actor_death(actor_id: str) -> ActorDeath | None:
    """The GCS's record of actor `actor_id`'s death; None while it lives (or is being created or restarted).

    Ray 2.60's ActorDiedError keeps only a message of its cause (and `preempted`), and `ray.util.state` needs the
    dashboard, which the embedded Ray runs without: the actor table (`ray._private.state`) is where the reason is."""
    from ray._private import state

    record = state.actors(actor_id)
    if not record or record["State"] != "DEAD":
        return None
    cause = record["DeathCause"]
    kind = cause.WhichOneof("context")
    if kind == "creation_task_failure_context":  # its constructor raised or exited: the traceback's last line says why
        lines = cause.creation_task_failure_context.formatted_exception_string.strip().splitlines()
        return ActorDeath(False, f"its constructor failed: {lines[-1][:300] if lines else 'no traceback'}")
    if kind != "actor_died_error_context":  # runtime_env_failed, actor_unschedulable, oom: each has an error_message
        return ActorDeath(False, f"{kind}: {first_sentence(getattr(getattr(cause, kind or ''), 'error_message', ''))}")
    context = cause.actor_died_error_context  # protobuf: the enums' values are attributes of their messages
    drained = context.node_death_info.reason == context.node_death_info.AUTOSCALER_DRAIN_PREEMPTED
    return ActorDeath(context.reason == context.NODE_DIED or drained, first_sentence(context.error_message))


def actor_failure(error: Exception) -> Exception:
    """What a failed evaluator call (a RayActorError) counts as: NodeDiedError, resubmitted without counting as a
    failure, when the actor's node was lost or the actor is only unreachable for now (ActorUnavailableError); otherwise
    (its process crashed, ran out of memory or was killed; its constructor raised) a RuntimeError naming the cause in
    one line, a failure."""
    from ray.exceptions import ActorUnavailableError, NodeDiedError, RayActorError

    if isinstance(error, ActorUnavailableError):
        return NodeDiedError(f"the evaluator is unreachable: {first_sentence(str(error))}")
    if isinstance(error, RayActorError) and error.preempted:
        return NodeDiedError("the evaluator's node was preempted (drained)")
    if isinstance(error, RayActorError) and error.actor_init_failed:
        lines = str(error).strip().splitlines()
        return RuntimeError(f"the evaluator did not start: {lines[-1][:300] if lines else type(error).__name__}")
    actor_id = getattr(error, "actor_id", None)
    death = actor_death(actor_id) if actor_id else None
    if death is not None and death.with_node:
        return NodeDiedError(f"the evaluator's node was lost: {death.cause}")
    return RuntimeError(f"the evaluator died: {death.cause if death else first_sentence(str(error))}")


def first_sentence(text: str) -> str:
    """The first line of `text`, cut before Ray's advice ("Some common causes include") and at 300 characters."""
    line = text.strip().splitlines()[0] if text.strip() else "no cause recorded"
    return line.split(" Some common causes", 1)[0][:300]


@contextlib.contextmanager
def evaluator_pool(jobs: Sequence[JobConfig], sweep: Any) -> Iterator[EvaluatorPool | None]:
    """The sweep's evaluators for `jobs` under `evaluation.engine: evaluator` (None under `generate`: each job
    evaluates itself); every evaluator is ended on the way out."""
    if sweep.evaluation.engine != "evaluator":
        yield None
        return
    pool = EvaluatorPool(evaluator_demands(jobs, sweep.resources), max_restarts=sweep.retries.max_failures)
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
