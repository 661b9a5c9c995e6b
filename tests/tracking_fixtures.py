"""Fixtures for the tracking and report tests, loaded as a plugin (`pytest_plugins = ["tests.tracking_fixtures"]`)
so that the session-scoped MLflow server and the tiny 2 x 2 sweep are made once per session however
many test files use them.

- `mlflow_server`: a real `mlflow server` process on a free 127.0.0.1 port, SQLite file + artifact
  folder in a temporary directory; stopped (its whole process group) at the end of the session.
- `tiny_sweep`: a real 2 x 2 sweep (tiny-llama, tiny-mistral x demo_sentiment, demo_colors): for each
  pair an evaluate_base job then a train job, each run by `jobs.run.run_job` and logged with
  `tracking.tracker.JobTracker` exactly as a worker does.

Only light imports at module level: worker processes of the concurrency test import this module.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SWEEP = "tiny-2x2"
BASES = ("tiny-llama", "tiny-mistral")
TASKS = ("demo_sentiment", "demo_colors")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    uri: str
    port: int
    root: Path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `mlflow server` for the whole session (it takes 8-12 s to start)."""
    from tracking.ui import server_command, start_server, stop_server

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = server_command(f"sqlite:///{root / 'mlflow.db'}", "127.0.0.1", port, workers=2,
                             artifacts_destination=root / "artifacts")
    process = start_server(command, f"http://127.0.0.1:{port}", log_file=root / "server.log")
    try:
        yield Server(f"http://127.0.0.1:{port}", port, root)
    finally:
        stop_server(process)


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
    from jobs.catalog import load_catalog
    from jobs.config import EvalSettings, JobConfig, LoraSettings, TrainingSettings

    catalog = load_catalog()
    return JobConfig(
        kind=kind, job_key=f"{SWEEP}/{base}/{task}/{kind}", base_model=catalog.base_model(base), task=catalog.task(task),
        lora=LoraSettings(target_modules="all-linear"),
        training=TrainingSettings(max_steps=10, micro_batch_size=8, gradient_accumulation_steps=1, learning_rate=1e-2,
                                  checkpoint_every=1000, gradient_checkpointing=False, log_every=2, max_seq_length=128),
        evaluation=EvalSettings(limit=16, batch_size=16), output_dir=str(output_dir / base / task / kind), device="cpu",
    )


@pytest.fixture(scope="session")
def tiny_sweep(mlflow_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """The 2 x 2 sweep, tracked: base evaluation first, then fine-tuning (so the lift is known)."""
    from jobs.run import run_job
    from tracking import store
    from tracking.tracker import JobTracker

    uri = mlflow_server.uri
    experiment_id = store.ensure_experiment(SWEEP, uri)
    parent = store.start_sweep_run(experiment_id, SWEEP, {"base_models": list(BASES), "tasks": list(TASKS),
                                                          "training": {"max_steps": 10, "learning_rate": 0.01}}, uri)
    sweep = Sweep(uri, SWEEP, experiment_id, parent)
    out = tmp_path_factory.mktemp("jobs")
    for base in BASES:
        for task in TASKS:
            for kind in ("evaluate_base", "train"):
                config = tiny_config(out, base, task, kind)
                tracker = JobTracker.for_job(config, experiment_id, parent, uri=uri, system_metrics_interval_s=1.0,
                                             flush_interval_s=1.0)
                with tracker:
                    result = run_job(config, on_step=tracker.on_step)
                    tracker.finish(result)
                sweep.jobs[(kind, base, task)] = TrackedJob(config, result, tracker.run_id, tracker.model_version)
    store.finish_sweep_run(parent, uri=uri)
    return sweep


def fake_adapter(folder: Path, base_hf_id: str = "loraland/tiny-llama", size: int = 64 * 1024) -> str:
    """A folder shaped like a PEFT adapter (config naming its base, a safetensors file of `size` bytes) for
    tests that log and register adapters without training one; never loaded as a model."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base_hf_id, "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * (size // 256))
    return str(folder)


# --------------------------------------------------------------------------- concurrency worker


def log_one_job(uri: str, experiment_id: str, parent_run_id: str, index: int, start_at: float, results: Any,
                register_task: str | None = None) -> None:
    """One of the 32 concurrent workers: wait for the common start time, then log a small job; with
    `register_task`, a job of that task whose (fake) adapter is logged and registered."""
    import os
    import tempfile

    from jobs.run import JobResult
    from tracking.tracker import JobTracker

    task = register_task or "demo_sentiment"
    adapter_dir = fake_adapter(Path(tempfile.mkdtemp()) / "adapter") if register_task else None
    time.sleep(max(0.0, start_at - time.time()))
    tracker = JobTracker(experiment_id, f"concurrency/w{index:02d}", "tiny-llama", task, "train", parent_run_id=parent_run_id,
                         uri=uri, system_metrics=False, register=register_task is not None, flush_interval_s=0.2)
    with tracker:
        for step in (1, 2, 3):
            tracker.on_step(step, {"loss": 1.0 / step, "learning_rate": 0.01, "tokens_per_second": 100.0 + index})
        result = JobResult(job_key=tracker.job_key, kind="train", base_model="tiny-llama", task=task,
                           metric="accuracy", score=index / 32, examples=2, adapter_dir=adapter_dir,
                           params={"worker": index, "training.learning_rate": 0.01},
                           summary={"peak_memory_mb": 10.0 + index, "train_wall_time_s": 1.0},
                           predictions=[{"index": i, "prompt": f"p{i}", "prediction": "x", "gold": "x", "score": 1.0} for i in range(2)])
        tracker.finish(result, base_score=0.0)
    results.put((index, tracker.run_id, os.getpid(), tracker.model_version))


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
