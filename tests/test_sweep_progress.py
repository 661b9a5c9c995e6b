"""The sweep driver's progress line and ETA (pure functions), and the description it gives the sweep in MLflow."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from core.paths import PROJECT_ROOT
from jobs.config import JobConfig
from orchestrator.config import SweepConfig, expand_jobs, load_sweep
from orchestrator.eta import ALL_KINDS, JobTiming, estimate_eta_s, eta_now, running_now, time_ratios
from orchestrator.notes import progress_line, results_description, sweep_description
from orchestrator.resources import planned_seconds
from orchestrator.units import EvaluationUnit, JobOutcome, RayTasks, WorkUnit, work_units

MINI = PROJECT_ROOT / "tests" / "fixtures" / "mini_sweep.yaml"


@pytest.mark.unit
def test_time_ratios_per_kind_and_pooled() -> None:
    ratios = time_ratios([("evaluate_base", 10.0, 2.0), ("evaluate_base", 30.0, 6.0), ("train", 100.0, 50.0)])
    assert ratios == {"evaluate_base": pytest.approx(0.2), "train": pytest.approx(0.5),
                      ALL_KINDS: pytest.approx(58 / 140)}
    assert time_ratios([]) == {}
    assert time_ratios([("train", 0.0, 5.0)]) == {}  # no planned time: no ratio


@pytest.mark.unit
def test_eta_after_fast_base_evaluations_counts_the_fine_tunes_still_to_run() -> None:
    """The issue's case: four base evaluations finished in 2 s each; four fine-tunes, plan's 300 s each, are left on two
    slots. Averaging over finished jobs said ~8 s; the estimate scales plan's time by the observed ratio instead."""
    finished = [("evaluate_base", 10.0, 2.0)] * 4
    ratios = time_ratios(finished)
    running = [JobTiming("train", 300.0, elapsed_s=5.0)] * 2
    queued = [JobTiming("train", 300.0)] * 2
    # no fine-tune finished yet: the pooled ratio (0.2) -> 60 s each; 55 s left of the running two, then 60 s more
    assert estimate_eta_s(running, queued, ratios, slots=2) == pytest.approx(115.0)
    elapsed_s, done = 20.0, 4
    assert elapsed_s / done * 4 < 30  # what the old average over finished jobs would have said
    # once a fine-tune finished, its own kind's ratio counts (0.5 -> 150 s each), not the base evaluations'
    ratios = time_ratios([*finished, ("train", 300.0, 150.0)])
    assert estimate_eta_s([JobTiming("train", 300.0, 100.0)], [JobTiming("train", 300.0)] * 2, ratios,
                          slots=2) == pytest.approx(200.0)


@pytest.mark.unit
def test_eta_schedules_the_queue_on_the_slots_that_free_first() -> None:
    ratios = {ALL_KINDS: 1.0}
    assert estimate_eta_s([], [], ratios, 4) == 0.0
    assert estimate_eta_s([JobTiming("train", 10.0, 30.0)], [], ratios, 1) == 0.0  # over its estimate: not negative
    # LPT on 2 slots: 10 | 4 + 4 + 1 -> 10; one slot: the sum
    jobs = [JobTiming("train", t) for t in (10.0, 4.0, 4.0, 1.0)]
    assert estimate_eta_s([], jobs, ratios, 2) == pytest.approx(10.0)
    assert estimate_eta_s([], jobs, ratios, 1) == pytest.approx(19.0)
    assert estimate_eta_s([], jobs, {}, 2) is None  # nothing finished yet: no ETA
    assert estimate_eta_s([], [JobTiming("new_kind", 10.0)], {"train": 3.0, ALL_KINDS: 2.0}, 1) == pytest.approx(20.0)


@pytest.mark.unit
def test_eta_now_counts_only_the_jobs_that_run_as_started() -> None:
    """Of three submitted jobs on two slots, the third waits in Ray: its time since submission is not time it ran."""
    jobs = expand_jobs(load_sweep(MINI))[:3]
    ratios = {ALL_KINDS: 1.0}
    assert eta_now([(job, 4.0) for job in jobs], [], lambda job: 10.0, ratios, 2) == pytest.approx(16.0)  # 6 | 6 + 10
    assert eta_now([(jobs[0], 4.0)], jobs[1:], lambda job: 10.0, ratios, 1) == pytest.approx(26.0)


