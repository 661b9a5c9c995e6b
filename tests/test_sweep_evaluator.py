"""The sweep's evaluations through one evaluator per base model (orchestrator/evaluator.py): fine-tunes train, then
their evaluation goes to their base's evaluator; every result lands once in its job's run; a job counts finished only
once its evaluation is recorded; a killed evaluator's evaluations are resubmitted without counting as failures; a bad
adapter fails only its job; `evaluation.engine: generate` runs today's way."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.paths import PROJECT_ROOT
from jobs.config import JobConfig, JobKind
from orchestrator.config import RetrySettings, SweepConfig, expand_jobs
from orchestrator.evaluator import EvaluatorPool, evaluator_pool
from orchestrator.notes import progress_line
from orchestrator.plan import plan_job
from orchestrator.sweep import submission_order
from orchestrator.units import EVALUATION, CoTrainGroup, EvaluationUnit, RayTasks, SingleJob, work_units
from tests.helpers import tiny_job, wait_until

MINI = PROJECT_ROOT / "tests" / "fixtures" / "mini_sweep.yaml"


def mini(**changes: Any) -> SweepConfig:
    """The mini sweep (1 base x 2 tasks, base evaluations on) with top-level sections updated."""
    data = yaml.safe_load(MINI.read_text())
    for section, values in changes.items():
        data[section] = data.get(section, {}) | values if isinstance(values, dict) else values
    return SweepConfig.model_validate(data)


# --------------------------------------------------------------------------- units, plan and progress (no Ray)


@pytest.mark.unit
def test_with_evaluators_fine_tunes_train_then_hand_on_their_evaluation_and_with_generate_they_run_as_today() -> None:
    sweep = mini(evaluate_base=True)
    jobs = submission_order(expand_jobs(sweep), sweep)
    pool = EvaluatorPool({})
    units = work_units(jobs, sweep, RayTasks("train", "group", ("exp", "parent", "uri"), pool))
    assert [unit.kind for unit in units[:2]] == [EVALUATION] * 2  # base evaluations first, at the evaluator
    assert all(isinstance(unit, EvaluationUnit) and unit.demand == {} for unit in units[:2])
    fine_tune = units[2]
    assert isinstance(fine_tune, SingleJob) and fine_tune.task == "train" and fine_tune.job.kind == "train"
    assert fine_tune.finished({"trained": True}) == []  # no outcome before its evaluation is recorded
    (evaluation,) = fine_tune.follow_ups({"trained": True})
    assert isinstance(evaluation, EvaluationUnit) and evaluation.job == fine_tune.job and evaluation.pool is pool
    assert evaluation.key == f"{fine_tune.job.job_key}:evaluation" and evaluation.args == ("exp", "parent", "uri")
    assert evaluation.planned_s > 0
    # co-trained: a trained member hands on its evaluation, a member that failed alone ends failed
    grouped = work_units(jobs, sweep.model_copy(update={"resources": sweep.resources.model_copy(
        update={"co_train": 2})}), RayTasks("train", "group", (), pool))
    group = next(unit for unit in grouped if isinstance(unit, CoTrainGroup))
    first, second = group.members
    result = {"members": {first.job_key: {"trained": True}, second.job_key: {"error": "non-finite loss"}}}
    assert [(o.job.job_key, o.state) for o in group.finished(result)] == [(second.job_key, "failed")]
    assert [unit.job for unit in group.follow_ups(result) if isinstance(unit, EvaluationUnit)] == [first]
    # generate: every job is one task that evaluates itself, no evaluator, no follow-ups
    generate = mini(evaluation={"engine": "generate"})
    with evaluator_pool(jobs, generate) as none:
        assert none is None
    today = work_units(submission_order(expand_jobs(generate), generate), generate, RayTasks("job", "group", ()))
    assert all(isinstance(unit, SingleJob) and unit.then is None for unit in today)
    assert today[2].finished({"score": 0.5})[0].state == "finished" and today[2].follow_ups({"score": 0.5}) == []


@pytest.mark.unit
def test_plan_shows_evaluation_apart_from_the_evaluators_throughput_and_progress_counts_evaluations() -> None:
    through = mini()
    generate = mini(evaluation={"engine": "generate"})
    train = next(job for job in expand_jobs(through) if job.kind == "train")
    alone = next(job for job in expand_jobs(generate) if job.kind == "train")
    planned, today = plan_job(train, through.resources), plan_job(alone, generate.resources)
    rows, tokens = 16, train.task.max_new_tokens  # mini: evaluation.limit 16
    rate = through.resources.eval_tokens_per_second * 7 / train.base_model.params_billion
    assert planned.eval_gpu_hours == pytest.approx(rows * tokens / rate / 3600, rel=1e-2, abs=1e-4)
    assert planned.gpu_hours <= today.gpu_hours and today.eval_gpu_hours == 0.0
    line = progress_line({}, 3, 2, 9, None, evaluations=(2, 1))
    assert line == "progress: 0 done, 0 failed, 3 running or starting, 2 queued of 9; evaluations 2 running, 1 queued"


# --------------------------------------------------------------------------- the evaluator's record (real engine)


def broken_training(job: JobConfig) -> None:
    """`job`'s folder as if trained, its adapter unreadable."""
    from jobs.checkpoints import ADAPTER_DIR
    from jobs.run import claim_output, save_training
    from jobs.storage import JobStorage
    from jobs.train import TrainResult

    storage = JobStorage(job.output_dir)
    claim_output(storage, job)
    adapter = storage.local / ADAPTER_DIR
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"not safetensors")
    save_training(storage, TrainResult(str(adapter), {}, []))


