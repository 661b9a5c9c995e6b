"""LoRA search (orchestrator/search.py): the `search` section's validation, trials' settings, and a real search on a
local Ray with a real mlflow server: trials nested under their job's run, a failing trial that does not fail the
search, a driver killed mid-search that resumes, and the winner registered and champion."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from core.errors import ConfigError
from core.paths import PROJECT_ROOT
from tests.test_sweep import kill_process_tree, sweep_command, sweep_env

DEMO = PROJECT_ROOT / "configs" / "sweeps" / "demo_search.yaml"


def write_sweep(tmp_path: Path, data: dict[str, Any], name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def demo_data(**search: Any) -> dict[str, Any]:
    data = yaml.safe_load(DEMO.read_text())
    data["search"] |= search
    return data


# --------------------------------------------------------------------------- unit


@pytest.mark.unit
def test_a_bad_search_section_gets_one_line_per_problem(tmp_path: Path) -> None:
    from orchestrator.config import load_sweep

    data = demo_data(tasks=["demo_colors", "demo_nope"], scheduler="hyperband", num_samples=0,
                     space={"r": [0, 4], "target_modules": [["q_proj"], ["zz_proj"]], "learning_rate": {"low": 1.0,
                                                                                                          "high": 0.1}},
                     per_task={"demo_arithmetic": {"eval_every": 0}, "demo_colors": {"space": {"alpha": True}}})
    with pytest.raises(ConfigError) as raised:
        load_sweep(write_sweep(tmp_path, data))
    lines = [line.split(": ", 1)[1] for line in str(raised.value).splitlines()]
    assert sorted(lines) == sorted([
        "search.space.r[0]: Input should be greater than 0 (got 0)",
        "search.space.learning_rate.range: low (1.0) must be below high (0.1)",
        "search.num_samples: Input should be greater than 0 (got 0)",
        "search.scheduler: Input should be 'asha' or 'none' (got 'hyperband')",
        "search.per_task.demo_arithmetic.eval_every: Input should be greater than 0 (got 0)",
        "search.per_task.demo_colors.space.alpha: Input should be a valid list (got True)",
        "search.tasks[1]: 'demo_nope' is not one of the sweep's tasks",
        "search.per_task.demo_arithmetic: not one of the sweep's tasks",
        "search.space.target_modules[1][0]: 'zz_proj' is not a linear layer of tiny-llama (has q_proj, k_proj, "
        "v_proj, o_proj, gate_proj, up_proj, down_proj)",
    ]), str(raised.value)


@pytest.mark.unit
def test_per_task_overrides_and_job_keys(tmp_path: Path) -> None:
    from orchestrator.config import expand_jobs, load_sweep

    data = demo_data(tasks=["demo_colors"], per_task={"demo_colors": {"num_samples": 2, "space": {"r": [2]}}})
    sweep = load_sweep(write_sweep(tmp_path, data))
    assert sweep.search is not None
    colors = sweep.search.for_task("demo_colors")
    assert colors.num_samples == 2 and colors.space.r == [2] and colors.space.alpha == [8, 16, 32]
    assert colors.per_task == {} and sweep.search.for_task("demo_sentiment").num_samples == 4
    keys = {(job.task.name, job.kind): job.job_key for job in expand_jobs(sweep)}
    assert "/search-" in keys[("demo_colors", "train")] and "/train-" in keys[("demo_sentiment", "train")]
    # the search's settings are part of its key: another space is another job (and output folder)
    data["search"]["per_task"]["demo_colors"]["space"]["r"] = [4]
    other = {(job.task.name, job.kind): job.job_key for job in expand_jobs(load_sweep(write_sweep(tmp_path, data)))}
    assert other[("demo_colors", "train")] != keys[("demo_colors", "train")]
    assert other[("demo_sentiment", "train")] == keys[("demo_sentiment", "train")]


@pytest.mark.unit
def test_a_trial_trains_its_draws_in_its_own_folder(tmp_path: Path) -> None:
    from orchestrator.config import expand_jobs, load_sweep
    from orchestrator.search import host_spec, param_space, trial_job, trial_params

    sweep = load_sweep(write_sweep(tmp_path, demo_data(space={"r": [4, 16], "target_modules": [["q_proj"],
                                                                                                 "all-linear"]})))
    assert sweep.search is not None
    job = next(job for job in expand_jobs(sweep) if job.kind == "train")
    space = param_space(sweep.search.space)
    assert sorted(space) == ["r", "target_modules"] and space["target_modules"].categories == ["q_proj", "all-linear"]
    draws = {"r": 16, "target_modules": "q_proj", "learning_rate": 0.003, "max_steps": 60}
    trial = trial_job(job, draws, "abc123", eval_every=20)
    assert (trial.lora.r, trial.lora.alpha, trial.lora.target_modules) == (16, 16, ["q_proj"])
    assert (trial.training.learning_rate, trial.training.max_steps, trial.training.checkpoint_every) == (0.003, 60, 20)
    often = trial_job(job, draws, "abc123", eval_every=job.training.log_every - 1).training
    assert often.log_every == often.checkpoint_every == job.training.log_every - 1
    assert trial.output_dir == f"{job.output_dir}/trials/abc123" and trial.job_key == f"{job.job_key}/abc123"
    assert trial_params(draws)["lora.r"] == 16 and trial_params(draws)["training.learning_rate"] == 0.003
    # on the CPU every trial at once fits; the host asks for the sweep's CPUs per job, no GPU
    spec = host_spec(job, sweep, sweep.search.for_task(job.task.name))
    assert spec.slots == 4 and spec.demand == {"CPU": 1.0} and spec.validation_rows == 32


@pytest.mark.unit
def test_the_demo_search_validates_and_plans() -> None:
    from orchestrator.config import load_sweep

    sweep = load_sweep(DEMO)
    assert sweep.search is not None and sweep.search.searches("demo_colors")
    assert sweep.search.for_task("demo_colors").algorithm == "optuna"


@pytest.mark.unit
def test_tune_keeps_its_state_where_the_job_keeps_its_own() -> None:
    from orchestrator.search_trials import tune_storage

    assert tune_storage("/data/sweeps/s/job") == ("/data/sweeps/s/job", None)
    # an object store: the path in pyarrow's filesystem (no scheme, no query), the endpoint in the filesystem
    path, filesystem = tune_storage("s3://bucket/sweeps/s/job?endpoint_override=127.0.0.1:9&scheme=http&region=x")
    assert path == "bucket/sweeps/s/job" and filesystem.type_name == "s3"


# --------------------------------------------------------------------------- a real search


def search_sweep(tmp_path: Path) -> Path:
    """One base x one task, 4 trials co-trained, of 10 or 20 steps scored every 10 on 8 rows; a learning rate of 1e30
    makes a trial's loss non-finite, so it fails (seed 3 draws it once)."""
    data = yaml.safe_load((PROJECT_ROOT / "tests" / "fixtures" / "mini_sweep.yaml").read_text())
    # demo_arithmetic: the registry is shared per server; tests/tracking_fixtures.py counts demo_sentiment's versions
    data |= {"name": f"search-{tmp_path.name}"[:60], "tasks": ["demo_arithmetic"], "evaluate_base": False}
    data["lora"] |= {"dropout": 0.0}
    data["evaluation"] |= {"limit": 8, "batch_size": 8}
    data["training"] |= {"micro_batch_size": 4}
    data["search"] = {"space": {"r": [4, 8], "learning_rate": [1.0e-2, 1.0e30], "max_steps": [10, 20]},
                      "num_samples": 4, "validation_rows": 8, "eval_every": 10, "seed": 3,
                      "asha": {"grace_period": 10, "reduction_factor": 2}, "max_concurrent_trials": 4}
    return write_sweep(tmp_path, data)


