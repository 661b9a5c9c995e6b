"""The work units the scheduler runs (orchestrator/scheduler.py): the `WorkUnit` protocol, a job's outcome, and the
units: a single job (`SingleJob`), a co-training group (`CoTrainGroup`) and an evaluation through its base's evaluator
(`EvaluationUnit`, orchestrator/evaluator.py). `work_units` turns a sweep's unfinished jobs into units in submission
order.

With `evaluation.engine: evaluator` a base evaluation is an `EvaluationUnit` from the start, and a fine-tune (alone or
in a group) only trains: its unit's result says `trained`, gives it no outcome yet, and its `follow_ups` are its
evaluation's unit, which gives the outcome once the evaluation is recorded. With `generate`, a job's task evaluates it
too (no follow-ups)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from jobs.config import JobConfig
from orchestrator.config import SweepConfig
from orchestrator.plan import co_train_groups, eval_gpu_hours
from orchestrator.resources import group_demand, group_planned_seconds, job_demand, planned_seconds, submit_task

EVALUATION = "evaluation"  # the kind of an `EvaluationUnit` (the ETA times evaluations apart from training)


@dataclass
class JobOutcome:
    """How a job ended in this driver run."""

    job: JobConfig
    state: str  # finished | skipped | failed
    score: float | None = None
    base_score: float | None = None
    error: str = ""
    node: str = ""  # Ray node id (hex) the finishing attempt ran on


class WorkUnit(Protocol):
    """One Ray task of the sweep, standing for one or more of its jobs."""

    @property
    def key(self) -> str:
        """Unique in the sweep; the Ray task's name (a job key, which `ray list tasks` and process titles show)."""

    @property
    def jobs(self) -> list[JobConfig]:
        """The jobs it stands for: the progress line counts these, and each gets an outcome when the unit ends."""

    @property
    def kind(self) -> str:
        """Its kind of work (a job kind): the ETA scales plan's time by what finished units of a kind took."""

    @property
    def label(self) -> str:
        """How the log names it."""

    @property
    def demand(self) -> dict[str, float]:
        """Its Ray resources by Ray's names (CPU, GPU, custom)."""

    @property
    def planned_s(self) -> float:
        """Plan's time for it in seconds."""

    def submit(self) -> Any:
        """Submit one attempt as a Ray task (`resources.submit_task`, no Ray-side retries); returns its ObjectRef."""

    def finished(self, result: dict[str, Any]) -> list[JobOutcome]:
        """Its jobs' outcomes from the dict its Ray task returned (none for a job whose evaluation is still to come)."""

    def follow_ups(self, result: dict[str, Any]) -> list[WorkUnit]:
        """The units to run once it finished with `result`: a trained fine-tune's evaluation (else none)."""

    def failed(self, error: str) -> list[JobOutcome]:
        """Its jobs' outcomes when it failed as a whole with `error` (retries or node losses spent)."""

    def ended_lines(self, outcomes: list[JobOutcome], result: dict[str, Any]) -> list[str]:
        """Log lines for its jobs once it finished with `result` (`outcomes` from `finished`), before the line the
        scheduler prints for the unit itself."""


def job_label(job: JobConfig) -> str:
    """How the progress log names a job."""
    return f"{job.kind:13s} {job.base_model.name} x {job.task.name}"


@dataclass(frozen=True)
class RayTasks:
    """The Ray tasks the units of a sweep submit (`resources.job_task` of `orchestrator.workers`' functions, or
    stand-ins), and the arguments each gets after its job or members (the tracking: experiment, parent run, URI)."""

    job: Any  # job(job, *args)
    group: Any  # group(members, *args)
    args: tuple[Any, ...] = ()
    # `evaluation.engine: evaluator`: the sweep's `orchestrator.evaluator.EvaluatorPool`, and `job`/`group` only train
    evaluators: Any = None

    @classmethod
    def of(cls, sweep: SweepConfig, args: tuple[Any, ...], evaluators: Any = None) -> RayTasks:
        """The sweep's tasks (orchestrator/workers.py) with the tracking `args`: with `evaluators` (an EvaluatorPool)
        fine-tunes only train and evaluations go to it, else each job's task evaluates it too."""
        from orchestrator.resources import job_task
        from orchestrator.workers import run_tracked_group, run_tracked_job, train_tracked_group, train_tracked_job

        if evaluators is None:
            return cls(job_task(run_tracked_job, sweep), job_task(run_tracked_group, sweep), args)
        return cls(job_task(train_tracked_job, sweep), job_task(train_tracked_group, sweep), args, evaluators)