@pytest.mark.integration
def test_an_evaluator_records_each_evaluation_once_and_a_bad_adapter_fails_only_its_job(mlflow_server: Any,
                                                                                       tmp_path: Path) -> None:
    """A base evaluation, a trained fine-tune and one whose adapter is broken, through one engine at once: the first two
    end FINISHED with one score each, the predictions table, failed generations, the training's curves once; the
    third FAILED with its error."""
    from mlflow import MlflowClient

    from jobs.run import TRAINED_FILE
    from orchestrator.evaluator import Tracking, evaluate_job
    from orchestrator.workers import train_tracked_job
    from serving.evaluation import build_evaluation_engine, evaluator_engine_config, local_adapter
    from tracking import store

    uri = mlflow_server.uri
    experiment_id = store.ensure_experiment("evaluator-record", uri)
    tracking = Tracking(experiment_id, store.start_sweep_run(experiment_id, "evaluator-record", {}, uri), uri)
    # not demo_sentiment or demo_colors: the registry is shared per server, and tests/tracking_fixtures.py counts theirs
    kinds: list[tuple[str, str, JobKind]] = [
        ("base", "demo_arithmetic", "evaluate_base"), ("ft", "demo_arithmetic", "train"),
        ("broken", "demo_similarity", "train")]
    base, fine_tune, broken = (
        tiny_job(tmp_path / name, task=task, kind=kind, eval_limit=8, max_steps=10, log_every=5).model_copy(
            update={"job_key": f"evaluator-record/tiny-llama/{task}/{kind}"}) for name, task, kind in kinds)
    train_tracked_job(fine_tune, tracking.experiment_id, tracking.parent_run_id, uri)
    assert (Path(fine_tune.output_dir) / TRAINED_FILE).is_file()
    client = MlflowClient(uri)
    trained_run = store.find_job_run(experiment_id, fine_tune.job_key, uri)
    assert trained_run is not None and trained_run.info.status == "RUNNING"  # trained, not yet evaluated
    broken_training(broken)
    engine = build_evaluation_engine(base.base_model, base.quantization, "cpu", local_adapter,
                                     evaluator_engine_config(base.evaluation))

    async def evaluate_all() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(evaluate_job(engine, job, tracking) for job in (base, fine_tune, broken))))

    try:
        base_result, ft_result, broken_result = asyncio.run(evaluate_all())
    finally:
        engine.shutdown()
    assert "score" in base_result and "score" in ft_result
    assert "did not load" in broken_result["error"] and broken.job_key in broken_result["error"]
    for job, result in ((base, base_result), (fine_tune, ft_result)):
        run = store.find_job_run(experiment_id, job.job_key, uri)
        assert run is not None and run.info.status == "FINISHED" and run.data.metrics["score"] == result["score"]
        assert [m.value for m in client.get_metric_history(run.info.run_id, "score")] == [result["score"]]
        assert {"eval_examples", "eval_failed_generations"} <= set(run.data.metrics)
        assert run.data.params["evaluation.scoring"] == "study"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert store.PREDICTIONS_FILE in artifacts
        table = json.loads(Path(client.download_artifacts(run.info.run_id, store.PREDICTIONS_FILE,
                                                          str(tmp_path / job.kind))).read_text())
        assert len(table["data"]) == 8
    ft_run = store.find_job_run(experiment_id, fine_tune.job_key, uri)
    assert ft_run is not None and ft_run.info.run_id == trained_run.info.run_id and ft_run.data.metrics["steps"] == 10
    assert [m.step for m in client.get_metric_history(ft_run.info.run_id, "loss")] == [5, 10]  # sent once, as trained
    failed = store.find_job_run(experiment_id, broken.job_key, uri)
    assert failed is not None and failed.info.status == "FAILED"
    assert "did not load" in failed.data.tags[store.TAG_ERROR]


