"""Tracking against a real `mlflow server` process with a SQLite file (tests/tracking_fixtures.py).

The tiny 2 x 2 sweep (2 base models x 2 tasks, base evaluation + fine-tuning each) is run once per
session and logged as workers log it; the tests then read everything back from the server.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest

from core.errors import Unreachable
from core.ports import free_port
from tests.helpers import wait_until
from tests.tracking_fixtures import (
    BASES,
    SWEEP,
    TASKS,
    Server,
    Sweep,
    TcpProxy,
    check_concurrent_job_loggers,
    check_job_survives_restart,
    fake_adapter,
)
from tracking import retry, store

STEP_CURVES = ("loss", "learning_rate", "tokens_per_second")


# --------------------------------------------------------------------------- fast: no server


@pytest.mark.unit
def test_retry_backs_off_on_transient_errors_only(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", sleeps.append)
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 4:
            raise ConnectionError("Connection refused")
        return "ok"

    assert retry.call_with_retry(flaky, attempts=6, base_s=0.5) == "ok"
    assert calls["n"] == 4 and len(sleeps) == 3
    assert all(0.75 * d <= s <= 1.25 * d for s, d in zip(sleeps, [0.5, 1.0, 2.0]))  # exponential, jittered

    def bad() -> None:
        raise ValueError("INVALID_PARAMETER_VALUE: no such thing")

    sleeps.clear()
    with pytest.raises(ValueError):
        retry.call_with_retry(bad)
    assert sleeps == []  # a permanent error is not retried

    def always_down() -> None:
        raise RuntimeError("API request to http://x failed with exception Max retries exceeded")

    with pytest.raises(RuntimeError):
        retry.call_with_retry(always_down, attempts=3, base_s=0.1)
    assert len(sleeps) == 2  # gives up after `attempts`
    assert retry.backoff_delays(6, 0.5, 4.0) == [0.5, 1.0, 2.0, 4.0, 4.0]
    # Two workers logging the same dataset race in the server's get-or-create (seen in CI): retried.
    race = RuntimeError("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")
    assert retry.is_transient(race)
    # Many workers registering one model at once ran out of the server's own version-number retries: retried.
    assert retry.is_transient(
        RuntimeError("INTERNAL_ERROR: Model Version creation error (name=loraland-x). Giving up after 3 attempts.")
    )


@pytest.mark.unit
def test_retry_budget_alone_covers_a_server_restart_of_a_minute() -> None:
    """The worker budget documented in tracking/retry.py: even with MLflow's HTTP retries off, and every
    sleep at its shortest jitter, tracking keeps trying for over 60 s (a restart takes 7-12 s)."""
    assert retry.ATTEMPTS == 10 and retry.backoff_delays() == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0, 20.0]
    assert 60 < retry.budget_s() == pytest.approx(91.5 * 0.75)


@pytest.mark.unit
def test_unreachable_server_is_one_line_naming_the_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(Unreachable) as raised:
        store.check_reachable(uri, timeout_s=1.0)
    assert time.monotonic() - started < 6  # bounded: no minutes of retries
    message = str(raised.value)
    assert "\n" not in message and uri in message and "--tracking-uri" in message and "MLFLOW_TRACKING_URI" in message
    monkeypatch.setenv("LORALAND_TRACKING_WAIT_S", "0.5")  # the default wait comes from the environment
    with pytest.raises(Unreachable, match="waited 0s|waited 1s"):
        store.check_reachable(uri)
    sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert store.check_reachable(sqlite) == sqlite  # no server to wait for


@pytest.mark.unit
def test_tracking_uri_explicit_then_env_then_embedded_sqlite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORALAND_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = store.resolve_tracking_uri(None)
    assert default == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert not (tmp_path / "home").exists()  # resolving writes nothing...
    store.client(default)
    assert (tmp_path / "home").is_dir()  # ...a client, which may write, makes the folder (SQLite cannot)
    assert store.artifact_root(default) == (tmp_path / "home" / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert store.resolve_tracking_uri(None) == "http://127.0.0.1:1"
    assert store.artifact_root("http://127.0.0.1:1") is None  # the server keeps artifacts
    assert store.resolve_tracking_uri("https://mlflow.example:443") == "https://mlflow.example:443"


@pytest.mark.unit
def test_ui_command_serves_the_embedded_store_on_loopback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tracking.ui import ui_command

    monkeypatch.setenv("LORALAND_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    command = ui_command(port=5123)
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert command[command.index("--host") + 1] == "127.0.0.1" and command[command.index("--port") + 1] == "5123"
    assert command[command.index("--default-artifact-root") + 1] == (tmp_path / "mlartifacts").as_uri()
    with pytest.raises(ValueError, match="open it in a browser"):
        ui_command("http://127.0.0.1:5000")


@pytest.mark.unit
def test_param_values_round_trip() -> None:
    values = {
        "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"], "dropout": 0.05},
        "quant": True,
        "name": "nf4",
        "none": None,
    }
    flat = store.flatten(values)
    assert set(flat) == {"lora.r", "lora.target_modules", "lora.dropout", "quant", "name", "none"}
    assert {k: store.decode_param(store.encode_param(v)) for k, v in flat.items()} == flat


@pytest.mark.integration
def test_embedded_default_sqlite_and_loraland_ui(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No server: runs go to <data_home>/mlflow.db, artifacts to <data_home>/mlartifacts (not ./mlruns of
    the working folder); `start_ui` serves that store on 127.0.0.1."""
    from jobs.run import JobResult
    from tracking.server import stop_server
    from tracking.tracker import JobTracker
    from tracking.ui import start_ui

    monkeypatch.setenv("LORALAND_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    experiment_id = store.ensure_experiment("embedded")
    with JobTracker(experiment_id, "embedded/tiny-llama/demo_sentiment/evaluate_base", "tiny-llama", "demo_sentiment",
                    "evaluate_base", system_metrics=False) as tracker:
        tracker.finish(
            JobResult(
                tracker.job_key,
                "evaluate_base",
                "tiny-llama",
                "demo_sentiment",
                "accuracy",
                0.25,
                1,
                None,
                {"a": 1},
                predictions=[{"index": 0, "prompt": "p", "prediction": "a", "gold": "b", "score": 0.0}],
            )
        )
    assert (tmp_path / "home" / "mlflow.db").is_file()
    assert list((tmp_path / "home" / "mlartifacts").rglob("predictions.json"))
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    port = free_port()
    ui = start_ui(port=port, log_file=tmp_path / "ui.log")
    try:
        seen = store.client(f"http://127.0.0.1:{port}").get_run(tracker.run_id)
        assert seen.data.metrics["score"] == 0.25
    finally:
        stop_server(ui)
    assert ui.poll() is not None


# --------------------------------------------------------------------------- the 2 x 2 sweep


def run_of(sweep: Sweep, kind: str, base: str, task: str):
    return store.client(sweep.uri).get_run(sweep.job(kind, base, task).run_id)


@pytest.mark.integration
def test_sweep_layout_one_experiment_parent_and_child_per_job(tiny_sweep: Sweep) -> None:
    client = store.client(tiny_sweep.uri)
    assert client.get_experiment(tiny_sweep.experiment_id).name == SWEEP
    runs = store.search_all_runs(tiny_sweep.experiment_id, uri=tiny_sweep.uri)
    jobs = [r for r in runs if r.data.tags.get(store.TAG_ROLE) == "job"]
    parents = [r for r in runs if r.data.tags.get(store.TAG_ROLE) == "sweep"]
    assert len(jobs) == 8 and len(parents) == 1 and len(runs) == 9
    assert parents[0].info.run_id == tiny_sweep.parent_run_id and parents[0].data.params["tasks"] == json.dumps(
        list(TASKS)
    )
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags[store.TAG_JOB_KEY] for r in jobs} == {f"{SWEEP}/{b}/{t}/{k}" for b in BASES for t in TASKS
                                                             for k in ("train", "evaluate_base")}
    assert (
        store.find_job_run(
            tiny_sweep.experiment_id, f"{SWEEP}/tiny-llama/demo_colors/train", tiny_sweep.uri
        ).info.run_id
        == tiny_sweep.job("train", "tiny-llama", "demo_colors").run_id
    )
    # A re-submitted driver gets the same experiment and parent run back.
    assert store.ensure_experiment(SWEEP, tiny_sweep.uri) == tiny_sweep.experiment_id
    assert store.start_sweep_run(tiny_sweep.experiment_id, SWEEP, {}, tiny_sweep.uri) == tiny_sweep.parent_run_id
    store.finish_sweep_run(tiny_sweep.parent_run_id, uri=tiny_sweep.uri)


