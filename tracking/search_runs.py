"""The MLflow record of a LoRA search (orchestrator/search.py): one run per trial, nested under its job's run.

A trial's run is found again by its trial key (`<job key>/<trial id>`), so a trial resumed after a crash logs on into
the run it started. It holds the trial's settings as params, its loss curve (`loss` by step) and validation scores
(`validation_score` by step); it ends FINISHED (with `loraland.stopped_at`, the step it reached, and whether the
scheduler stopped it early) or FAILED with the error. A trial that outlived its host (its node lost) carries
`loraland.host_losses` and `resumed_from_step`, the step it resumed from. The job's own run says it was searched
(`loraland.searched`) and which trial won.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mlflow.entities import Run, RunTag

from tracking import store
from tracking.retry import call_with_retry

ROLE_TRIAL = "trial"
TAG_TRIAL = "loraland.trial"  # the trial's id in its Tune experiment
TAG_SEARCH_JOB = "loraland.search_job"  # the job key of the searched job the trial belongs to
TAG_STOPPED_AT = "loraland.stopped_at"  # the step the trial reached
TAG_STOPPED_EARLY = "loraland.stopped_early"  # "true" when the scheduler (ASHA) stopped it before its max_steps
TAG_SEARCHED = "loraland.searched"  # on the job's run: "true" when its adapter is a search's winner
TAG_WINNER = "loraland.search_winner"  # on the job's run: the winning trial's id
TAG_ADAPTER_DIR = "loraland.adapter_dir"  # the trial's adapter folder, as of its last validation score
TAG_HOST_LOSSES = "loraland.host_losses"  # hosts a trial outlived (their node lost): it resumed on the next
RESUMED_METRIC = "resumed_from_step"  # the step (its newest checkpoint) a trial resumed from after losing its host
VALIDATION_METRIC = "validation_score"


@dataclass(frozen=True)
class TrialRun:
    """A trial's run as a (resumed) trial finds it: its id, whether it already ended FINISHED, and its last validation
    score with its step and adapter folder (None before the first)."""

    run_id: str
    finished: bool
    last: tuple[int, float, str] | None


def trial_key(job_key: str, trial_id: str) -> str:
    """The stable key of a trial's run."""
    return f"{job_key}/{trial_id}"


def open_trial_run(experiment_id: str, job_run_id: str, job_key: str, trial_id: str, params: dict[str, Any],
                   uri: str | None = None) -> TrialRun:
    """Find or create the trial's run nested under the job's run and log its settings; unless it already FINISHED
    (a trial that ended before its search's state was saved), set it RUNNING."""
    base_model, task = job_key.split("/")[1:3]
    tags = {store.TAG_ROLE: ROLE_TRIAL, store.TAG_JOB_KEY: trial_key(job_key, trial_id), TAG_TRIAL: trial_id,
            TAG_SEARCH_JOB: job_key, store.TAG_SWEEP: job_key.split("/", 1)[0], store.TAG_BASE_MODEL: base_model,
            store.TAG_TASK: task, store.TAG_PARENT: job_run_id}
    run, created = store.find_or_create_run(experiment_id, store.tag_filter(job_key=trial_key(job_key, trial_id)),
                                            f"{base_model}.{task}.{trial_id}", tags, uri)
    run_id, finished = run.info.run_id, run.info.status == "FINISHED"
    if not created and not finished:
        call_with_retry(store.client(uri).update_run, run_id, "RUNNING")
    store.log_params(run_id, params, uri)
    history = call_with_retry(store.client(uri).get_metric_history, run_id, VALIDATION_METRIC) if not created else []
    if not history or TAG_ADAPTER_DIR not in run.data.tags:
        return TrialRun(run_id, finished, None)
    last = max(history, key=lambda m: (m.step, m.timestamp))
    return TrialRun(run_id, finished, (int(last.step), float(last.value), run.data.tags[TAG_ADAPTER_DIR]))


def log_trial_step(run_id: str, losses: list[dict[str, float]], step: int, score: float, adapter_dir: str,
                   uri: str | None = None) -> None:
    """The trial's loss records since its last report (each with its `step`), its validation score at `step` and the
    adapter folder that score is of."""
    metrics = [store.metric(key, value, int(record["step"])) for record in losses
               for key, value in record.items() if key != "step" and _finite(value)]
    call_with_retry(store.client(uri).set_tag, run_id, TAG_ADAPTER_DIR, adapter_dir)
    store.log_metrics(run_id, [*metrics, store.metric(VALIDATION_METRIC, score, step)], uri)


def log_host_loss(run_id: str, losses: int, resumed_from: int, uri: str | None = None) -> None:
    """Record on a trial's run that it outlived `losses` hosts, resuming at step `resumed_from` on the next."""
    call_with_retry(store.client(uri).set_tag, run_id, TAG_HOST_LOSSES, str(losses))
    store.log_metrics(run_id, [store.metric(RESUMED_METRIC, float(resumed_from), resumed_from)], uri)


def end_trial_run(experiment_id: str, job_key: str, trial_id: str, status: str, stopped_at: int | None = None,
                  stopped_early: bool = False, error: str = "", uri: str | None = None) -> None:
    """End the trial's run (if it has one) FINISHED or FAILED, with the step it reached and its error."""
    run = store.find_job_run(experiment_id, trial_key(job_key, trial_id), uri)
    if run is None:
        return
    tags = [RunTag(TAG_STOPPED_EARLY, str(stopped_early).lower())]
    tags += [RunTag(TAG_STOPPED_AT, str(stopped_at))] if stopped_at is not None else []
    tags += [RunTag(store.TAG_ERROR, error[:5000])] if error else []
    call_with_retry(store.client(uri).log_batch, run.info.run_id, tags=tags)
    call_with_retry(store.client(uri).set_terminated, run.info.run_id, status)


def trial_runs(experiment_id: str, job_key: str, uri: str | None = None) -> list[Run]:
    """The trial runs of a searched job, oldest first."""
    return store.search_all_runs(experiment_id, store.tag_filter(search_job=job_key), uri)


def mark_searched(job_run_id: str, winner: str, trials: int, uri: str | None = None) -> None:
    """Tag the job's run as a search's (its adapter is trial `winner`'s, of `trials`)."""
    tags = [RunTag(TAG_SEARCHED, "true"), RunTag(TAG_WINNER, winner)]
    call_with_retry(store.client(uri).log_batch, job_run_id, tags=tags)
    store.log_params(job_run_id, {"search.trials": trials, "search.winner": winner}, uri)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def close_open_trials(experiment_id: str, job_key: str, uri: str | None = None) -> list[str]:
    """End the searched job's trial runs still RUNNING once its search is over (a trial whose end a killed search
    never recorded): FINISHED at the last step it logged, or FAILED when it logged no score. Returns their trial ids."""
    closed = []
    for run in trial_runs(experiment_id, job_key, uri):
        if run.info.status != "RUNNING":
            continue
        history = call_with_retry(store.client(uri).get_metric_history, run.info.run_id, VALIDATION_METRIC)
        trial_id = run.data.tags.get(TAG_TRIAL, "")
        step = max((m.step for m in history), default=None)
        end_trial_run(experiment_id, job_key, trial_id, "FINISHED" if history else "FAILED", step,
                      error="" if history else "its search ended without a score from it", uri=uri)
        closed.append(trial_id)
    return closed
