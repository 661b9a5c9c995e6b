"""The driver on a real multi-node Ray cluster on loopback (`infra/local_cluster.py`): `ray job submit`, a lost node, a
node joining mid-sweep, the retry rules; and (unit) the order, the local cluster's command line and the infra YAML."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from core.paths import PROJECT_ROOT
from infra.local_cluster import LocalCluster, free_port_block, ray_bin
from tests.helpers import wait_until

MINI = PROJECT_ROOT / "tests" / "fixtures" / "mini_sweep.yaml"
EXCLUDES = [".venv", ".loraland", ".git", ".pytest_cache", "benchmarks/results"]


# --------------------------------------------------------------------------- helpers


def sweep_file(tmp_path: Path, name: str, **sections: dict[str, Any]) -> Path:
    """The mini sweep under another name (its own MLflow experiment and job keys), sections updated."""
    data = yaml.safe_load(MINI.read_text())
    data["name"] = name
    for section, values in sections.items():
        data[section] = data.get(section, {}) | values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def job_runs(uri: str, experiment: str) -> list:
    from tracking import store

    return store.job_runs(store.experiment_id_for(experiment, uri), uri)


def assert_one_finished_run_per_job(uri: str, experiment: str, jobs: int = 4) -> list:
    runs = job_runs(uri, experiment)
    assert len(runs) == jobs and {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status)
                                                                                for r in runs]
    assert len({r.data.tags["loraland.job_key"] for r in runs}) == jobs
    return runs


def job_env(home: Path) -> dict[str, str]:
    return {"LORALAND_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def sweep_args(sweep: Path, uri: str, storage: Path) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "sweep", str(sweep), "--tracking-uri", uri,
            "--storage-path", str(storage)]


def submit(cluster: LocalCluster, sweep: Path, uri: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir .` of the sweep, the job running this venv's Python."""
    runtime_env = {"excludes": EXCLUDES, "env_vars": job_env(tmp_path / "home")}
    command = [ray_bin(), "job", "submit", f"--address={cluster.dashboard_url}", f"--working-dir={PROJECT_ROOT}",
               f"--runtime-env-json={json.dumps(runtime_env)}", "--", *sweep_args(sweep, uri, tmp_path / "storage")]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=os.environ | cluster.env(),
                          cwd=PROJECT_ROOT)


def start_driver(cluster: LocalCluster, sweep: Path, uri: str, tmp_path: Path) -> subprocess.Popen:
    """The driver as a client of the cluster (`RAY_ADDRESS`), output to a file."""
    log = (tmp_path / "driver.log").open("w")
    env = os.environ | cluster.env() | job_env(tmp_path / "home")
    return subprocess.Popen(sweep_args(sweep, uri, tmp_path / "storage"), stdout=log, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=PROJECT_ROOT)


def finish(driver: subprocess.Popen, tmp_path: Path, timeout_s: float = 600) -> str:
    try:
        driver.wait(timeout=timeout_s)
    finally:
        if driver.poll() is None:
            driver.kill()
    output = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, output[-4000:]
    return output


def task_process(job_key_prefix: str) -> psutil.Process | None:
    """The Ray worker running a job: the driver names each task by its job key, which becomes the process title."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith(f"ray::{job_key_prefix}"):
            return process
    return None


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, driver: subprocess.Popen | None = None) -> Any:
    """Poll `condition` until it returns something truthy (returned); fail at once if `driver` ends before that."""
    def ready() -> Any:
        if value := condition():
            return value
        assert driver is None or driver.poll() is None, f"the driver ended before {what}"
        return None

    return wait_until(ready, timeout_s, what, poll_s=0.2)


def checkpoint_steps(storage: Path, task: str) -> list[int]:
    steps = storage.glob(f"tiny-llama/{task}/train-*/checkpoints/step-*")
    return sorted(int(p.name.split("-")[1]) for p in steps if (p / "state.json").is_file())


def storage_files(storage: Path) -> dict[str, int]:
    """Every file under the sweep's storage path and its modification time (ns): checkpoints, adapters, results."""
    return {str(path.relative_to(storage)): path.stat().st_mtime_ns for path in storage.rglob("*") if path.is_file()}


def nodes_used(output: str) -> set[str]:
    """The nodes the driver's log says units ended on: jobs that finished, and fine-tunes that trained (their
    evaluation then runs on their base model's evaluator, wherever that actor lives)."""
    return set(re.findall(r"^\s+(?:finished|trained) .* on node ([0-9a-f]{8})$", output, flags=re.MULTILINE))


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """Head plus `request.param` (default 2) one-CPU worker nodes on loopback; stopped whatever happens."""
    local = LocalCluster(free_port_block())
    try:
        local.start(workers=getattr(request, "param", 2))
        yield local
    finally:
        local.stop()
        assert not local.root.exists()