@pytest.mark.unit
def test_running_now_is_what_fits_in_the_cluster() -> None:
    jobs = expand_jobs(load_sweep(MINI))
    capacity = {"CPU": 2.0, "GPU": 1.0}
    assert running_now(jobs, lambda job: {"CPU": 1.0}, capacity) == 2
    assert running_now(jobs, lambda job: {"CPU": 0.5, "GPU": 0.3}, capacity) == 3
    assert running_now(jobs, lambda job: {"CPU": 4.0}, capacity) == 1  # too big for the cluster: one at a time
    assert running_now(jobs[:1], lambda job: {"CPU": 1.0}, capacity) == 1
    assert running_now([], lambda job: {"CPU": 1.0}, capacity) == 0


@pytest.mark.unit
def test_planned_seconds_of_a_tiny_job_is_not_rounded_to_zero() -> None:
    sweep = load_sweep(MINI)
    generate = sweep.model_copy(update={"evaluation": sweep.evaluation.model_copy(update={"engine": "generate"})})
    seconds = {job.kind: planned_seconds(job, generate) for job in expand_jobs(generate)}
    assert 0 < seconds["evaluate_base"] < seconds["train"]
    # through the evaluators (the default) an evaluation is its own unit, with its own time
    assert all(EvaluationUnit.of(job, sweep, RayTasks(None, None)).planned_s > 0 for job in expand_jobs(sweep))


def outcomes() -> list[JobOutcome]:
    """The mini sweep's four jobs: tiny-llama x (demo_arithmetic, demo_similarity), one fine-tune failed."""
    jobs = {(job.task.name, job.kind): job for job in expand_jobs(load_sweep(MINI))}
    return [JobOutcome(jobs["demo_arithmetic", "evaluate_base"], "skipped", 0.25),
            JobOutcome(jobs["demo_arithmetic", "train"], "finished", 0.75),
            JobOutcome(jobs["demo_similarity", "evaluate_base"], "finished", 0.5),
            JobOutcome(jobs["demo_similarity", "train"], "failed", error="out of memory")]


@pytest.mark.unit
def test_progress_line_and_descriptions() -> None:
    done = {o.job.job_key: o for o in outcomes()}
    assert progress_line(done, 2, 3, 9, 61.4) == (
        "progress: 3 done, 1 failed, 2 running or starting, 3 queued of 9, ETA 61 s")
    assert progress_line(done, 0, 0, 4, 12.0) == "progress: 3 done, 1 failed, 0 running or starting, 0 queued of 4"
    assert not progress_line(done, 1, 0, 4, None).endswith(" s")
    sweep = load_sweep(MINI)
    about = sweep_description(sweep, "tests/fixtures/mini_sweep.yaml", expand_jobs(sweep), 3)
    assert "`mini`" in about and "`tests/fixtures/mini_sweep.yaml`" in about and "1 base models x 2 tasks" in about
    assert "4 jobs (2 fine-tunes, 2 base evaluations)" in about and "1 already finished, 3 to run" in about
    results = results_description(outcomes())
    assert "3 of 4 jobs done (1 in an earlier run), 1 failed" in results
    assert "Best lift per task: demo_arithmetic +0.500 (tiny-llama)." in results and "demo_similarity" not in results
    assert "Mean fine-tuned score 0.750, mean lift +0.500." in results
    assert "http" not in about + results  # link-free


def co_trained(tasks: RayTasks = RayTasks(None, None)) -> tuple[SweepConfig, list[WorkUnit], list[JobConfig]]:
    """The mini sweep with `co_train: 3`, its first base evaluation and five fine-tunes `<key>-0` .. `<key>-4` as
    co-training units (submitting `tasks`), and those six jobs."""
    sweep = load_sweep(MINI)
    sweep.resources.co_train = 3
    jobs = {job.kind: job for job in expand_jobs(sweep)}
    todo = [jobs["evaluate_base"], *(jobs["train"].model_copy(update={"job_key": f"{jobs['train'].job_key}-{i}"})
                                     for i in range(5))]
    return sweep, work_units(todo, sweep, tasks), todo


@pytest.mark.unit
def test_progress_counts_a_co_training_groups_members_as_jobs() -> None:
    _, units, (base, *tunes) = co_trained()
    assert [len(unit.jobs) for unit in units] == [1, 3, 2]  # the base evaluation first, then longest first
    _, three, two = units
    outcomes = {base.job_key: JobOutcome(base, "finished", 0.5)}
    result = {"members": {tunes[0].job_key: {"score": 1.0}, tunes[1].job_key: {"error": "non-finite loss"}}}
    outcomes |= {outcome.job.job_key: outcome for outcome in three.finished(result)}
    # the group of three ended with one member failed and one missing from its result; the group of two is running
    assert progress_line(outcomes, len(two.jobs), 0, 6, None) == (
        "progress: 2 done, 2 failed, 2 running or starting, 0 queued of 6")
    # the whole group failed
    per_job = outcomes | {outcome.job.job_key: outcome for outcome in two.failed("worker crashed")}
    assert progress_line(per_job, 0, 0, 6, None) == "progress: 2 done, 4 failed, 0 running or starting, 0 queued of 6"
    assert [per_job[job.job_key].error for job in tunes] == ["", "non-finite loss", "no result from its group",
                                                             "worker crashed", "worker crashed"]