@dataclass(frozen=True)
class SingleJob:
    """One job as one Ray task, `task(*args)`, whose result dict holds its `score` (and `node`, `wall_s`), or says it
    `trained`: then `then(job)` is its evaluation's unit."""

    job: JobConfig
    task: Any
    args: tuple[Any, ...]
    demand: dict[str, float]
    planned_s: float = 1.0
    then: Callable[[JobConfig], WorkUnit] | None = None

    @classmethod
    def of(cls, job: JobConfig, sweep: SweepConfig, tasks: RayTasks) -> SingleJob:
        """`job` run by `tasks.job` with plan's resources and time (its evaluation after it, with evaluators)."""
        return cls(job, tasks.job, (job, *tasks.args), job_demand(job, sweep), planned_seconds(job, sweep),
                   evaluation_of(sweep, tasks))

    @property
    def key(self) -> str:
        return self.job.job_key

    @property
    def jobs(self) -> list[JobConfig]:
        return [self.job]

    @property
    def kind(self) -> str:
        return self.job.kind

    @property
    def label(self) -> str:
        return job_label(self.job)

    def submit(self) -> Any:
        return submit_task(self.task, self.key, self.demand, *self.args)

    def finished(self, result: dict[str, Any]) -> list[JobOutcome]:
        if result.get("trained"):
            return []
        return [JobOutcome(self.job, "finished", result.get("score"), node=result.get("node", ""))]

    def follow_ups(self, result: dict[str, Any]) -> list[WorkUnit]:
        return [self.then(self.job)] if result.get("trained") and self.then else []

    def failed(self, error: str) -> list[JobOutcome]:
        return [JobOutcome(self.job, "failed", error=error)]

    def ended_lines(self, outcomes: list[JobOutcome], result: dict[str, Any]) -> list[str]:
        return []


@dataclass(frozen=True)
class CoTrainGroup:
    """Fine-tunes of one base model trained together in one Ray task, `task(*args)` (jobs/cotrain.py), whose result dict
    holds each member's score or error under `members` by job key. A member failing in the group fails alone; the group
    failing as a whole (raised, crashed, node lost) fails every member; a retried group skips its finished members."""

    members: list[JobConfig]
    task: Any
    args: tuple[Any, ...]
    demand: dict[str, float]
    planned_s: float = 1.0
    then: Callable[[JobConfig], WorkUnit] | None = None  # a trained member's evaluation (`trained` in its result)

    @classmethod
    def of(cls, members: list[JobConfig], sweep: SweepConfig, tasks: RayTasks) -> CoTrainGroup:
        """`members` run by `tasks.group` with plan's resources and time for the group (each member's evaluation after
        it, with evaluators)."""
        return cls(members, tasks.group, (members, *tasks.args), group_demand(members, sweep),
                   group_planned_seconds(members, sweep), evaluation_of(sweep, tasks))

    @property
    def key(self) -> str:
        return f"{self.members[0].job_key}+{len(self.members) - 1}"

    @property
    def jobs(self) -> list[JobConfig]:
        return self.members

    @property
    def kind(self) -> str:
        return self.members[0].kind

    @property
    def label(self) -> str:
        return f"{'group of ' + str(len(self.members)):13s} {self.members[0].base_model.name} co-trained"

    def submit(self) -> Any:
        return submit_task(self.task, self.key, self.demand, *self.args)

    def finished(self, result: dict[str, Any]) -> list[JobOutcome]:
        outcomes = []
        for job in self.members:
            member = result["members"].get(job.job_key, {"error": "no result from its group"})
            if member.get("trained"):
                continue
            state = "finished" if "score" in member else "failed"
            outcomes.append(JobOutcome(job, state, member.get("score"), error=member.get("error", ""),
                                       node=result.get("node", "")))
        return outcomes

    def follow_ups(self, result: dict[str, Any]) -> list[WorkUnit]:
        trained = [job for job in self.members if result["members"].get(job.job_key, {}).get("trained")]
        return [self.then(job) for job in trained] if self.then else []

    def failed(self, error: str) -> list[JobOutcome]:
        return [JobOutcome(job, "failed", error=error or "its group did not run") for job in self.members]

    def ended_lines(self, outcomes: list[JobOutcome], result: dict[str, Any]) -> list[str]:
        """A line per member: trained (its evaluation follows), finished or failed in the group."""
        trained = [f"  trained  {job_label(job)} (co-trained)" for job in self.members
                   if result.get("members", {}).get(job.job_key, {}).get("trained")]
        return trained + [f"  {o.state:8s} {job_label(o.job)} (co-trained)" + (f": {o.error[:300]}" if o.error else "")
                          for o in outcomes]


