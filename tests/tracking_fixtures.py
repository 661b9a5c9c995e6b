"""Helpers of the tracking, report and serving tests; their fixtures (`mlflow_server`, `tiny_sweep`) are in
tests/conftest.py and return the classes below.

- `Server`: a real `mlflow server` process (SQLite file + artifact folder in a temporary directory).
- `Sweep`: a real 2 x 2 sweep (tiny-llama, tiny-mistral x demo_sentiment, demo_colors) tracked on it: for each pair an
  evaluate_base job then a train job (`tiny_config`), each run by `jobs.run.run_job` and logged with
  `tracking.tracker.JobTracker` exactly as a worker does.
- `log_one_job`, `fake_adapter`, `TcpProxy`: a concurrency worker, an adapter-shaped folder, an outage on demand.

Only light imports at module level: worker processes of the concurrency test import this module.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.ports import free_port

SWEEP = "tiny-2x2"
BASES = ("tiny-llama", "tiny-mistral")
TASKS = ("demo_sentiment", "demo_colors")


@dataclass
class Server:
    uri: str
    port: int
    root: Path


@dataclass
class TrackedJob:
    config: Any  # jobs.config.JobConfig
    result: Any  # jobs.run.JobResult
    run_id: str
    model_version: str | None


@dataclass
class Sweep:
    uri: str
    name: str
    experiment_id: str
    parent_run_id: str
    jobs: dict[tuple[str, str, str], TrackedJob] = field(default_factory=dict)  # (kind, base, task) -> job

    def job(self, kind: str, base: str, task: str) -> TrackedJob:
        return self.jobs[(kind, base, task)]


def tiny_config(output_dir: Path, base: str, task: str, kind: str) -> Any:
    """A tiny job that trains in seconds on 2 CPU cores (LoRA on all linear layers, 10 steps)."""
    from core.catalog import load_catalog
    from core.schemas import EvalSettings, LoraSettings, TrainingSettings
    from jobs.config import JobConfig

    catalog = load_catalog()
    return JobConfig(
        kind=kind,
        job_key=f"{SWEEP}/{base}/{task}/{kind}",
        base_model=catalog.base_model(base),
        task=catalog.task(task),
        lora=LoraSettings(target_modules="all-linear"),
        training=TrainingSettings(
            max_steps=10,
            micro_batch_size=8,
            gradient_accumulation_steps=1,
            learning_rate=1e-2,
            checkpoint_every=1000,
            gradient_checkpointing=False,
            log_every=2,
            max_seq_length=128,
        ),
        evaluation=EvalSettings(limit=16, batch_size=16),
        output_dir=str(output_dir / base / task / kind),
        device="cpu",
    )


def fake_adapter(folder: Path, base_hf_id: str = "loraland/tiny-llama", size: int = 64 * 1024) -> str:
    """A folder shaped like a PEFT adapter (config naming its base, a safetensors file of `size` bytes) for
    tests that log and register adapters without training one; never loaded as a model."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": base_hf_id, "r": 8})
    )
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * (size // 256))
    return str(folder)


# --------------------------------------------------------------------------- concurrency worker


def log_one_job(uri: str, experiment_id: str, parent_run_id: str, index: int, start: Any, results: Any,
                register_task: str | None = None) -> None:
    """One of the 32 concurrent workers: wait at the barrier `start` (a multiprocessing Barrier of all the workers)
    until every worker is ready, then log a small job; with `register_task`, a job of that task whose (fake) adapter
    is logged and registered."""
    import os
    import tempfile

    from jobs.run import JobResult
    from tracking.tracker import JobTracker

    task = register_task or "demo_sentiment"
    adapter_dir = fake_adapter(Path(tempfile.mkdtemp()) / "adapter") if register_task else None
    start.wait(timeout=240)
    tracker = JobTracker(
        experiment_id,
        f"concurrency/w{index:02d}",
        "tiny-llama",
        task,
        "train",
        parent_run_id=parent_run_id,
        uri=uri,
        system_metrics=False,
        register=register_task is not None,
        flush_interval_s=0.2,
    )
    with tracker:
        for step in (1, 2, 3):
            tracker.on_step(step, {"loss": 1.0 / step, "learning_rate": 0.01, "tokens_per_second": 100.0 + index})
        result = JobResult(
            job_key=tracker.job_key,
            kind="train",
            base_model="tiny-llama",
            task=task,
            metric="accuracy",
            score=index / 32,
            examples=2,
            adapter_dir=adapter_dir,
            params={"worker": index, "training.learning_rate": 0.01},
            summary={"peak_memory_mb": 10.0 + index, "train_wall_time_s": 1.0},
            predictions=[
                {"index": i, "prompt": f"p{i}", "prediction": "x", "gold": "x", "score": 1.0} for i in range(2)
            ],
        )
        tracker.finish(result, base_score=0.0)
    results.put((index, tracker.run_id, os.getpid(), tracker.model_version))


REGISTERED_BY_LOGGERS = "concurrency_adapters"  # the task whose model the concurrent loggers register (no other test's)


def check_concurrent_job_loggers(uri: str, workers: int = 32) -> None:
    """`workers` processes each log a small job at once into one experiment (created first, as the driver does), every
    other one also logging its (fake) adapter and registering it as a version of one task's model, racing for the
    champion alias. Asserts: no run lost, none misplaced (in Default or another experiment), every value where it
    belongs, one version per registering run as each worker was told, and the best-scoring version champion."""
    import multiprocessing

    import pytest

    from tracking import registry, store

    experiment_id = store.ensure_experiment("concurrency", uri)  # created by the driver, passed to workers
    parent = store.start_sweep_run(experiment_id, "concurrency", {"workers": workers}, uri)
    # forkserver: separate processes forked from one that imported MLflow once (importing it 32 times takes ~100
    # CPU-seconds on a 2-core machine); each opens its own connections.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tracking.tracker", "tracking.registry", "jobs.train", "tests.tracking_fixtures"])
    results = context.Queue()
    start = context.Barrier(workers)  # every worker logs at once, once all are up
    registering = {i: REGISTERED_BY_LOGGERS if i % 2 == 0 else None for i in range(workers)}
    processes = [
        context.Process(target=log_one_job, args=(uri, experiment_id, parent, i, start, results, registering[i]))
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    reported = [results.get(timeout=240) for _ in processes]
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0] * workers
    assert len({pid for _, _, pid, _ in reported}) == workers  # distinct processes
    runs = store.job_runs(experiment_id, uri)
    assert len(runs) == workers and {r.info.run_id for r in runs} == {run_id for _, run_id, _, _ in reported}
    assert {r.data.tags[store.TAG_JOB_KEY] for r in runs} == {f"concurrency/w{i:02d}" for i in range(workers)}
    for run in runs:
        index = int(run.data.tags[store.TAG_JOB_KEY][-2:])
        assert run.info.status == "FINISHED" and run.data.tags[store.TAG_PARENT] == parent
        assert run.data.params["worker"] == str(index) and run.data.metrics["score"] == pytest.approx(index / 32)
        assert (
            run.data.metrics["tokens_per_second"] == 100.0 + index
            and run.data.metrics["peak_memory_mb"] == 10.0 + index
        )
    client = store.client(uri)
    assert list(client.search_runs(["0"])) == []  # nothing in Default
    elsewhere = [r for e in client.search_experiments() if e.experiment_id != experiment_id
                 for r in client.search_runs([e.experiment_id], "tags.`loraland.job_key` LIKE 'concurrency/%'")]
    assert elsewhere == []  # none in the wrong experiment
    # Registering at once: one version per registering run, none lost or doubled, and the champion is the best.
    versions = registry.versions(REGISTERED_BY_LOGGERS, uri)
    by_run = {index: (run_id, version) for index, run_id, _, version in reported if registering[index]}
    assert sorted(v.run_id for v in versions) == sorted(run_id for run_id, _ in by_run.values())
    assert sorted(int(v.version) for v in versions) == list(range(1, len(by_run) + 1))
    assert {v.run_id: v.version for v in versions} == dict(by_run.values())  # what each worker was told
    assert all(version is None for index, _, _, version in reported if not registering[index])
    assert all({a.path for a in client.list_artifacts(run_id, "adapter")} for run_id, _ in by_run.values())
    assert registry.champion(REGISTERED_BY_LOGGERS, uri).version == by_run[max(by_run)][1]  # the highest score
    store.finish_sweep_run(parent, uri=uri)


def check_job_survives_restart(uri: str, stop: Callable[[], None], start: Callable[[], None], folder: Path) -> None:
    """A job logs steps through the tracking server at `uri`; `stop()` takes the server down mid-job and `start()` (on
    another thread, once the job's finish has begun; it returns once the server answers) brings it back on the same
    URI and stores, while the job finishes, uploads its adapter and registers it. Asserts nothing was dropped and the
    restart fit in tracking's retry budget. Call it with MLFLOW_HTTP_REQUEST_MAX_RETRIES=0, so that tracking's own
    retries alone cover the restart; `folder` is scratch space."""
    import threading
    import time

    from jobs.run import JobResult
    from tests.helpers import wait_until
    from tracking import registry, retry, store
    from tracking.tracker import JobTracker

    back_at: list[float] = []
    finishing = threading.Event()

    def restart() -> None:
        finishing.wait(120)  # the server comes back only once the job's finish has started
        start()
        back_at.append(time.monotonic())

    restarter = threading.Thread(target=restart)
    task, key = "restart_demo", "restart/tiny-llama/restart_demo/train"
    try:
        experiment_id = store.ensure_experiment("restart", uri)
        tracker = JobTracker(
            experiment_id, key, "tiny-llama", task, uri=uri, system_metrics=False, flush_interval_s=0.3
        )
        run_id = tracker.start()
        for step in range(1, 6):
            tracker.on_step(step, {"loss": 1.0 / step, "learning_rate": 0.01})
        wait_until(
            lambda: len(store.client(uri).get_metric_history(run_id, "loss")) == 5,
            60,
            "the background flusher to send steps 1-5",
        )
        stop()
        down_at = time.monotonic()
        for step in range(6, 11):  # training goes on while the server is down: on_step only buffers
            tracker.on_step(step, {"loss": 1.0 / step, "learning_rate": 0.01})
        restarter.start()
        adapter = fake_adapter(folder / "adapter", size=1 << 20)
        result = JobResult(key, "train", "tiny-llama", task, "accuracy", 0.75, 4, adapter, {"lr": 0.01, "lora.r": 8},
                           summary={"peak_memory_mb": 123.0, "train_wall_time_s": 9.0},
                           predictions=[{"index": 0, "prompt": "p", "prediction": "a", "gold": "a", "score": 1.0}])
        finish_at = time.monotonic()
        finishing.set()
        tracker.finish(result, base_score=0.25)  # starts while the server is down
    finally:
        finishing.set()
        if restarter.is_alive():
            restarter.join(120)
    assert back_at and finish_at < back_at[0]  # finish really ran into the restart
    assert back_at[0] - down_at < retry.budget_s()
    # Read back what the restarted server stored.
    client = store.client(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for curve in ("loss", "learning_rate"):
        assert sorted(m.step for m in client.get_metric_history(run_id, curve)) == list(range(1, 11)), curve
    assert {k: run.data.params[k] for k in ("job_key", "lr", "lora.r")} == {"job_key": key, "lr": "0.01", "lora.r": "8"}
    metrics = run.data.metrics
    assert metrics["score"] == metrics["accuracy"] == 0.75 and metrics["base_score"] == 0.25 and metrics["lift"] == 0.5
    assert metrics["peak_memory_mb"] == 123.0 and metrics["train_wall_time_s"] == 9.0 and metrics["eval_examples"] == 4
    assert metrics["job_wall_time_s"] > 0
    assert "predictions.json" in {a.path for a in client.list_artifacts(run_id)}
    logged = {Path(a.path).name: a.file_size for a in client.list_artifacts(run_id, "adapter")}
    assert logged == {name.name: name.stat().st_size for name in Path(adapter).iterdir()}
    downloaded = Path(client.download_artifacts(run_id, "adapter/adapter_model.safetensors", str(folder / "back")))
    assert downloaded.read_bytes() == (Path(adapter) / "adapter_model.safetensors").read_bytes()
    (version,) = registry.versions(task, uri)
    assert (
        version.run_id == run_id
        and version.version == tracker.model_version
        and version.source == f"runs:/{run_id}/adapter"
    )
    assert registry.champion(task, uri).version == version.version


# --------------------------------------------------------------------------- an outage on demand


class TcpProxy:
    """Forwards 127.0.0.1:port to a target port; `stop()` makes the target unreachable (connections
    refused, open ones cut), `start()` makes it reachable again on the same port."""

    def __init__(self, target_port: int, port: int | None = None):
        self.target = ("127.0.0.1", target_port)
        self.port = port or free_port()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        self._running.set()
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for sock in self._open:
                _close(sock)
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._running.is_set():
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