class RecordingTask:
    """A Ray task as `resources.submit_task` calls it (`.options(name=...).remote(*args)`), recording the names it was
    submitted under and returning each attempt's number in place of an ObjectRef: the window alone, without Ray."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def options(self, name: str, **options: Any) -> RecordingTask:
        self.names.append(name)
        return self

    def remote(self, *args: Any) -> int:
        return len(self.names)


@pytest.mark.unit
def test_the_window_submits_what_the_cluster_holds_plus_queue_ahead_in_order() -> None:
    from collections import deque

    from orchestrator.scheduler import submit_window
    from orchestrator.units import SingleJob

    template = expand_jobs(load_sweep(MINI))[0]
    task = RecordingTask()
    units = [SingleJob(template.model_copy(update={"job_key": f"job-{i}"}), task, (), {"CPU": 1.0, "GPU": 0.0})
             for i in range(6)]
    queue, pending = deque(units), {}
    submit_window(queue, pending, 0.5, {"CPU": 2.0})  # room for 2 + 1 queued in Ray; no GPU asked, none binds
    assert task.names == ["job-0", "job-1", "job-2"]
    assert list(pending.values()) == units[:3] and list(queue) == units[3:]
    pending.pop(1)  # job-0 ended
    submit_window(queue, pending, 0.5, {"CPU": 2.0})
    assert task.names[3:] == ["job-3"] and len(queue) == 2
    empty: dict[Any, Any] = {}
    submit_window(queue, empty, 0.5, {})  # a cluster scaled to zero: the next unit goes regardless, one only
    assert task.names[4:] == ["job-4"] and list(queue) == units[5:]


def stand_in_job(job: JobConfig, *tracking: str) -> dict[str, Any]:
    """A single job of `test_the_driver_counts_a_groups_members_in_its_progress`: 2 s, then a score."""
    time.sleep(2.0)
    return {"score": 1.0, "wall_s": 2.0}


def stand_in_group(members: list[JobConfig], *tracking: str) -> dict[str, Any]:
    """A group of the same test: 2 s; the group holding `-3` raises (as a crashed worker would), member `-1` fails
    alone."""
    time.sleep(2.0)
    if any(job.job_key.endswith("-3") for job in members):
        raise RuntimeError("the group's worker crashed")
    results = {job.job_key: {"error": "non-finite loss"} if job.job_key.endswith("-1") else {"score": 1.0}
                for job in members}
    return {"members": results, "wall_s": 2.0}


@pytest.mark.cluster
def test_the_driver_counts_a_groups_members_in_its_progress(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`run_units` on an embedded Ray: the progress counts six jobs (a base evaluation and groups of three and two), not
    three units, from the first line (all six submitted) to the last (a member failed alone, a group failed whole)."""
    import ray

    from orchestrator.cluster import connect_ray
    from orchestrator.resources import job_task
    from orchestrator.scheduler import SchedulerSettings, run_units

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
    sweep = load_sweep(MINI)
    tasks = RayTasks(job_task(stand_in_job, sweep), job_task(stand_in_group, sweep), ("", "", ""))
    sweep, units, jobs = co_trained(tasks)
    connect_ray()
    try:
        outcomes = run_units(units, SchedulerSettings(sweep.retries, len(jobs), sweep.resources.queue_ahead))
    finally:
        ray.shutdown()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("progress:")]
    assert lines[0] == "progress: 0 done, 0 failed, 6 running or starting, 0 queued of 6", lines
    assert lines[-1] == "progress: 3 done, 3 failed, 0 running or starting, 0 queued of 6", lines
    assert [outcomes[job.job_key].state for job in jobs] == ["finished", "finished", "failed", "finished", "failed",
                                                             "failed"]


@pytest.mark.integration  # MLflow's SQLite store
def test_sweep_description_is_the_experiment_and_parent_run_note(tmp_path: Path) -> None:
    from tracking import store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = store.ensure_experiment("described", uri)
    run_id = store.start_sweep_run(experiment_id, "described", {}, uri)
    store.describe(experiment_id, run_id, "**what** this is", uri)
    client = store.client(uri)
    assert client.get_experiment(experiment_id).tags[store.NOTE_TAG] == "**what** this is"
    assert client.get_run(run_id).data.tags[store.NOTE_TAG] == "**what** this is"