@dataclass(frozen=True)
class EvaluationUnit:
    """A job's evaluation through its base's evaluator (`pool`, an `orchestrator.evaluator.EvaluatorPool`): one call
    of the evaluator actor, `pool.submit(job, *args)`, whose result dict holds the `score` (or the `error` of an
    adapter that did not load). It asks nothing of the cluster itself (the evaluator holds the resources), so it goes
    out as soon as it is queued; when it ends, its base's evaluator is ended if nothing else runs on it."""

    job: JobConfig
    pool: Any
    args: tuple[Any, ...]
    planned_s: float = 1.0
    demand: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, job: JobConfig, sweep: SweepConfig, tasks: RayTasks) -> EvaluationUnit:
        """`job`'s evaluation on `tasks.evaluators`, with plan's time for it on its evaluator."""
        return cls(job, tasks.evaluators, tasks.args, max(eval_gpu_hours(job, sweep.resources) * 3600, 1e-3))

    @property
    def key(self) -> str:
        return f"{self.job.job_key}:evaluation"

    @property
    def jobs(self) -> list[JobConfig]:
        return [self.job]

    @property
    def kind(self) -> str:
        return EVALUATION

    @property
    def label(self) -> str:
        if self.job.kind == "evaluate_base":
            return job_label(self.job)
        return f"{'evaluate':13s} {self.job.base_model.name} x {self.job.task.name}"

    def submit(self) -> Any:
        return self.pool.submit(self.job, *self.args)

    def finished(self, result: dict[str, Any]) -> list[JobOutcome]:
        self.pool.settle(self.job.base_model.name)
        if "error" in result:
            return [JobOutcome(self.job, "failed", error=result["error"], node=result.get("node", ""))]
        return [JobOutcome(self.job, "finished", result.get("score"), node=result.get("node", ""))]

    def follow_ups(self, result: dict[str, Any]) -> list[WorkUnit]:
        return []

    def failed(self, error: str) -> list[JobOutcome]:
        self.pool.settle(self.job.base_model.name)
        return [JobOutcome(self.job, "failed", error=error)]

    def ended_lines(self, outcomes: list[JobOutcome], result: dict[str, Any]) -> list[str]:
        return [f"  failed   {self.label}: {o.error[:300]}" for o in outcomes if o.state == "failed"]


def evaluation_of(sweep: SweepConfig, tasks: RayTasks) -> Callable[[JobConfig], WorkUnit] | None:
    """How a trained fine-tune's evaluation unit is made (None without evaluators: its task evaluates it)."""
    return None if tasks.evaluators is None else partial(EvaluationUnit.of, sweep=sweep, tasks=tasks)


def work_units(todo: list[JobConfig], sweep: SweepConfig, tasks: RayTasks) -> list[WorkUnit]:
    """`todo` as the units the scheduler runs, in submission order. Co-training off: one `SingleJob` each, in `todo`'s
    order. On: base evaluations alone, fine-tunes in plan's `co_train_groups` (a group of one alone); base evaluations
    first, then longest first by plan's estimate. With evaluators (`tasks.evaluators`), a base evaluation is an
    `EvaluationUnit`."""
    def alone(job: JobConfig) -> WorkUnit:
        evaluator = tasks.evaluators is not None and job.kind == "evaluate_base"
        return EvaluationUnit.of(job, sweep, tasks) if evaluator else SingleJob.of(job, sweep, tasks)

    if sweep.resources.co_train == "off":
        return [alone(job) for job in todo]
    groups = [members for members in co_train_groups(todo, sweep.resources) if len(members) > 1]
    grouped = {job.job_key for members in groups for job in members}
    units: list[WorkUnit] = [alone(job) for job in todo if job.job_key not in grouped]
    units += [CoTrainGroup.of(members, sweep, tasks) for members in groups]
    return sorted(units, key=lambda unit: (unit.kind not in ("evaluate_base", EVALUATION), -unit.planned_s))
