"""What runs on Ray for a LoRA search (orchestrator/search.py has the whole picture): the search's own task
(`run_search_job`: the job's MLflow run, the Tune experiment, the winner's evaluation), its trials (`run_trial`), and
the Tune callback that ends a trial's MLflow run and frees its host slot (`TrialEnd`). Imported on workers only: Ray
Tune takes seconds to import."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from jobs import storage
from jobs.config import JobConfig
from orchestrator.config import SweepConfig
from orchestrator.resources import ray_options
from orchestrator.search import (
    STEP_FILE,
    TUNE_DIR,
    SearchPlan,
    param_space,
    trial_host,
    trial_job,
    trial_params,
    winner_job,
)
from orchestrator.search_config import SearchSettings

log = logging.getLogger(__name__)
# a trial only calls its host; a placement group's bundle cannot be empty, so it asks for a token of memory
TRIAL_BUNDLE = {"memory": 2.0**20}
HOST_RETRY_S = 1.0  # between tries to reach a lost host's successor
LOSS = "loss"  # a report's mean training loss since the last one (ties in the score)
TIE_WEIGHT = 1e-6  # the loss's weight in ASHA's ranking: below any score difference that is not a tie


def run_trial(config: dict[str, Any], plan: SearchPlan, job_run_id: str) -> None:
    """One trial (a Tune function trainable): trained by the host `eval_every` steps at a time, from the step of its
    last Tune checkpoint; after each stretch it is scored on the validation rows, its adapter saved, its losses and
    score logged to its MLflow run, and `{score, step}` reported to Tune with a checkpoint."""
    from tracking.search_runs import log_trial_step, open_trial_run

    trial_id = tune.get_context().get_trial_id()
    job = trial_job(plan.job, config, trial_id, plan.settings.eval_every)
    run = open_trial_run(plan.experiment_id, job_run_id, plan.job.job_key, trial_id, trial_params(config), plan.uri)
    if run.last is not None and (run.finished or run.last[0] >= job.training.max_steps):
        # it ended (or trained to its end) before the search's state was saved: report that, train nothing
        step, score, adapter_dir = run.last
        tune.report({"score": score, "step": step, "adapter_dir": adapter_dir})
        return
    # where it got to: its Tune checkpoint, or further, what its run logged (the host resumes from its checkpoints)
    step = max(reached_step(tune.get_checkpoint()), run.last[0] if run.last else 0)
    while step < job.training.max_steps:
        start, step = step, min(step + plan.settings.eval_every, job.training.max_steps)
        losses, score, adapter_dir = train_stretch(plan, trial_id, job, (start, step), run.run_id)
        log_trial_step(run.run_id, losses, step, score, adapter_dir, plan.uri)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / STEP_FILE).write_text(json.dumps({"step": step}))
            tune.report({"score": score, "step": step, "adapter_dir": adapter_dir, LOSS: recent_loss(losses)},
                        checkpoint=tune.Checkpoint.from_directory(folder))


def recent_loss(losses: list[dict[str, float]]) -> float:
    """The mean training loss of a trial's loss records since its last report (NaN without one): what breaks ties in
    the score (`ScoreThenLoss`). A search's trials share its seed, hence its data order, so at one step they were
    trained on the same examples."""
    values = [record["loss"] for record in losses if math.isfinite(record.get("loss", math.nan))]
    return sum(values) / len(values) if values else math.nan


def reached_step(checkpoint: Any) -> int:
    """The step a trial's Tune checkpoint records (0 without one)."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        return int(json.loads((Path(folder) / STEP_FILE).read_text())["step"])


class TrialEnd(tune.Callback):
    """Ends a trial's MLflow run (FINISHED with the step it reached and whether it was stopped early, or FAILED) and
    frees its host slot, however the trial ended. Runs in the search's process; a tracking hiccup is logged, never
    raised into Tune."""

    def __init__(self, plan: SearchPlan) -> None:
        self.plan = plan

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")

    def _end(self, trial: Any, status: str) -> None:
        from tracking.search_runs import end_trial_run

        step = (trial.last_result or {}).get("step")
        planned = int(trial.config.get("max_steps", self.plan.job.training.max_steps))
        error = "" if status == "FINISHED" else trial_error(trial)
        try:
            end_trial_run(self.plan.experiment_id, self.plan.job.job_key, trial.trial_id, status, step,
                          status == "FINISHED" and step is not None and step < planned, error, self.plan.uri)
            trial_host(self.plan.host).drop.remote(trial.trial_id)
        except Exception as exc:  # the trial's record is not worth the search
            log.warning("trial %s not closed: %s", trial.trial_id, str(exc).splitlines()[0][:200])