# --------------------------------------------------------------------------- on a real cluster


@pytest.mark.cluster
def test_submitted_sweep_runs_each_job_once_and_a_resubmission_runs_none(cluster: LocalCluster, mlflow_server: Any,
                                                                          tmp_path: Path) -> None:
    from mlflow import MlflowClient

    sweep = sweep_file(tmp_path, "mini-submit")
    first = submit(cluster, sweep, mlflow_server.uri, tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    assert "0 already finished, 4 to run" in first.stdout and "progress: 4 done, 0 failed" in first.stdout
    runs = assert_one_finished_run_per_job(mlflow_server.uri, "mini-submit")
    for run in runs:
        assert "score" in run.data.metrics
        if run.data.tags["loraland.kind"] == "train":
            assert {"lift", "steps", "train_loss"} <= set(run.data.metrics)
            assert "adapter" in {a.path for a in MlflowClient(mlflow_server.uri).list_artifacts(run.info.run_id)}
    workers = {cluster.node_id(name)[:8] for name in cluster.workers}
    # jobs ran on worker nodes, none on the head
    assert nodes_used(first.stdout) and nodes_used(first.stdout) <= workers
    assert cluster.non_loopback_sockets() == []

    stored = storage_files(tmp_path / "storage")
    assert stored, "the first run stored nothing"
    second = submit(cluster, sweep, mlflow_server.uri, tmp_path)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
    assert "4 already finished, 0 to run" in second.stdout
    # no new run
    assert sorted(r.info.run_id for r in job_runs(mlflow_server.uri, "mini-submit")) == sorted(r.info.run_id
                                                                                             for r in runs)
    assert nodes_used(second.stdout) == set()  # no job ran anywhere...
    assert storage_files(tmp_path / "storage") == stored  # ...so no step was trained, no checkpoint or adapter written


@pytest.mark.cluster
def test_a_lost_node_costs_at_most_a_checkpoint_interval_and_no_retry(cluster: LocalCluster, mlflow_server: Any,
                                                                      tmp_path: Path) -> None:
    """max_failures 0: the interrupted job still finishes, so losing its node did not use the retry budget."""
    every = 10
    # the job must be far from done when its raylet dies: a worker can finish its task after that (kill_raylet)
    steps = 100
    sweep = sweep_file(tmp_path, "mini-nodeloss",
                       training={"max_steps": steps, "checkpoint_every": every, "log_every": every},
                       retries={"max_failures": 0})
    storage = tmp_path / "storage"
    driver = start_driver(cluster, sweep, mlflow_server.uri, tmp_path)
    try:
        def checkpoints(count: int) -> None:
            wait_for(lambda: (checkpoint_steps(storage, "demo_arithmetic") or [0])[-1] >= count * every or None, 300,
                     f"{count} checkpoints of the demo_arithmetic fine-tune", driver)

        checkpoints(1)
        assert cluster.non_loopback_sockets() == []  # mid-sweep: workers, driver and MLflow traffic included
        checkpoints(2)
        worker = task_process("mini-nodeloss/tiny-llama/demo_arithmetic/train")
        assert worker is not None, "the demo_arithmetic fine-tune is not running"
        cluster.kill_raylet(cluster.node_of(worker.pid))
        # with its node: a worker left to itself can train on for seconds before it notices its raylet is gone
        worker.kill()
        psutil.wait_procs([worker], timeout=60)
        # the newest checkpoint once the job's process is gone
        at_loss = checkpoint_steps(storage, "demo_arithmetic")[-1]
        output = finish(driver, tmp_path)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert "node lost train         tiny-llama x demo_arithmetic: resubmitted" in output, output[-3000:]
    assert not re.search(r"^\s+retry \d", output, flags=re.MULTILINE) and "progress: 4 done, 0 failed" in output
    runs = {(r.data.tags["loraland.kind"], r.data.tags["loraland.task"]): r
            for r in assert_one_finished_run_per_job(mlflow_server.uri, "mini-nodeloss")}
    interrupted = runs[("train", "demo_arithmetic")].data.metrics
    untouched = runs[("train", "demo_similarity")].data.metrics
    assert interrupted["steps"] == steps and untouched["steps"] == steps
    # the retry started from the newest checkpoint on the storage path: at most `every` steps were done twice
    assert interrupted["resumed_from_step"] == at_loss >= 2 * every
    assert untouched["resumed_from_step"] == 0


@pytest.mark.cluster
@pytest.mark.parametrize("cluster", [1], indirect=True)
def test_a_node_added_mid_sweep_gets_jobs(cluster: LocalCluster, mlflow_server: Any, tmp_path: Path) -> None:
    sweep = sweep_file(tmp_path, "mini-grow")
    driver = start_driver(cluster, sweep, mlflow_server.uri, tmp_path)
    try:
        wait_for(lambda: task_process("mini-grow/"), 300, "the first job to start", driver)
        cluster.add_worker()
        cluster.wait_for_nodes(3)
        output = finish(driver, tmp_path)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert cluster.node_id("worker-2")[:8] in nodes_used(output), output[-3000:]
    assert_one_finished_run_per_job(mlflow_server.uri, "mini-grow")


def machine_loss_scenario(scratch: str) -> None:
    """Run by a fresh `python -c` against the cluster in RAY_ADDRESS (see the test below): four 5-second stand-in jobs
    through the driver's loop with `max_failures: 0`. Prints one JSON line of their states."""
    from orchestrator.cluster import connect_ray
    from orchestrator.config import RetrySettings, expand_jobs, load_sweep
    from orchestrator.resources import job_demand, job_task
    from orchestrator.scheduler import SchedulerSettings, run_units
    from orchestrator.units import SingleJob

    sweep = load_sweep(MINI)
    template = expand_jobs(sweep)[0]
    jobs = [template.model_copy(update={"job_key": f"machine-loss/{name}"}) for name in "abcd"]
    connect_ray()
    task = job_task(flaky, sweep)
    units = [SingleJob(job, task, (f"{scratch}/{job.job_key[-1]}", 0, 5.0), job_demand(job, sweep)) for job in jobs]
    outcomes = run_units(units, SchedulerSettings(RetrySettings(max_failures=0), len(jobs)))
    print(json.dumps([outcomes[job.job_key].state for job in jobs]))


@pytest.mark.cluster
def test_a_whole_machine_lost_counts_as_a_node_loss_not_a_failure(cluster: LocalCluster, tmp_path: Path) -> None:
    """Raylet, workers and agents SIGKILLed at once, as when a machine dies: with `max_failures: 0` every job still
    finishes, so Ray reported the loss as the node's (NodeDiedError), not as a crashed worker."""
    code = f"from tests.test_cluster import machine_loss_scenario; machine_loss_scenario({str(tmp_path)!r})"
    log = (tmp_path / "driver.log").open("w")
    # run from the project root: Ray puts the driver's directory on its workers' path, so they import `flaky`
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, text=True,
                              env=os.environ | cluster.env(), cwd=PROJECT_ROOT)
    try:
        # `flaky` appends to `starts` as it begins: from then on the job runs on its node for 5 s
        wait_for((tmp_path / "starts").is_file, 120, "a stand-in job to start", driver)
        worker = wait_for(lambda: task_process("machine-loss/"), 30, "the stand-in's worker process", driver)
        cluster.kill_node(cluster.node_of(worker.pid))
        driver.wait(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
    output = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, output[-3000:]
    assert "node lost" in output and "retry" not in output, output[-3000:]
    assert json.loads(output.strip().splitlines()[-1]) == ["finished"] * 4


# --------------------------------------------------------------------------- the embedded one-node Ray


def flaky(marker: str, failures: int, seconds: float = 0.3) -> dict[str, Any]:
    """Sleeps `seconds`, then raises the first `failures` times it runs (attempts counted in the file `marker`); each
    attempt appends "<marker name> <attempt>" to the file `starts` beside it."""
    path = Path(marker)
    attempt = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempt))
    with open(path.parent / "starts", "a") as starts:
        starts.write(f"{path.name} {attempt}\n")
    time.sleep(seconds)
    if attempt <= failures:
        raise RuntimeError(f"attempt {attempt} failed")
    return {"score": float(attempt)}