# --------------------------------------------------------------------------- faults on Ray


class SlowEvaluator:
    """A stand-in evaluator actor (the pool's and scheduler's handling of its death is under test, not the engine):
    each call appends its job key to `<output_dir>/calls`, waits 3 s, and returns a score."""

    def __init__(self, job: JobConfig) -> None:
        self.base = job.base_model.name

    async def evaluate(self, job: JobConfig, *tracking: str) -> dict[str, Any]:
        calls = Path(job.output_dir) / "calls"
        with calls.open("a") as out:
            out.write(f"{job.job_key}\n")
        await asyncio.sleep(3.0)
        return {"score": float(len(calls.read_text().splitlines())), "node": "", "wall_s": 3.0}

    def shutdown(self) -> None:
        pass


@pytest.mark.cluster
def test_a_killed_evaluator_has_its_evaluations_resubmitted_without_counting_as_failures(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two evaluations on one base's evaluator; the actor is killed (as its node would be lost) while both run: with
    `max_failures: 0` both still finish, on the restarted actor, each called twice; the pool ends the actor after."""
    import ray

    from orchestrator.cluster import connect_ray
    from orchestrator.scheduler import SchedulerSettings, run_units

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
    jobs = [tiny_job(tmp_path, task=task, kind="evaluate_base").model_copy(update={"job_key": f"killed/{task}"})
            for task in ("demo_sentiment", "demo_colors")]
    pool = EvaluatorPool({"tiny-llama": {"CPU": 0.5}}, actor=SlowEvaluator)
    units = [EvaluationUnit(job, pool, ("", "", "")) for job in jobs]
    calls = tmp_path / "calls"
    connect_ray()
    try:
        def kill_when_both_run() -> None:
            wait_until(lambda: calls.is_file() and len(calls.read_text().splitlines()) == 2, 120, "both evaluations")
            ray.kill(pool.actors["tiny-llama"], no_restart=False)  # restarts, as after a lost node

        killer = threading.Thread(target=kill_when_both_run)
        killer.start()
        outcomes = run_units(units, SchedulerSettings(RetrySettings(max_failures=0), len(jobs)))
        killer.join()
        assert pool.actors == {}  # ended once its base had no evaluation left
    finally:
        pool.close()
        ray.shutdown()
    out = capsys.readouterr().out
    assert [outcomes[job.job_key].state for job in jobs] == ["finished", "finished"], out[-3000:]
    assert sorted(calls.read_text().splitlines()) == sorted(2 * [job.job_key for job in jobs])
    assert out.count("node lost") == 2 and "retry" not in out, out[-3000:]
