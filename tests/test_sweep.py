"""Orchestrator: the Ray driver runs a sweep exactly once per job, also across a re-run and a killed driver (the mini
sweep evaluates through its base model's evaluator, `evaluation.engine`'s default: orchestrator/evaluator.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from core.paths import PROJECT_ROOT

pytestmark = pytest.mark.cluster
MINI = PROJECT_ROOT / "tests" / "fixtures" / "mini_sweep.yaml"


def sweep_command(uri: str, storage: Path | str, sweep: Path = MINI) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "sweep", str(sweep), "--tracking-uri", uri,
            "--storage-path", str(storage)]


def job_runs(uri: str) -> list:
    from tracking import store

    experiment_id = store.experiment_id_for("mini", uri)
    return store.job_runs(experiment_id, uri)


def sweep_env(home: Path) -> dict[str, str]:
    return os.environ | {"LORALAND_HOME": str(home), "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def kill_process_tree(pid: int, timeout_s: float = 60) -> None:
    """SIGKILL a process and all its descendants (the driver's local Ray: GCS, raylet, workers), found from its PID
    before any is killed, and wait until they are gone: a crash of that driver, touching no other process."""
    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    assert alive == [], alive


def trained_before(uri: str, storage: Path) -> tuple[str, Path]:
    """The mini sweep's demo_arithmetic fine-tune trained as a driver's task trains it, then left there: its run
    RUNNING, as a driver killed between its training and its evaluation leaves it. Its run id and adapter weights."""
    from jobs.checkpoints import ADAPTER_DIR
    from orchestrator.config import expand_jobs, load_sweep
    from orchestrator.workers import train_tracked_job
    from tracking import store

    sweep = load_sweep(MINI).model_copy(update={"storage_path": str(storage)})
    experiment_id = store.ensure_experiment(sweep.name, uri)
    parent = store.start_sweep_run(experiment_id, sweep.name, sweep.model_dump(mode="json"), uri)
    job = next(j for j in expand_jobs(sweep) if j.kind == "train" and j.task.name == "demo_arithmetic")
    train_tracked_job(job, experiment_id, parent, uri)
    run = store.find_job_run(experiment_id, job.job_key, uri)
    assert run is not None and run.info.status == "RUNNING" and "score" not in run.data.metrics
    return run.info.run_id, Path(job.output_dir) / ADAPTER_DIR / "adapter_model.safetensors"


def test_sweep_runs_every_job_once_and_a_rerun_runs_none(mlflow_server, tmp_path: Path) -> None:
    """Also: a fine-tune trained before the driver (killed before its evaluation) is evaluated, not trained again, and
    finishes its own run."""
    uri = f"{mlflow_server.uri}"
    run_id, weights = trained_before(uri, tmp_path / "storage")
    written = weights.stat().st_mtime_ns
    first = subprocess.run(sweep_command(uri, tmp_path / "storage"), capture_output=True, text=True, timeout=600,
                           env=sweep_env(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "0 already finished, 4 to run" in first.stdout and "progress: 4 done, 0 failed" in first.stdout
    # the trained fine-tune went straight to its evaluation, which the evaluator recorded in its run
    assert "trained  train         tiny-llama x demo_arithmetic" in first.stdout, first.stdout[-3000:]
    assert "finished evaluate      tiny-llama x demo_arithmetic" in first.stdout, first.stdout[-3000:]
    assert weights.stat().st_mtime_ns == written
    runs = job_runs(uri)
    assert run_id in {r.info.run_id for r in runs}
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["loraland.job_key"] for r in runs}) == 4
    from mlflow import MlflowClient

    for run in runs:
        assert "score" in run.data.metrics
        if run.data.tags["loraland.kind"] == "train":
            assert "lift" in run.data.metrics
            assert "adapter" in {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)}
    # The experiment and the parent run say what they are (MLflow's note): the sweep, its file, counts, results.
    from tracking import store

    experiment_id = store.experiment_id_for("mini", uri)
    note = MlflowClient(uri).get_experiment(experiment_id).tags[store.NOTE_TAG]
    assert "`mini`" in note and str(MINI) in note and "4 jobs (2 fine-tunes, 2 base evaluations)" in note, note
    assert "0 already finished, 4 to run" in note and "4 of 4 jobs done (0 in an earlier run), 0 failed" in note, note
    assert ("Best lift per task: demo_arithmetic" in note and "Mean fine-tuned score" in note
            and "http" not in note), note
    assert store.find_sweep_run(experiment_id, "mini", uri).data.tags[store.NOTE_TAG] == note
    second = subprocess.run(sweep_command(uri, tmp_path / "storage"), capture_output=True, text=True, timeout=600,
                            env=sweep_env(tmp_path))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "4 already finished, 0 to run" in second.stdout
    assert sorted(r.info.run_id for r in job_runs(uri)) == sorted(r.info.run_id for r in runs)


def test_killed_driver_then_rerun_completes_without_duplicates(s3_store, tmp_path: Path) -> None:
    """With the storage path on an object store (S3 on loopback): what the jobs keep there survives the driver. The
    fine-tunes run 200 steps, so they are still training while a second driver is turned away and the first is
    killed."""
    import yaml

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = s3_store.uri(tmp_path.name)
    data = yaml.safe_load(MINI.read_text())
    data["training"] |= {"max_steps": 200, "checkpoint_every": 20}
    sweep = tmp_path / "mini.yaml"
    sweep.write_text(yaml.safe_dump(data))
    driver = subprocess.Popen(sweep_command(uri, storage, sweep), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=sweep_env(tmp_path) | s3_store.env, start_new_session=True)
    deadline = time.monotonic() + 300
    seen = ""
    while time.monotonic() < deadline:  # kill it once the first job has finished and others are under way
        line = driver.stdout.readline()
        seen += line
        if line.strip().startswith("finished") or not line:
            break
    assert "finished" in seen, seen[-3000:]
    # a second driver while the first is alive (a second `ray job submit`) stops at once: no run closed, none made
    second = subprocess.run(sweep_command(uri, storage, sweep), capture_output=True, text=True, timeout=300,
                            env=sweep_env(tmp_path) | s3_store.env)
    lines = second.stderr.strip().splitlines()
    assert (second.returncode == 2 and len(lines) == 1
            and "sweep mini is being run by another driver" in lines[0]), second.stderr[-3000:]
    live = job_runs(uri)  # the first driver's runs: none closed by the second, none made twice
    assert ({r.info.status for r in live} <= {"RUNNING", "FINISHED"}
            and len({r.data.tags["loraland.job_key"] for r in live}) == len(live))
    assert driver.poll() is None
    kill_process_tree(driver.pid)  # the driver's local Ray goes with it
    driver.wait()
    again = subprocess.run(sweep_command(uri, storage, sweep), capture_output=True, text=True, timeout=600,
                           env=sweep_env(tmp_path) | s3_store.env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    runs = job_runs(uri)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["loraland.job_key"] for r in runs}) == 4
    keys = s3_store.keys(tmp_path.name + "/")
    assert (len([k for k in keys if k.endswith("/result.json")]) == 4
            and len([k for k in keys if k.endswith("/adapter/adapter_model.safetensors")]) == 2)