def embedded_ray_scenario(scratch: str) -> None:
    """Run by a fresh `python -c` (see the test below): ray imported first, as any library may do, then the driver's
    embedded Ray; six jobs through the driver's loop, two at a time (queue_ahead 0): `a` fails once, `b` always, `c`-`f`
    never. Prints one JSON line."""
    import psutil
    import ray

    from infra.local_cluster import is_loopback
    from orchestrator.cluster import connect_ray
    from orchestrator.config import RetrySettings, expand_jobs, load_sweep
    from orchestrator.resources import job_demand, job_task
    from orchestrator.scheduler import SchedulerSettings, run_units
    from orchestrator.units import SingleJob

    sweep = load_sweep(MINI)
    template = expand_jobs(sweep)[0]
    jobs = [template.model_copy(update={"job_key": f"{template.job_key}-{name}"}) for name in "abcdef"]
    fails = dict(zip((job.job_key for job in jobs), [1, 5, 0, 0, 0, 0]))
    connect_ray()
    sweep.resources.cpus_per_job = ray.cluster_resources()["CPU"] / 2  # two jobs fit, whatever the machine's cores
    ray_processes = psutil.Process().children(recursive=True)
    off_loopback = [str(c.laddr) for p in ray_processes for c in p.net_connections(kind="inet")
                    if not all(is_loopback(a.ip) for a in (c.laddr, c.raddr) if a)]
    task = job_task(flaky, sweep)
    units = [SingleJob(job, task, (f"{scratch}/{job.job_key[-1]}", fails[job.job_key]), job_demand(job, sweep))
             for job in jobs]
    outcomes = run_units(units, SchedulerSettings(RetrySettings(max_failures=2), len(jobs), queue_ahead=0))
    states = [[outcomes[job.job_key].state, outcomes[job.job_key].score, outcomes[job.job_key].error] for job in jobs]
    print(json.dumps({"node_ip": ray.util.get_node_ip_address(), "off_loopback": off_loopback,
                      "ray_processes": len(ray_processes), "outcomes": states}))
    ray.shutdown()


