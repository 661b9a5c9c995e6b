"""What runs on Ray for a LoRA search (orchestrator/search.py has the whole picture): the search's own task
(`run_search_job`: the job's MLflow run, the Tune experiment, the winner's evaluation), its trials (`run_trial`), and
the Tune callback that ends a trial's MLflow run and frees its host slot (`TrialEnd`). Imported on workers only: Ray
Tune takes seconds to import."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
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
TRIAL_DEMAND = {"CPU": 0.01}  # a trial only calls its host


def run_trial(config: dict[str, Any], plan: SearchPlan, job_run_id: str) -> None:
    """One trial (a Tune function trainable): trained by the host `eval_every` steps at a time, from the step of its
    last Tune checkpoint; after each stretch it is scored on the validation rows, its adapter saved, its losses and
    score logged to its MLflow run, and `{score, step}` reported to Tune with a checkpoint."""
    import ray

    from tracking.search_runs import log_trial_step, open_trial_run

    trial_id = tune.get_context().get_trial_id()
    job = trial_job(plan.job, config, trial_id, plan.settings.eval_every)
    run = open_trial_run(plan.experiment_id, job_run_id, plan.job.job_key, trial_id, trial_params(config), plan.uri)
    if run.last is not None and (run.finished or run.last[0] >= job.training.max_steps):
        # it ended (or trained to its end) before the search's state was saved: report that, train nothing
        step, score, adapter_dir = run.last
        tune.report({"score": score, "step": step, "adapter_dir": adapter_dir})
        return
    host = trial_host(plan.host)
    # where it got to: its Tune checkpoint, or further, what its run logged (the host resumes from its checkpoints)
    step = max(reached_step(tune.get_checkpoint()), run.last[0] if run.last else 0)
    while step < job.training.max_steps:
        step = min(step + plan.settings.eval_every, job.training.max_steps)
        losses = ray.get(host.train.remote(trial_id, job, step))
        score = float(ray.get(host.validate.remote(trial_id)))
        adapter_dir = ray.get(host.save.remote(trial_id))
        log_trial_step(run.run_id, losses, step, score, adapter_dir, plan.uri)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / STEP_FILE).write_text(json.dumps({"step": step}))
            tune.report({"score": score, "step": step, "adapter_dir": adapter_dir},
                        checkpoint=tune.Checkpoint.from_directory(folder))


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
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan, job_run_id=job_run_id), TRIAL_DEMAND)
    path = storage.join(plan.job.output_dir, TUNE_DIR)
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
    settings = plan.settings
    tune_config = tune.TuneConfig(
        metric="score", mode="max", num_samples=settings.num_samples, max_concurrent_trials=plan.host.slots,
        search_alg=search_algorithm(settings), scheduler=trial_scheduler(settings, plan.job))
    run_config = tune.RunConfig(name=TUNE_DIR, storage_path=plan.job.output_dir, callbacks=[TrialEnd(plan)],
                                failure_config=tune.FailureConfig(max_failures=plan.max_failures), verbose=0)
    return tune.Tuner(trainable, param_space=param_space(settings.space), tune_config=tune_config,
                      run_config=run_config)


def search_algorithm(settings: SearchSettings) -> Any:
    """Random draws (seeded), or Optuna's TPE."""
    if settings.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=settings.seed)
    return BasicVariantGenerator(random_state=settings.seed)


def trial_scheduler(settings: SearchSettings, job: JobConfig) -> Any:
    """ASHA on the validation score by step (its horizon the longest trial), or first-in-first-out to the end."""
    if settings.scheduler == "none":
        return FIFOScheduler()
    horizon = max(settings.space.max_steps or [job.training.max_steps])
    return ASHAScheduler(time_attr="step", max_t=horizon, grace_period=min(settings.asha.grace_period, horizon),
                         reduction_factor=settings.asha.reduction_factor)


def best_trial(results: Any) -> Any:
    """The trial with the best last score (its saved adapter is the one scored); a search none of whose trials was
    scored is an error naming the first trial error."""
    scored = [result for result in results if result.metrics and "score" in result.metrics]
    if not scored:
        errors = [str(result.error).splitlines()[0] for result in results if result.error is not None]
        raise RuntimeError(f"no trial of the search was scored{': ' + errors[0] if errors else ''}")
    return results.get_best_result(metric="score", mode="max", scope="last")


# --------------------------------------------------------------------------- the search as a job


def run_search_job(plan: SearchPlan, parent_run_id: str) -> dict[str, Any]:
    """The search of one job, logged to the job's MLflow run (reused on a retry): the Tune experiment, then the winner
    evaluated once on the task's evaluation rows and recorded as the job's result (registered, champion moved).
    Returns its score, job key, node and wall time, like a single job's task."""
    import ray

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
        evaluate = ray.remote(evaluate_winner).options(name=f"{job.job_key}/winner", max_retries=0,
                                                       **ray_options(plan.evaluation_demand))
        summary = {"search_trials": float(len(results)), "search_best_validation_score": float(best.metrics["score"])}
        result = ray.get(evaluate.remote(winner, best.metrics["adapter_dir"], summary))
        mark_searched(tracker.run_id, best.metrics.get("trial_id", ""), len(results), plan.uri)
        tracker.finish(result)
    return {"score": result.score, "job_key": job.job_key, "node": ray.get_runtime_context().get_node_id(),
            "wall_s": time.monotonic() - started}


def evaluate_winner(job: JobConfig, adapter_dir: str, summary: dict[str, float]) -> Any:
    """The winner's adapter on the base, scored on the task's evaluation rows, recorded as the job's result (its
    result.json: a search evaluated once is not evaluated again)."""
    from jobs.evaluate import evaluate_model
    from jobs.models import load_adapter, load_base_model, load_tokenizer, resolve_device
    from jobs.run import finished_result, record_result
    from jobs.storage import JobStorage
    from jobs.train import TrainResult

    output = JobStorage(job.output_dir)
    done = finished_result(output, job)
    if done is not None:
        return done
    tokenizer = load_tokenizer(job.base_model)
    model = load_adapter(load_base_model(job.base_model, job.quantization, resolve_device(job.device)), adapter_dir)
    evaluation = evaluate_model(model, tokenizer, job.task, job.evaluation)
    return record_result(job, output, evaluation, TrainResult(adapter_dir, summary, []))




def search_once(sweep: SweepConfig, base_model: str, task: str, uri: str) -> dict[str, Any]:
    """One (base model, task) search of `sweep` (its `search` section: trials, scheduler, K) outside a sweep's driver,
    for benchmarks/search.py: tracked under a fresh run of the sweep's experiment in `uri`, in storage under the
    sweep's storage path (give each call its own: the same path restores the earlier search), its trial host ended
    after. Needs a connected Ray. Returns `trials` (each trial's id, drawn settings, last `score` and the `step` it
    reached, or its `error`), `best` (the best trial's id and score), and `wall_s`, the search's wall time (the host's
    start included)."""
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
        trial_host(plan.host)
        results = tuner(plan, job_run_id).fit()
    finally:
        release_hosts(sweep)
    wall_s = time.monotonic() - started
    trials = [{"trial": r.metrics.get("trial_id", ""), "config": r.config, "score": r.metrics.get("score"),
               "step": r.metrics.get("step"), "error": str(r.error).splitlines()[0] if r.error else ""}
              for r in results]
    best = best_trial(results)
    return {"trials": trials, "best": {"trial": best.metrics.get("trial_id", ""), "score": best.metrics["score"]},
            "wall_s": wall_s}