def search_runs(uri: str, sweep_name: str) -> tuple[Any, list[Any]]:
    """The searched job's run (or None) and its trial runs."""
    from tracking import store

    experiment_id = store.experiment_id_for(sweep_name, uri)
    runs = store.search_all_runs(experiment_id, "", uri)
    jobs = [run for run in runs if run.data.tags.get(store.TAG_ROLE) == "job"]
    return (jobs[0] if jobs else None), [run for run in runs if run.data.tags.get(store.TAG_ROLE) == "trial"]


def validation_history(uri: str, run_id: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "validation_score"))


@pytest.mark.cluster
def test_search_killed_mid_way_resumes_and_its_winner_is_champion(mlflow_server, s3_store, tmp_path: Path) -> None:
    """Storage on an object store only (moto's S3): Tune's state, the trials' checkpoints and the winner's adapter and
    result are kept there (on one machine the scratch folders stay: the node-loss test below gives each node its own
    disk, so a resumed trial can only read its checkpoint from the store)."""
    from tracking.registry import champion, version_score, versions
    from tracking.search_runs import TAG_SEARCHED, TAG_STOPPED_AT, TAG_TRIAL, TAG_WINNER

    uri = mlflow_server.uri
    sweep = search_sweep(tmp_path)
    name = yaml.safe_load(sweep.read_text())["name"]
    command = sweep_command(uri, s3_store.uri(tmp_path.name), sweep)
    env = sweep_env(tmp_path) | s3_store.env
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finished_before: dict[str, list[tuple[int, float]]] = {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:  # kill it once a trial has finished
        try:
            _, trials = search_runs(uri, name)
        except Exception:  # no experiment yet
            trials = []
        done = [t for t in trials if t.info.status == "FINISHED"]
        if done:
            finished_before = {t.data.tags[TAG_TRIAL]: validation_history(uri, t.info.run_id) for t in done}
            break
        time.sleep(0.5)
    assert driver.poll() is None and finished_before, f"the search ended (or never got going) before it was killed: " \
                                                      f"{log.read_text()[-3000:]}"
    kill_process_tree(driver.pid)  # the driver's local Ray, its trial host and trials go with it
    driver.wait()

    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    job, trials = search_runs(uri, name)
    assert job.info.status == "FINISHED" and job.data.tags[TAG_SEARCHED] == "true"
    by_trial = {t.data.tags[TAG_TRIAL]: t for t in trials}
    assert len(by_trial) == len(trials) == 4  # one run per trial, across both drivers
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {job.info.run_id}
    for trial_id, history in finished_before.items():  # no finished trial ran again
        assert validation_history(uri, by_trial[trial_id].info.run_id) == history
    failed = [t for t in trials if t.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.params["training.learning_rate"] == "1e+30", failed
    assert "finite" in failed[0].data.tags["loraland.error"]
    ended = [t for t in trials if t.info.status == "FINISHED"]
    assert len(ended) == 3 and all(int(t.data.tags[TAG_STOPPED_AT]) <= 20 for t in ended)
    winner = by_trial[job.data.tags[TAG_WINNER]]
    best = max(validation_history(uri, t.info.run_id)[-1][1] for t in ended)
    assert validation_history(uri, winner.info.run_id)[-1][1] == best
    assert job.data.params["lora.r"] == winner.data.params["lora.r"]
    # the winner's adapter is the job's: evaluated on the evaluation rows, registered, champion as a job's adapter is
    registered = [v for v in versions("demo_arithmetic", uri) if v.run_id == job.info.run_id]
    assert len(registered) == 1 and version_score(registered[0]) == job.data.metrics["score"]
    best_version = champion("demo_arithmetic", uri)
    assert best_version is not None and version_score(best_version) >= job.data.metrics["score"]
    assert_on_the_store(s3_store.keys(f"{tmp_path.name}/"), job.data.tags[TAG_WINNER])

    third = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert third.returncode == 0 and "1 already finished, 0 to run" in " ".join(third.stdout.split()), third.stdout
    assert search_runs(uri, name)[0].data.tags[TAG_WINNER] == job.data.tags[TAG_WINNER]


def checkpointed_trials(keys: list[str]) -> set[str]:
    """The trials with a complete checkpoint among a store's keys."""
    return {match.group(1) for key in keys if (match := re.search(r"/trials/([^/]+)/checkpoints/step-\d+/state\.json$",
                                                                   key))}


def add_node_with_own_disk(cluster: Any, monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """A worker node whose processes keep their scratch folders (jobs/storage.py) in `folder` (TMPDIR), as a machine of
    its own would on its own disk: what another node reads of its work comes from the store."""
    folder.mkdir()
    with monkeypatch.context() as patch:
        patch.setenv("TMPDIR", str(folder))
        cluster.add_worker()


def trial_host_process(cluster: Any) -> Any:
    """The process of the cluster's trial host, or None (another Ray on the machine may run one of its own)."""
    from infra.local_cluster import cluster_processes

    for process in cluster_processes(cluster.root):
        try:
            if (process.cmdline() or [""])[0].startswith("ray::TrialHostActor"):
                return process
        except psutil.Error:
            continue
    return None


@pytest.mark.cluster
def test_a_lost_node_s_trials_resume_from_their_checkpoints_on_the_store(s3_store, mlflow_server, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """On a real cluster whose storage is an object store only, each worker with its own local disk, the node of the
    trial host (where both trials co-train) is lost once they have a checkpoint: the host starts again on another
    node, each trial resumes from its newest checkpoint on the store (not from step 0), neither counts as failed
    (`max_failures: 0`), and the search's job finishes with its winner, evaluated on the node that joined."""
    from infra.local_cluster import LocalCluster, free_port_block
    from tests.test_cluster import finish, job_env, sweep_args, wait_for
    from tracking.search_runs import RESUMED_METRIC, TAG_HOST_LOSSES, TAG_STOPPED_AT, TAG_WINNER

    data = yaml.safe_load(search_sweep(tmp_path).read_text())
    data |= {"name": f"nodeloss-{tmp_path.name}"[:60], "retries": {"max_failures": 0}}
    data["search"] = {"space": {"r": [4, 8], "max_steps": [30]}, "num_samples": 2, "validation_rows": 8,
                      "eval_every": 10, "scheduler": "none", "max_concurrent_trials": 2}
    sweep = write_sweep(tmp_path, data, "nodeloss.yaml")
    with LocalCluster(free_port_block()) as cluster:
        cluster.start(workers=0)
        for node in ("worker-1", "worker-2"):
            add_node_with_own_disk(cluster, monkeypatch, tmp_path / node)
        cluster.wait_for_nodes(3)
        env = os.environ | cluster.env() | job_env(tmp_path / "home")  # the store's variables: os.environ (s3_store)
        driver = subprocess.Popen(sweep_args(sweep, mlflow_server.uri, s3_store.uri(tmp_path.name)), env=env,
                                  stdout=(tmp_path / "driver.log").open("w"), stderr=subprocess.STDOUT,
                                  cwd=PROJECT_ROOT)
        try:
            wait_for(lambda: len(checkpointed_trials(s3_store.keys(tmp_path.name))) == 2, 300,
                     "both trials' first checkpoints on the store", driver)
            host = wait_for(lambda: trial_host_process(cluster), 30, "the trial host's process", driver)
            cluster.kill_node(cluster.node_of(host.pid))
            add_node_with_own_disk(cluster, monkeypatch, tmp_path / "worker-3")  # the lost node's replacement
            output = finish(driver, tmp_path)
        finally:
            if driver.poll() is None:
                driver.kill()
    assert "progress: 1 done, 0 failed" in output and "node lost" not in output, output[-3000:]
    job, trials = search_runs(mlflow_server.uri, data["name"])
    assert job.info.status == "FINISHED" and len(trials) == 2, output[-3000:]
    for trial in trials:  # it outlived one host, resumed from a checkpoint after step 0, and ran to its end once
        assert trial.info.status == "FINISHED" and trial.data.tags[TAG_STOPPED_AT] == "30"
        assert trial.data.tags[TAG_HOST_LOSSES] == "1" and trial.data.metrics[RESUMED_METRIC] in (10, 20)
        assert [step for step, _ in validation_history(mlflow_server.uri, trial.info.run_id)] == [10, 20, 30]
    assert_on_the_store(s3_store.keys(f"{tmp_path.name}/"), job.data.tags[TAG_WINNER])


def assert_on_the_store(keys: list[str], winner: str) -> None:
    """A search's folder on the store holds a normal job's result and adapter (the winner's), each scored trial's
    adapter and checkpoints (complete: state.json), and Tune's experiment state."""
    job_dir = next(key.rsplit("/result.json", 1)[0] for key in keys if key.endswith("/result.json"))
    assert f"{job_dir}/adapter/adapter_model.safetensors" in keys, keys
    assert any(key.startswith(f"{job_dir}/tune/") for key in keys), keys
    adapters = [key for key in keys if "/trials/" in key and key.endswith("/adapter/adapter_model.safetensors")]
    scored = {key.split("/trials/")[1].split("/")[0] for key in adapters}
    assert winner in scored, (winner, scored)
    for trial in scored:
        assert any(key.startswith(f"{job_dir}/trials/{trial}/checkpoints/step-") and key.endswith("/state.json")
                   for key in keys), (trial, keys)


@pytest.mark.unit
def test_plan_shows_each_search_with_its_trials_and_cost(tmp_path: Path) -> None:
    from orchestrator.config import load_sweep
    from orchestrator.plan import plan_json

    data = demo_data(max_concurrent_trials=2)
    data["resources"] = {"device": "cuda", "gpu_memory_gb": 24.0}
    searches = plan_json(load_sweep(write_sweep(tmp_path, data)))["searches"]
    assert [(row["task"], row["trials"], row["co_trained"]) for row in searches] == [
        ("demo_sentiment", 4, 2), ("demo_colors", 4, 2)]
    row = searches[0]
    assert 0 < row["gpus"] < 1 and row["gpu_hours"] > 0 and row["cost"] == round(row["gpu_hours"] * 1.21, 2)
    assert row["searched"] == ["r", "alpha", "learning_rate", "max_steps"]
    assert plan_json(load_sweep(PROJECT_ROOT / "configs" / "sweeps" / "demo.yaml"))["searches"] == []


@pytest.mark.unit
def test_the_report_marks_searched_adapters_and_draws_every_trial(tmp_path: Path) -> None:
    import pandas as pd

    from tracking.search_report import (
        TRIAL_COLUMNS,
        SearchRecord,
        mark_searched_adapters,
        search_sections,
    )

    key = "s/tiny-llama/demo_colors/search-abc"
    trials = pd.DataFrame([{"job_key": key, "base_model": "tiny-llama", "task": "demo_colors", "trial": t,
                            "status": "FINISHED", "lora.r": r, "stopped_at": s, "stopped_early": s < 20,
                            "best_validation_score": v} for t, r, s, v in (("a", 4, 10, 0.2), ("b", 8, 20, 0.6))],
                          columns=TRIAL_COLUMNS)
    curves = pd.DataFrame([(key, "a", 10, 0.2), (key, "b", 10, 0.3), (key, "b", 20, 0.6)],
                          columns=["job_key", "trial", "step", "score"])
    record = SearchRecord(trials, curves, {key: {"run_id": "r1", "trial": "b", "lora.r": 8}})
    sections = search_sections(record, tmp_path)
    winners = sections[0][2]
    assert winners[winners["setting"] == "lora.r"][["winner", "study_default"]].values.tolist() == [[8, 8]]
    title, _, table, _, chart = sections[1]
    assert title == f"Search: {key}" and table["trial"].tolist() == ["a", "b"]
    assert chart.points == 3 and chart.path.is_file()
    board = pd.DataFrame({"finetuned_run_id": ["r1", "r2"]})
    assert mark_searched_adapters(board, record)["searched"].tolist() == [True, False]