@pytest.mark.integration
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("task", TASKS)
def test_train_run_has_every_item(tiny_sweep: Sweep, base: str, task: str) -> None:
    """Tags, params, step curves, eval/base/lift, memory and time, system metrics, dataset inputs,
    predictions table and the adapter (PEFT safetensors naming its base, no base weights)."""
    job = tiny_sweep.job("train", base, task)
    run = run_of(tiny_sweep, "train", base, task)
    client = store.client(tiny_sweep.uri)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags[store.TAG_BASE_MODEL] == base and tags[store.TAG_TASK] == task and tags[store.TAG_SWEEP] == SWEEP
    assert tags[store.TAG_JOB_KEY] == job.config.job_key and tags[store.TAG_KIND] == "train"
    assert tags[store.TAG_PARENT] == tiny_sweep.parent_run_id and tags[store.TAG_CATEGORY] == "demo"
    # Every hyper-parameter, values decodable back to what the job used.
    assert {k: store.decode_param(v) for k, v in params.items() if k != "job_key"} == job.result.params
    assert params["lora.target_modules"] == "all-linear" and store.decode_param(params["training.max_steps"]) == 10
    # Step curves, one point per logged step.
    for key in STEP_CURVES:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [2, 4, 6, 8, 10], key
    # Evaluation, base score and lift.
    base_score = tiny_sweep.job("evaluate_base", base, task).result.score
    metric = job.result.metric
    assert metrics["score"] == pytest.approx(job.result.score) and metrics[metric] == pytest.approx(job.result.score)
    assert metrics["base_score"] == pytest.approx(base_score)
    assert metrics["lift"] == pytest.approx(job.result.score - base_score)
    assert metrics["peak_memory_mb"] > 0 and metrics["train_wall_time_s"] > 0 and metrics["trained_tokens"] > 0
    assert metrics["train_tokens_per_second"] > 0 and metrics["eval_examples"] == 16
    # System metrics.
    assert any(key.startswith("system/cpu_utilization") for key in metrics), sorted(metrics)
    # Datasets as inputs.
    contexts = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in run.inputs.dataset_inputs
    }
    assert set(contexts) == {"evaluation", "training"}
    assert (
        contexts["evaluation"].name == f"{task}-evaluation"
        and json.loads(contexts["evaluation"].profile)["num_rows"] == 16
    )
    # Predictions table.
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "predictions.json")).read_text())
    assert len(table["data"]) == 16 and {"prompt", "prediction", "gold", "score"} <= set(table["columns"])
    # The adapter: PEFT folder, safetensors, its base named by Hub id, nothing like base weights.
    files = {Path(a.path).name: a.file_size for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(files)
    assert not {"model.safetensors", "pytorch_model.bin", "config.json"} & set(files)
    local = Path(client.download_artifacts(run.info.run_id, "adapter/adapter_config.json"))
    assert json.loads(local.read_text())["base_model_name_or_path"] == job.config.base_model.hf_id
    assert (
        files["adapter_model.safetensors"]
        == (Path(job.result.adapter_dir) / "adapter_model.safetensors").stat().st_size
    )


@pytest.mark.integration
def test_base_evaluation_runs(tiny_sweep: Sweep) -> None:
    for base in BASES:
        for task in TASKS:
            job = tiny_sweep.job("evaluate_base", base, task)
            run = run_of(tiny_sweep, "evaluate_base", base, task)
            assert (
                run.data.metrics["score"]
                == pytest.approx(job.result.score)
                == pytest.approx(run.data.metrics["base_score"])
            )
            assert "lift" not in run.data.metrics and "adapter" not in {
                a.path for a in store.client(tiny_sweep.uri).list_artifacts(run.info.run_id)
            }
            assert job.model_version is None
            assert run.data.metrics["peak_memory_mb"] > 0  # measured by the tracker: base evaluations have it too


@pytest.mark.integration
def test_adapter_loads_back_with_the_same_greedy_tokens(tiny_sweep: Sweep, tmp_path: Path) -> None:
    """The adapter loaded from the registry gives exactly the tokens the trained model gave before it was logged."""
    from peft import PeftModel

    from jobs.evaluate import generate
    from jobs.models import load_adapter, load_base_model, load_tokenizer
    from tracking.registry import load_adapter_model, model_uri

    job = tiny_sweep.job("train", "tiny-mistral", "demo_sentiment")
    spec = job.config.base_model
    tokenizer = load_tokenizer(spec)
    prompts = [p["prompt"] for p in job.result.predictions]
    max_new = job.config.task.max_new_tokens
    logged = load_adapter_model(
        model_uri("demo_sentiment", job.model_version), device="cpu", uri=tiny_sweep.uri, dst=tmp_path / "a"
    )
    assert isinstance(logged, PeftModel)
    again = generate(logged, tokenizer, prompts, max_new, job.config.evaluation.batch_size)
    # What the in-memory model generated at evaluation
    assert again == [p["prediction"] for p in job.result.predictions]
    local = load_adapter(load_base_model(spec, job.config.quantization, "cpu"), job.result.adapter_dir)
    assert generate(local, tokenizer, prompts, max_new, 4) == generate(logged, tokenizer, prompts, max_new, 4)
    # The generated token ids themselves (not only their decoded text) are the same.
    before, after = (greedy_token_ids(model, tokenizer, prompts, max_new) for model in (local, logged))
    assert before == after and all(before)
    # The same through a run id reference, with the default download folder reused when given again.
    assert isinstance(load_adapter_model(job.run_id, device="cpu", uri=tiny_sweep.uri, dst=tmp_path / "a"), PeftModel)


def greedy_token_ids(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The token ids `model` generates greedily after each prompt (one prompt at a time: no padding)."""
    import torch

    from jobs.encoding import encode_prompt

    model.eval()
    generated = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([encode_prompt(tokenizer, prompt)])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            generated.append(out[0, ids.shape[1]:].tolist())
    return generated


# --------------------------------------------------------------------------- registry


def finish_train_job(uri: str, experiment_id: str, job_key: str, task: str, score: float, folder: Path):
    """A train job with a (fake) adapter, logged, registered and its champion updated by JobTracker.finish."""
    from jobs.run import JobResult
    from tracking.tracker import JobTracker

    tracker = JobTracker(experiment_id, job_key, "tiny-llama", task, uri=uri, system_metrics=False)
    with tracker:
        tracker.finish(
            JobResult(
                job_key, "train", "tiny-llama", task, "accuracy", score, 1, fake_adapter(folder), {"score": score}
            ),
            base_score=0.0,
        )
    return tracker


@pytest.mark.integration
def test_champion_moves_by_itself_as_better_jobs_finish(mlflow_server: Server, tmp_path: Path) -> None:
    from tracking import registry

    uri, task = mlflow_server.uri, "champion_moves"  # a registered model of its own
    experiment_id = store.ensure_experiment("champion-moves", uri)
    worse = finish_train_job(uri, experiment_id, "champion-moves/a", task, 0.4, tmp_path / "a")
    assert registry.champion(task, uri).version == worse.model_version
    better = finish_train_job(uri, experiment_id, "champion-moves/b", task, 0.8, tmp_path / "b")
    assert better.model_version != worse.model_version
    assert registry.champion(task, uri).version == better.model_version  # moved, nobody called update_champion
    middle = finish_train_job(uri, experiment_id, "champion-moves/c", task, 0.6, tmp_path / "c")
    assert registry.champion(task, uri).version == better.model_version  # a worse newcomer does not take it
    assert [v.version for v in registry.versions(task, uri)] == [
        worse.model_version,
        better.model_version,
        middle.model_version,
    ]


@pytest.mark.integration
def test_champion_of_each_task_is_its_best_version(tiny_sweep: Sweep) -> None:
    from tracking import registry

    for task in TASKS:
        versions = registry.versions(task, tiny_sweep.uri)
        assert len(versions) == len(BASES)
        by_run = {v.run_id: v for v in versions}
        scores = {}
        for base in BASES:
            job = tiny_sweep.job("train", base, task)
            version = by_run[job.run_id]
            assert version.version == job.model_version
            assert version.tags[store.TAG_BASE_MODEL] == base and float(
                version.tags[registry.TAG_SCORE]
            ) == pytest.approx(job.result.score)
            assert version.source == f"runs:/{job.run_id}/adapter"
            scores[int(version.version)] = job.result.score
        best = max(sorted(scores), key=lambda v: scores[v])  # ties: the earliest version
        assert registry.champion(task, tiny_sweep.uri).version == str(best)
        assert registry.update_champion(task, tiny_sweep.uri) == str(best)  # stable when nothing changed
        # register_adapter is idempotent per run (a retry never makes a second version)
        job = tiny_sweep.job("train", BASES[0], task)
        assert (
            registry.register_adapter(job.run_id, task, BASES[0], job.result.score, uri=tiny_sweep.uri)
            == job.model_version
        )


@pytest.mark.integration
def test_promote_pins_the_champion_until_a_better_version_arrives(tiny_sweep: Sweep) -> None:
    from tracking import registry

    uri, task = tiny_sweep.uri, "promote_demo"  # a registered model of its own: other tests keep theirs
    runs = [tiny_sweep.job("train", base, t).run_id for base in BASES for t in TASKS]
    v1 = registry.register_adapter(runs[0], task, "tiny-llama", 0.9, uri=uri)
    v2 = registry.register_adapter(runs[1], task, "tiny-llama", 0.5, uri=uri)
    assert registry.update_champion(task, uri) == v1
    registry.promote(task, v2, uri)  # a person prefers v2
    assert registry.champion(task, uri).version == v2
    assert registry.update_champion(task, uri) == v2  # automatic moves do not undo it...
    v3 = registry.register_adapter(runs[2], task, "tiny-mistral", 0.4, uri=uri)
    assert registry.update_champion(task, uri) == v2  # ...nor does a worse newcomer
    v4 = registry.register_adapter(runs[3], task, "tiny-mistral", 0.7, uri=uri)
    assert registry.update_champion(task, uri) == v4  # a newcomer better than the promoted one takes over
    assert registry.unpin(task, uri) == v1  # back to the best of all
    assert v3 not in (registry.champion(task, uri).version,)
    with pytest.raises(KeyError, match="no version 99"):
        registry.promote(task, 99, uri)


# --------------------------------------------------------------------------- failures and concurrency


@pytest.mark.integration
def test_a_job_the_sweep_gave_up_on_ends_failed_with_why_and_a_run_its_job_ended_keeps_its_own(
        mlflow_server: Server, tmp_path: Path) -> None:
    """After its units ran, the driver ends FAILED the runs of the jobs it gave up on that nothing ended (a crashed
    evaluator left a trained fine-tune's run RUNNING), tagged with its reason; a run that its job ended FAILED itself
    keeps its own error, and the run of a job that did not fail is left alone."""
    from orchestrator.sweep import SweepRun, close_given_up
    from orchestrator.units import JobOutcome
    from tests.helpers import tiny_job
    from tracking.tracker import JobTracker

    uri = mlflow_server.uri
    experiment_id = store.ensure_experiment("given-up", uri)
    runs = {}
    for name in ("crashed", "failed_itself", "running"):
        tracker = JobTracker(experiment_id, f"given-up/{name}", "tiny-llama", "demo_sentiment", uri=uri,
                             system_metrics=False, flush_interval_s=600)
        runs[name] = tracker.start()
        if name == "failed_itself":
            tracker.fail("ValueError: its own error")
        else:
            tracker._stop_background()  # its worker or evaluator died: nothing ends its run
    outcomes = {
        "given-up/crashed": JobOutcome(tiny_job(tmp_path), "failed", error="its evaluator died 2 times"),
        "given-up/failed_itself": JobOutcome(tiny_job(tmp_path), "failed", error="ValueError: its own error"),
        "given-up/running": JobOutcome(tiny_job(tmp_path), "finished", 1.0),
    }
    assert close_given_up(outcomes, SweepRun(experiment_id, "", uri)) == [runs["crashed"]]
    got = {name: store.client(uri).get_run(run_id) for name, run_id in runs.items()}
    assert got["crashed"].info.status == "FAILED"
    assert got["crashed"].data.tags[store.TAG_ERROR] == "the sweep gave up on it: its evaluator died 2 times"
    assert got["failed_itself"].data.tags[store.TAG_ERROR] == "ValueError: its own error"
    assert got["running"].info.status == "RUNNING"
    assert close_given_up({}, SweepRun(experiment_id, "", uri)) == []


@pytest.mark.integration
def test_killed_worker_run_is_closed_and_a_retry_reuses_its_run(mlflow_server: Server) -> None:
    from jobs.run import JobResult
    from tracking.tracker import JobTracker

    uri = mlflow_server.uri
    experiment_id = store.ensure_experiment("stale-runs", uri)
    key = "stale-runs/tiny-llama/demo_sentiment/train"
    killed = JobTracker(
        experiment_id, key, "tiny-llama", "demo_sentiment", uri=uri, system_metrics=False, flush_interval_s=600
    )
    run_id = killed.start()
    killed.on_step(1, {"loss": 2.0})
    killed._stop_background()  # the worker dies here: nothing ends its run
    assert store.close_stale_runs(experiment_id, [key], uri=uri) == [run_id]
    closed = store.client(uri).get_run(run_id)
    assert closed.info.status == "FAILED" and "worker lost" in closed.data.tags[store.TAG_ERROR]
    assert store.close_stale_runs(experiment_id, uri=uri) == []
    retried = JobTracker(
        experiment_id, key, "tiny-llama", "demo_sentiment", uri=uri, system_metrics=False, register=False
    )
    with retried:
        assert retried.run_id == run_id  # the same run, not a duplicate
        retried.finish(JobResult(key, "train", "tiny-llama", "demo_sentiment", "accuracy", 0.5, 1, None, {"a": 1},
                                 history=[{"step": 1.0, "loss": 2.0}, {"step": 2.0, "loss": 1.0}]))
    assert [r.info.run_id for r in store.job_runs(experiment_id, uri)] == [run_id]
    assert store.client(uri).get_run(run_id).info.status == "FINISHED"
    history = store.client(uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2]  # history fills the gap
    # An exception inside the tracker's block ends the run FAILED with the error.
    failing = JobTracker(
        experiment_id, "stale-runs/x/y/train", "tiny-llama", "demo_sentiment", uri=uri, system_metrics=False
    )
    with pytest.raises(RuntimeError):
        with failing:
            raise RuntimeError("out of memory at the floor")
    failed = store.client(uri).get_run(failing.run_id)
    assert failed.info.status == "FAILED" and "out of memory" in failed.data.tags[store.TAG_ERROR]


@pytest.mark.integration
def test_32_processes_logging_at_once_lose_nothing(mlflow_server: Server) -> None:
    # Also run on PostgreSQL: tests/test_tracking_postgres.py
    check_concurrent_job_loggers(mlflow_server.uri, workers=32)


@pytest.mark.integration
def test_writes_survive_the_server_being_unreachable(mlflow_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server vanishes for 3 s mid-job (connections refused and cut) while steps are logged and the job finishes."""
    from jobs.run import JobResult
    from tracking.tracker import JobTracker

    # Let connection errors reach tracking's own retries at once (MLflow's HTTP layer would otherwise
    # retry them for minutes itself, hiding what this test checks).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    proxy = TcpProxy(mlflow_server.port)
    proxy.start()
    try:
        experiment_id = store.ensure_experiment("outage", proxy.uri)
        tracker = JobTracker(experiment_id, "outage/tiny-llama/demo_sentiment/train", "tiny-llama", "demo_sentiment",
                             uri=proxy.uri, system_metrics=False, register=False, flush_interval_s=0.3)
        run_id = tracker.start()
        for step in range(1, 6):
            tracker.on_step(step, {"loss": 1.0 / step})
        wait_until(lambda: len(store.client(mlflow_server.uri).get_metric_history(run_id, "loss")) == 5, 60,
                   "the background flusher to send steps 1-5")
        proxy.stop()
        for step in range(6, 11):  # training goes on while the server is away: on_step only buffers
            tracker.on_step(step, {"loss": 1.0 / step})
        threading.Timer(3.0, proxy.start).start()
        result = JobResult(
            tracker.job_key,
            "train",
            "tiny-llama",
            "demo_sentiment",
            "accuracy",
            0.75,
            4,
            None,
            {"lr": 0.01},
            summary={"peak_memory_mb": 123.0},
            predictions=[{"index": 0, "prompt": "p", "prediction": "a", "gold": "a", "score": 1.0}],
        )
        tracker.finish(result, base_score=0.25)  # starts while the server is unreachable
    finally:
        proxy.stop()
    client = store.client(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 11))
    assert run.data.metrics["lift"] == pytest.approx(0.5) and run.data.metrics["peak_memory_mb"] == 123.0
    assert run.data.params["lr"] == "0.01" and "predictions.json" in {a.path for a in client.list_artifacts(run_id)}
    assert not math.isnan(run.data.metrics["score"])


@pytest.mark.integration
def test_a_job_survives_a_real_server_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real `mlflow server` is stopped mid-job and started again on the same port, SQLite file and artifact folder
    (`check_job_survives_restart`; the same on PostgreSQL: tests/test_tracking_postgres.py)."""
    from tracking.server import server_command, start_server, stop_server

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = server_command(
        f"sqlite:///{tmp_path / 'mlflow.db'}", "127.0.0.1", port, artifacts_destination=tmp_path / "artifacts"
    )
    servers = [start_server(command, uri, log_file=tmp_path / "server.log")]  # this test's own: the session's stays up
    try:
        check_job_survives_restart(
            uri,
            lambda: stop_server(servers.pop()),
            lambda: servers.append(start_server(command, uri, log_file=tmp_path / "server.log")),
            tmp_path,
        )
    finally:
        for server in servers:
            stop_server(server)


@pytest.mark.integration
def test_peak_memory_of_a_job_is_its_own(mlflow_server: Server) -> None:
    """A reused worker process: a job's peak memory is not the earlier peak of the process (a big
    buffer, freed before the job), and a base evaluation logs its peak memory too."""
    import numpy as np

    from jobs.peak_memory import peak_memory_mb
    from jobs.run import JobResult
    from tracking.tracker import JobTracker

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("resetting the peak needs Linux /proc")
    buffer = np.ones(768 * 2**20 // 8)  # 768 MiB, every page touched
    earlier = peak_memory_mb("cpu")
    del buffer
    uri = mlflow_server.uri
    experiment_id = store.ensure_experiment("peak-memory", uri)
    with JobTracker(
        experiment_id,
        "peak-memory/tiny-llama/demo_sentiment/evaluate_base",
        "tiny-llama",
        "demo_sentiment",
        "evaluate_base",
        uri=uri,
        system_metrics=False,
    ) as tracker:
        tracker.finish(
            JobResult(tracker.job_key, "evaluate_base", "tiny-llama", "demo_sentiment", "accuracy", 0.5, 1, None, {})
        )
    reported = store.client(uri).get_run(tracker.run_id).data.metrics["peak_memory_mb"]
    assert 0 < reported < earlier - 500, (reported, earlier)


# --------------------------------------------------------------------------- the command line


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """`loraland ARGV`: exit status and the lines it wrote to stderr."""
    from orchestrator.cli import main

    capsys.readouterr()  # drop what earlier steps of the test wrote (MLflow's own log lines)
    code = main(argv)
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.integration
def test_cli_report_and_promote_name_the_mistake_in_one_line(mlflow_server: Server, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    uri = mlflow_server.uri
    code, err = cli(["report", "--experiment", "nope", "--tracking-uri", uri], capsys)
    assert code == 2 and len(err) == 1 and "no MLflow experiment named 'nope'" in err[0], err
    code, err = cli(["promote", "no_such_task", "1", "--tracking-uri", uri], capsys)
    assert code == 2 and len(err) == 1 and "unknown task 'no_such_task'" in err[0], err
    code, err = cli(["promote", "demo_arithmetic", "99", "--tracking-uri", uri], capsys)
    assert code == 2 and len(err) == 1 and "no version 99" in err[0], err
    monkeypatch.setenv("LORALAND_TRACKING_WAIT_S", "1")  # the CLI's wait for a server, short for the test
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for argv in (
        ["report", "--experiment", "nope", "--tracking-uri", down],
        ["promote", "demo_arithmetic", "1", "--tracking-uri", down],
    ):
        started = time.monotonic()
        code, err = cli(argv, capsys)
        assert code == 2 and len(err) == 1 and f"no MLflow tracking server answers at {down}" in err[0], (argv, err)
        assert time.monotonic() - started < 10, argv


@pytest.mark.integration
def test_cli_promote_moves_the_champion(
    mlflow_server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tracking import registry

    uri, task = mlflow_server.uri, "demo_arithmetic"  # a catalogue task no other test registers
    experiment_id = store.ensure_experiment("cli-promote", uri)
    best = finish_train_job(uri, experiment_id, "cli-promote/a", task, 0.7, tmp_path / "a")
    other = finish_train_job(uri, experiment_id, "cli-promote/b", task, 0.2, tmp_path / "b")
    assert registry.champion(task, uri).version == best.model_version
    code, err = cli(["promote", task, str(other.model_version), "--tracking-uri", uri], capsys)
    assert code == 0 and err == []
    assert registry.champion(task, uri).version == other.model_version