def trial_error(trial: Any) -> str:
    """The last line of a failed trial's error (Tune writes it to the trial's error file)."""
    with contextlib.suppress(Exception):
        lines = [line for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
        return lines[-1] if lines else "trial failed"
    return "trial failed"


# --------------------------------------------------------------------------- the Tune experiment


def tuner(plan: SearchPlan, job_run_id: str) -> Any:
    """The search's Tuner: restored from `<output_dir>/tune` when a run of it was there, else a new experiment."""
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan, job_run_id=job_run_id),
                                    trial_resources())
    storage_path, filesystem = tune_storage(plan.job.output_dir)
    path = f"{storage_path.rstrip('/')}/{TUNE_DIR}"
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                  storage_filesystem=filesystem)
    settings = plan.settings
    # at most K trials at once (the host's slots, so a trial never queues for a slot while Tune counts its time), each
    # reusing a finished trial's process (a trial only calls the host: its process holds nothing of it)
    tune_config = tune.TuneConfig(
        metric="score", mode="max", num_samples=settings.num_samples, reuse_actors=True,
        search_alg=search_algorithm(settings, plan.host.slots), scheduler=trial_scheduler(settings, plan.job))
    run_config = tune.RunConfig(name=TUNE_DIR, storage_path=storage_path, storage_filesystem=filesystem,
                                callbacks=[TrialEnd(plan)],
                                failure_config=tune.FailureConfig(max_failures=plan.max_failures), verbose=0)
    return tune.Tuner(trainable, param_space=param_space(settings.space), tune_config=tune_config,
                      run_config=run_config)


def search_algorithm(settings: SearchSettings, max_concurrent: int) -> Any:
    """Random draws (seeded), or Optuna's TPE; at most `max_concurrent` trials running at once. (Tune's
    `max_concurrent_trials` is ignored with a random search's generator: the limit is the generator's own, or a
    ConcurrencyLimiter around Optuna.)"""
    if settings.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=settings.seed), max_concurrent=max_concurrent)
    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=max_concurrent)


def trial_scheduler(settings: SearchSettings, job: JobConfig) -> Any:
    """ASHA on the validation score by step (its horizon the longest trial; ties broken by training loss), or
    first-in-first-out to the end."""
    if settings.scheduler == "none":
        return FIFOScheduler()
    horizon = max(settings.space.max_steps or [job.training.max_steps])
    return ScoreThenLoss(time_attr="step", max_t=horizon, grace_period=min(settings.asha.grace_period, horizon),
                         reduction_factor=settings.asha.reduction_factor)


