"""The sweep's evaluations through one evaluator per base model (orchestrator/evaluator.py): fine-tunes train, then
their evaluation goes to their base's evaluator; every result lands once in its job's run; a job counts finished only
once its evaluation is recorded; an evaluator lost with its node has its evaluations resubmitted without counting as
failures, one whose process dies is a failure and restarted a bounded number of times; a bad adapter fails only its
job; `evaluation.engine: generate` runs today's way."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
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


@pytest.mark.unit
def test_an_evaluator_unreachable_or_preempted_is_a_node_loss_and_one_whose_constructor_failed_is_a_failure() -> None:
    """What the scheduler makes of a failed evaluator call without asking the GCS (the deaths it asks about: the
    cluster test below): unreachable for now or drained with its node, a node loss; its constructor failed, a failure
    naming the error in one line."""
    from ray import ActorID
    from ray.core.generated import common_pb2
    from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError

    from orchestrator.evaluator import actor_failure

    protobuf: Any = common_pb2  # generated classes, which type checkers do not see
    actor = ActorID.from_random()
    unreachable = ActorUnavailableError("The actor is temporarily unavailable: IOError: broken pipe", actor.binary())
    drained = ActorDiedError(protobuf.ActorDiedErrorContext(
        actor_id=actor.binary(), error_message="The actor died because its node has died.",
        node_death_info=protobuf.NodeDeathInfo(reason=protobuf.NodeDeathInfo.AUTOSCALER_DRAIN_PREEMPTED)))
    constructor = RayActorError(actor.hex(), "The actor died because of an error raised in its creation task\n"
                                "Traceback (most recent call last):\nValueError: tiny-llama: no such file", True)
    assert isinstance(actor_failure(unreachable), NodeDiedError) and "broken pipe" in str(actor_failure(unreachable))
    assert isinstance(actor_failure(drained), NodeDiedError) and "preempted" in str(actor_failure(drained))
    failure = actor_failure(constructor)
    assert type(failure) is RuntimeError
    assert str(failure) == "the evaluator did not start: ValueError: tiny-llama: no such file"


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


@pytest.fixture(scope="module")
def two_workers() -> Iterator[Any]:
    """A Ray cluster on loopback (ray.cluster_utils): a head without CPUs and two one-CPU worker nodes, one to lose."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    saved = os.environ.get("RAY_ADDRESS"), ray_constants.ENABLE_RAY_CLUSTER
    os.environ.pop("RAY_ADDRESS", None)
    ray_constants.ENABLE_RAY_CLUSTER = False  # keep Ray on 127.0.0.1 (orchestrator.cluster.start_local_ray says why)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(wait=False, num_cpus=1, node_ip_address="127.0.0.1")  # both start at once
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
        if saved[0] is not None:
            os.environ["RAY_ADDRESS"] = saved[0]


class NodeEvaluator:
    """A stand-in evaluator actor (the pool's and scheduler's handling of its death is under test, not the engine):
    each call appends "<job key> <node id>" to `<output_dir>/calls`; a job's first call then waits (its node is to be
    lost), a later one returns a score at once."""

    def __init__(self, job: JobConfig) -> None:
        self.base = job.base_model.name

    async def evaluate(self, job: JobConfig, *tracking: str) -> dict[str, Any]:
        import ray

        calls = Path(job.output_dir) / "calls"
        earlier = calls.read_text().split() if calls.is_file() else []
        with calls.open("a") as out:
            out.write(f"{job.job_key} {ray.get_runtime_context().get_node_id()}\n")
        if job.job_key not in earlier:
            await asyncio.sleep(120.0)
        return {"score": 1.0, "node": "", "wall_s": 0.0}

    def shutdown(self) -> None:
        pass


class CrashingEvaluator:
    """A stand-in evaluator whose process dies as it starts (as when loading its base crashes), counting its starts in
    `<output_dir>/starts`."""

    def __init__(self, job: JobConfig) -> None:
        with (Path(job.output_dir) / "starts").open("a") as out:
            out.write("start\n")
        os._exit(1)

    async def evaluate(self, job: JobConfig, *tracking: str) -> dict[str, Any]:
        return {"score": 1.0}

    def shutdown(self) -> None:
        pass


@pytest.mark.cluster
def test_an_evaluator_lost_with_its_node_is_resubmitted_and_one_that_crashes_is_a_bounded_failure(
        two_workers: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two evaluations on one base's evaluator, whose node is lost while both run: with `max_failures: 0` both still
    finish, on a new actor on the other node, each called twice; the pool ends the actor after. Then an evaluator whose
    process dies on start: each death is a failure with its cause (never a node loss, so `max_node_losses: -1` does
    not loop), and once it died more than the pool's restarts its base's evaluations fail at once."""
    from orchestrator.scheduler import SchedulerSettings, run_units

    jobs = [tiny_job(tmp_path, task=task, kind="evaluate_base").model_copy(update={"job_key": f"lost/{task}"})
            for task in ("demo_sentiment", "demo_colors")]
    pool = EvaluatorPool({"tiny-llama": {"CPU": 0.5}}, actor=NodeEvaluator)
    calls = tmp_path / "calls"

    def lose_the_evaluators_node() -> None:
        lines = wait_until(lambda: calls.is_file() and len(calls.read_text().splitlines()) == 2 and
                           calls.read_text().splitlines(), 120, "both evaluations")
        node_id = lines[0].split()[1]
        two_workers.remove_node(next(node for node in two_workers.worker_nodes if node.node_id == node_id))

    killer = threading.Thread(target=lose_the_evaluators_node)
    killer.start()
    try:
        outcomes = run_units([EvaluationUnit(job, pool, ("", "", "")) for job in jobs],
                             SchedulerSettings(RetrySettings(max_failures=0), len(jobs)))
    finally:
        killer.join()
        pool.close()
    out = capsys.readouterr().out
    assert [outcomes[job.job_key].state for job in jobs] == ["finished", "finished"], out[-3000:]
    assert sorted(line.split()[0] for line in calls.read_text().splitlines()) == sorted(2 * [j.job_key for j in jobs])
    assert len({line.split()[1] for line in calls.read_text().splitlines()}) == 2  # the second calls: the other node
    assert out.count("node lost") == 2 and "retry" not in out, out[-3000:]
    assert pool.actors == {}  # ended once its base had no evaluation left

    crashing = tmp_path / "crashing"
    crashing.mkdir()
    job = tiny_job(crashing, kind="evaluate_base").model_copy(update={"job_key": "crashing/demo_sentiment"})
    pool = EvaluatorPool({"tiny-llama": {"CPU": 0.5}}, actor=CrashingEvaluator, max_restarts=1)
    try:
        outcomes = run_units([EvaluationUnit(job, pool, ("", "", ""))],
                             SchedulerSettings(RetrySettings(max_failures=5, max_node_losses=-1), 1))
    finally:
        pool.close()
    out = capsys.readouterr().out
    error = outcomes[job.job_key].error
    assert outcomes[job.job_key].state == "failed" and "died 2 times, not with its node" in error, out[-3000:]
    assert "worker process has died" in error and "\n" not in error, error
    assert (crashing / "starts").read_text().count("start") == 2  # started once, restarted once
    assert "retry 1/5" in out and "retry 2/5" in out and "retry 3/5" not in out and "node lost" not in out, out[-3000:]