@pytest.mark.cluster
def test_the_embedded_ray_stays_on_loopback_and_retries_a_failing_job_first_up_to_max_failures(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)  # Ray's workers import `flaky` from this module
    code = f"from tests.test_cluster import embedded_ray_scenario; embedded_ray_scenario({str(tmp_path)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["node_ip"] == "127.0.0.1" and report["ray_processes"] > 0 and report["off_loopback"] == []
    (recovered, recovered_score, _), (failed, _, error), *others = report["outcomes"]
    assert (recovered, recovered_score) == ("finished", 2.0)
    assert failed == "failed" and error == "RuntimeError: attempt 3 failed"
    assert others == [["finished", 1.0, ""]] * 4
    assert (tmp_path / "b").read_text() == "3"  # the first attempt + max_failures retries, no more
    assert "retry 2/2" in done.stdout
    # a retry goes before jobs that never started: `a`'s second attempt starts before `c`, the first job queued behind
    # it
    starts = (tmp_path / "starts").read_text().split("\n")
    assert starts[:2] in (["a 1", "b 1"], ["b 1", "a 1"]) and starts.index("a 2") < starts.index("c 1"), starts


# --------------------------------------------------------------------------- unit


@pytest.mark.unit
def test_submission_order_puts_base_evaluations_first_then_longest_fine_tunes() -> None:
    from orchestrator.config import expand_jobs, load_sweep
    from orchestrator.plan import plan_job
    from orchestrator.sweep import submission_order

    sweep = load_sweep(PROJECT_ROOT / "configs" / "sweeps" / "lora_land.yaml")
    ordered = submission_order(expand_jobs(sweep), sweep)
    kinds = [job.kind for job in ordered]
    assert kinds == sorted(kinds, key=lambda kind: kind != "evaluate_base")
    hours = [plan_job(job, sweep.resources).hours for job in ordered if job.kind == "train"]
    assert hours == sorted(hours, reverse=True) and hours[0] > 10 * hours[-1]