class ScoreThenLoss(ASHAScheduler):
    """ASHA ranking trials by score, ties by their recent training loss (lower first). A task's metric on a few
    validation rows is coarse: early in training most trials score the same (often 0), and ASHA stops only a trial
    strictly below its rung's cutoff, so on ties it stops nothing. The loss enters with a weight (`TIE_WEIGHT`) far
    below any real score difference; the score reported, logged and published stays the task's metric."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        return str(super().on_trial_result(tune_controller, trial, ranked(result, self._metric)))

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        super().on_trial_complete(tune_controller, trial, ranked(result, self._metric))


def ranked(result: dict[str, Any], metric: str | None) -> dict[str, Any]:
    """`result` with its score as ASHA ranks it: the score less `TIE_WEIGHT` x the loss squashed into [0, 1)."""
    loss = result.get(LOSS, math.nan)
    if metric not in result or not math.isfinite(loss):
        return result
    return result | {metric: result[metric] - TIE_WEIGHT * max(loss, 0.0) / (1.0 + max(loss, 0.0))}


def best_trial(results: Any) -> Any:
    """The trial with the best last score (its saved adapter is the one scored); a search none of whose trials was
    scored is an error naming the first trial error."""
    scored = [result for result in results if result.metrics and "score" in result.metrics]
    if not scored:
        errors = [str(result.error).splitlines()[0] for result in results if result.error is not None]
        raise RuntimeError(f"no trial of the search was scored{': ' + errors[0] if errors else ''}")
    return results.get_best_result(metric="score", mode="max", scope="last")


# --------------------------------------------------------------------------- faults and storage


def train_stretch(plan: SearchPlan, trial_id: str, job: JobConfig, stretch: tuple[int, int],
                  run_id: str) -> tuple[list[dict[str, float]], float, str]:
    """Train trial `trial_id` on its base model's host from step `stretch[0]` to `stretch[1]`, then score and save it:
    (its loss records past the stretch's start, its score, its adapter folder on the host's node).

    A host lost meanwhile (its node died, its process was killed) is started again, elsewhere or once a node returns,
    and the stretch trained again: the new host resumes the trial from its newest checkpoint on the sweep's storage
    (the one `save` wrote at the stretch's start). That is not a failed trial (Tune never sees it), up to
    `plan.max_node_losses` hosts per trial (-1: any); the trial's run records the step it resumed from."""
    import ray
    from ray.exceptions import RayActorError

    from tracking.search_runs import log_host_loss

    lost: set[str] = set()
    while True:
        host = trial_host(plan.host)  # the running host, or a new one once the lost one is gone
        try:
            losses = ray.get(host.train.remote(trial_id, job, stretch[1]))
            score = float(ray.get(host.validate.remote(trial_id)))
            adapter_dir = ray.get(host.save.remote(trial_id))
            if lost:
                log_host_loss(run_id, len(lost), int(ray.get(host.resumed_from.remote(trial_id))), plan.uri)
            return [record for record in losses if record["step"] > stretch[0]], score, adapter_dir
        except RayActorError as error:
            if error.actor_init_failed:  # the host cannot start: a failure of the trial, not a loss
                raise
            lost.add(error.actor_id or "")
            if 0 <= plan.max_node_losses < len(lost):
                raise
            log.warning("trial %s: its host was lost (%s); training again from its last checkpoint", trial_id,
                        str(error).splitlines()[0][:200])
            time.sleep(HOST_RETRY_S)


def trial_resources() -> Any:
    """Where Tune runs trials: on this node, the search's own (Tune's driver). A trial's process only calls the host,
    but Tune counts a trial whose process dies as failed: held here, trials die only with the search itself, which the
    sweep's scheduler resubmits as a node loss (`Tuner.restore` resumes them), never with the host's node."""
    import ray
    from ray.util.placement_group import NODE_ID_LABEL_KEY

    node = ray.get_runtime_context().get_node_id()
    return tune.PlacementGroupFactory([TRIAL_BUNDLE], bundle_label_selector=[{NODE_ID_LABEL_KEY: node}])


def tune_storage(output_dir: str) -> tuple[str, Any]:
    """The Tune experiment's storage path and filesystem: the job's output folder as is (filesystem None), or for an
    object store URI (`s3://bucket/prefix?endpoint_override=...`) pyarrow's filesystem and the path in it, so Tune
    keeps its state and the trials' checkpoints where the job keeps its own."""
    if not storage.is_uri(output_dir):
        return output_dir, None
    filesystem, path = storage.open_location(output_dir)
    return path, filesystem


# --------------------------------------------------------------------------- the search as a job


def run_search_job(plan: SearchPlan, parent_run_id: str) -> dict[str, Any]:
    """The search of one job, logged to the job's MLflow run (reused on a retry): the Tune experiment, then the winner
    evaluated once on the task's evaluation rows and recorded as the job's result (registered, champion moved).
    Returns its score, job key, node and wall time, like a single job's task."""
    import ray

    from jobs.run import finished_result
    from jobs.storage import JobStorage
    from tracking.search_runs import close_open_trials, mark_searched
    from tracking.tracker import JobTracker

    started = time.monotonic()
    job = plan.job
    with JobTracker.for_job(job, plan.experiment_id, parent_run_id, plan.uri) as tracker:
        assert tracker.run_id is not None
        trial_host(plan.host)  # started here, outside any trial's placement group
        # the experiment's state (which trials ended) saved every second, not Tune's adaptive minutes: a killed search
        # then loses at most a second of it (a trial that ended meanwhile reports from its run, see run_trial)
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
        results = tuner(plan, tracker.run_id).fit()
        close_open_trials(plan.experiment_id, job.job_key, plan.uri)
        best = best_trial(results)
        winner = winner_job(job, best.config, plan.settings.eval_every)
        trial_dir = trial_job(job, best.config, best.metrics["trial_id"], plan.settings.eval_every).output_dir
        evaluate = ray.remote(evaluate_winner).options(name=f"{job.job_key}/winner", max_retries=0,
                                                       **ray_options(plan.evaluation_demand))
        summary = {"search_trials": float(len(results)), "search_best_validation_score": float(best.metrics["score"])}
        ray.get(evaluate.remote(winner, trial_dir, summary))
        result = finished_result(JobStorage(job.output_dir), winner)  # its adapter fetched to this node from a store
        assert result is not None, "the winner's evaluation recorded no result"
        mark_searched(tracker.run_id, best.metrics["trial_id"], len(results), plan.uri)
        tracker.finish(result)
    return {"score": result.score, "job_key": job.job_key, "node": ray.get_runtime_context().get_node_id(),
            "wall_s": time.monotonic() - started}


def evaluate_winner(job: JobConfig, trial_dir: str, summary: dict[str, float]) -> Any:
    """The winning trial's adapter (its last saved, the one its last score is of, from `trial_dir` on the sweep's
    storage) copied to the job's own `adapter/` there, as a fine-tune's, scored on the task's evaluation rows and
    recorded as the job's result (its result.json: a search evaluated once is not evaluated again)."""
    from jobs.checkpoints import ADAPTER_DIR
    from jobs.evaluate import evaluate_model
    from jobs.models import load_adapter, load_base_model, load_tokenizer, resolve_device
    from jobs.run import finished_result, record_result
    from jobs.storage import JobStorage
    from jobs.train import TrainResult

    output = JobStorage(job.output_dir)
    done = finished_result(output, job)
    if done is not None:
        return done
    trial = JobStorage(trial_dir)
    trial.pull_dir(ADAPTER_DIR)
    adapter_dir = output.local / ADAPTER_DIR
    shutil.copytree(trial.local / ADAPTER_DIR, adapter_dir, dirs_exist_ok=True)
    output.push(ADAPTER_DIR)
    trial.drop_scratch(ADAPTER_DIR)
    tokenizer = load_tokenizer(job.base_model)
    model = load_base_model(job.base_model, job.quantization, resolve_device(job.device))
    evaluation = evaluate_model(load_adapter(model, str(adapter_dir)), tokenizer, job.task, job.evaluation)
    return record_result(job, output, evaluation, TrainResult(str(adapter_dir), summary, []))


def search_once(sweep: SweepConfig, base_model: str, task: str, uri: str) -> dict[str, Any]:
    """One (base model, task) search of `sweep` (its `search` section: trials, scheduler, K) outside a sweep's driver,
    for benchmarks/search.py: tracked under a fresh run of the sweep's experiment in `uri`, in storage under the
    sweep's storage path (give each call its own: the same path restores the earlier search), its trial host ended
    after. Needs a connected Ray. Returns `trials` (each trial's id, drawn settings, last `score` and the `step` it
    reached, or its `error`), `best` (the best trial's id and score), `wall_s`, the search's wall time (the host's
    start included), and the host's `group_steps` and `trial_steps` (the trials' steps those shared steps ran)."""
    import ray

    from orchestrator.config import expand_jobs
    from orchestrator.search import is_searched, release_hosts, search_plan
    from tracking import store

    job = next(job for job in expand_jobs(sweep) if job.base_model.name == base_model and job.task.name == task
               and is_searched(job, sweep))
    experiment_id = store.ensure_experiment(sweep.tracking.experiment or sweep.name, uri)
    job_run_id = store.start_sweep_run(experiment_id, f"{sweep.name}-{time.time_ns()}", uri=uri)
    plan = search_plan(job, sweep, experiment_id, uri)
    started = time.monotonic()
    try:
        host = trial_host(plan.host)
        results = tuner(plan, job_run_id).fit()
        steps = ray.get(host.__ray_call__.remote(lambda actor: (actor.host.group_steps, actor.host.trial_steps)))
    finally:
        release_hosts(sweep)
    wall_s = time.monotonic() - started
    trials = [{"trial": r.metrics.get("trial_id", ""), "config": r.config, "score": r.metrics.get("score"),
               "step": r.metrics.get("step"), "error": str(r.error).splitlines()[0] if r.error else ""}
              for r in results]
    best = best_trial(results)
    return {"trials": trials, "best": {"trial": best.metrics.get("trial_id", ""), "score": best.metrics["score"]},
            "wall_s": wall_s, "group_steps": steps[0], "trial_steps": steps[1]}