@pytest.mark.unit
def test_local_cluster_rejects_bad_input_with_one_line() -> None:
    script = PROJECT_ROOT / "infra" / "local_cluster.py"
    bad = subprocess.run([sys.executable, str(script), "start", "--port", "80"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "--port must be between" in bad.stderr
    idle = subprocess.run([sys.executable, str(script), "stop", "--port", str(free_port_block())], capture_output=True,
                          text=True, timeout=60)
    assert idle.returncode == 0 and "stopped 0 processes" in idle.stdout


# --------------------------------------------------------------------------- infra/ (unit)

INFRA = PROJECT_ROOT / "infra"
IMAGE_PROJECT = "/home/ray/loraland"  # where infra/Dockerfile puts the project


def infra_yaml() -> dict[str, Any]:
    """Every YAML file under infra/, parsed (a syntax error fails every test below)."""
    return {path.relative_to(INFRA).as_posix(): yaml.safe_load(path.read_text())
            for path in sorted(INFRA.rglob("*.y*ml"))}


def flags(command: list[str]) -> dict[str, str]:
    """`--flag value` and `--flag=value` pairs of a command line (a bare flag maps to "")."""
    found: dict[str, str] = {}
    for index, word in enumerate(command):
        if word.startswith("--"):
            name, _, value = word.partition("=")
            following = command[index + 1] if index + 1 < len(command) else "--"
            found[name] = value or ("" if following.startswith("--") else following)
    return found


def click_options(command: Any) -> set[str]:
    return {option for param in command.params for option in param.opts}


@pytest.mark.unit
def test_infra_holds_a_rayjob_a_cluster_launcher_and_an_mlflow_server() -> None:
    assert {"kuberay/rayjob.yaml", "aws/cluster.yaml", "mlflow/docker-compose.yaml"} <= set(infra_yaml())


@pytest.mark.unit
def test_the_rayjob_runs_the_sweep_on_autoscaled_gpu_workers_with_shared_storage() -> None:
    import shlex

    import ray

    from orchestrator.cli import build_parser
    from orchestrator.config import load_sweep

    job = infra_yaml()["kuberay/rayjob.yaml"]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    entrypoint = shlex.split(spec["entrypoint"])
    assert entrypoint[:2] == ["loraland", "sweep"]
    args = build_parser().parse_args(entrypoint[1:])  # the real command line accepts it
    load_sweep(PROJECT_ROOT / Path(args.sweep).relative_to(IMAGE_PROJECT))  # a valid sweep of this repository
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert cluster["rayVersion"] == ray.__version__ and cluster["enableInTreeAutoscaling"] is True
    gpu_groups = [group for group in cluster["workerGroupSpecs"]
                  if all(c["resources"]["limits"].get("nvidia.com/gpu", 0) >= 1
                         for c in group["template"]["spec"]["containers"])]
    assert gpu_groups and all(group["minReplicas"] < group["maxReplicas"] for group in gpu_groups)
    assert all(json.loads(json.loads(group["rayStartParams"]["resources"])) == {"worker": 1} for group in gpu_groups)
    for pod in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:  # every node sees the storage path
        mounts = [m["mountPath"] for c in pod["template"]["spec"]["containers"] for m in c["volumeMounts"]]
        assert any(args.storage_path.startswith(mount + "/") for mount in mounts), pod
        assert all(c["image"] == cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
                   for c in pod["template"]["spec"]["containers"])


@pytest.mark.unit
def test_the_cluster_launcher_scales_g5_workers_that_install_the_project() -> None:
    import shlex

    from ray.scripts.scripts import start

    config = infra_yaml()["aws/cluster.yaml"]
    assert config["provider"]["type"] == "aws" and config["head_node_type"] in config["available_node_types"]
    gpu = [t for t in config["available_node_types"].values() if t["node_config"]["InstanceType"].startswith("g5.")]
    assert gpu and all(t["min_workers"] < t["max_workers"] <= config["max_workers"] and t["resources"]["GPU"] >= 1
                       for t in gpu)
    assert any("make setup" in command for command in config["setup_commands"])
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    starts = [shlex.split(c.split(";")[-1]) for c in commands if " start " in c]
    assert len(starts) == 2 and all(set(flags(command)) <= click_options(start) for command in starts)


@pytest.mark.unit
def test_the_mlflow_server_keeps_runs_in_postgres_and_artifacts_in_the_object_store() -> None:
    from mlflow.cli import server

    services = infra_yaml()["mlflow/docker-compose.yaml"]["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    command = services["mlflow"]["command"]
    options = flags(command)
    assert command[:2] == ["mlflow", "server"] and set(options) <= click_options(server)
    backend = options["--backend-store-uri"]
    assert backend.startswith("postgresql://") and "@postgres:5432/" in backend
    assert options["--artifacts-destination"].startswith("s3://") and "--serve-artifacts" in options
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


@pytest.mark.integration  # one service: an S3 server
@pytest.mark.parametrize("storage, message", [
    ("nosuchscheme://bucket/sweeps", "use a folder path or a URI such as s3://"),
    ("s3://no-such-bucket/sweeps", "cannot write there"),
])
def test_a_storage_path_that_cannot_be_written_is_refused_with_one_line(s3_store: Any, tmp_path: Path, storage: str,
                                                                         message: str) -> None:
    command = [*sweep_args(MINI, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path), "--storage-path", storage]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT,
                          env=os.environ | s3_store.env)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow (or Ray) is touched
