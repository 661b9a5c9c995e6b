"""`loraland data check` and the sweep's data preflight, against a fake Hub (no network)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.catalog import Catalog, load_catalog
from core.errors import ConfigError
from core.paths import PROJECT_ROOT
from core.ports import free_port
from orchestrator.config import SweepConfig
from orchestrator.datacheck import Check, HfHub, HubDenied, HubMissing, HubOffline, data_check, data_preflight
from orchestrator.sweep import run_sweep

pytestmark = pytest.mark.unit

CATALOG = load_catalog()
SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """The Hub as `HfHub` presents it: repositories by id with their splits; gated models and who may read them."""

    def __init__(self, splits: dict[str, dict[str, int]], models: dict[str, bool], offline: bool = False) -> None:
        self.splits, self.models, self.offline = splits, models, offline
        self.asked: list[str] = []

    def dataset_sha(self, repo_id: str, revision: str | None) -> str:
        self.asked.append(repo_id)
        if self.offline:
            raise HubOffline("Name or service not known")
        if repo_id not in self.splits:
            raise HubMissing(f"Repository Not Found for url: /api/datasets/{repo_id}")
        return SHA

    def split_sizes(self, repo_id: str, config: str | None, revision: str | None) -> dict[str, int]:
        return self.splits[repo_id]

    def model_sha(self, repo_id: str) -> str:
        self.asked.append(repo_id)
        if self.offline:
            raise HubOffline("Name or service not known")
        if not self.models[repo_id]:
            raise HubDenied(f"Access to model {repo_id} is restricted")
        return SHA


def sweep_of(tasks: list[str], models: list[str]) -> SweepConfig:
    return SweepConfig.model_validate({"name": "check", "base_models": models, "tasks": tasks})


def by_subject(checks: list[Check]) -> dict[str, Check]:
    return {check.subject: check for check in checks}


def test_preflight_names_each_missing_file_and_token_with_its_fix(tmp_path: Path) -> None:
    sweep = sweep_of(["jigsaw", "boolq", "demo_sentiment"], ["llama-2-7b", "phi-2", "tiny-llama"])
    with pytest.raises(ConfigError) as error:
        data_preflight(sweep, CATALOG, env={})
    lines = error.value.lines()
    assert len(lines) == 2, lines
    jigsaw, llama = lines
    assert "task jigsaw: missing" in jigsaw and "loraland data prepare jigsaw --from DOWNLOAD_DIR" in jigsaw
    assert "base model llama-2-7b" in llama and "HF_TOKEN" in llama and "meta-llama/Llama-2-7b-hf" in llama
    for name in ("train.csv", "test.csv"):
        (tmp_path / "data" / "kaggle" / "jigsaw").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "kaggle" / "jigsaw" / name).write_text("id,comment_text,is_toxic\n")
    data_preflight(sweep, CATALOG, env={"HF_TOKEN": "hf_x"})  # files present, token set: nothing to say


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORALAND_HOME", str(tmp_path))


def test_hub_rows_compare_split_sizes_and_pin_revisions() -> None:
    sweep = sweep_of(["boolq", "glue_mnli", "gsm8k"], ["phi-2", "gemma-2b"])
    hub = FakeHub({"google/boolq": {"train": 9427, "validation": 3270},
                   "nyu-mll/glue": {"train": 392702, "validation_matched": 9815, "validation_mismatched": 9832},
                   "openai/gsm8k": {"train": 7473, "test": 1000}},
                  {"microsoft/phi-2": True, "google/gemma-2b": False})
    rows = by_subject(data_check(sweep, hub, CATALOG, env={"HF_TOKEN": "hf_x"}))
    assert rows["task boolq"].state == "fix" and rows["task boolq"].fix.endswith(SHA)  # `main` loads, is not a pin
    assert "validation 3270 rows" in rows["task boolq"].detail
    assert "19647 rows" in rows["task glue_mnli"].detail  # matched + mismatched, as the catalogue counts them
    assert rows["task gsm8k"].detail == "test has 1000 rows, the catalogue says 1319"
    assert rows["base model phi-2"].state == "ok"
    denied = rows["base model gemma-2b"]
    assert denied.state == "fix" and "https://huggingface.co/google/gemma-2b" in denied.fix
    assert "hf_x" not in str(rows)  # the token is never shown


def test_a_pinned_source_that_loads_is_ok_and_a_missing_repo_says_so() -> None:
    pinned = CATALOG.task("boolq").model_copy(deep=True)
    pinned.dataset.revision = SHA
    catalog = Catalog(CATALOG.base_models, CATALOG.tasks | {"boolq": pinned})
    hub = FakeHub({"google/boolq": {"train": 9427, "validation": 3270}}, {"microsoft/phi-2": True})
    rows = by_subject(data_check(sweep_of(["boolq", "drop"], ["phi-2"]), hub, catalog, env={}))
    assert rows["task boolq"] == Check("task boolq", f"Hub google/boolq @ {SHA}", "ok",
                                       f"loads (validation 3270 rows) at {SHA[:12]}")
    assert rows["task drop"].state == "fix" and "Repository Not Found" in rows["task drop"].detail


def test_offline_every_hub_check_says_it_was_not_made(capsys: pytest.CaptureFixture[str]) -> None:
    hub = FakeHub({}, {}, offline=True)
    checks = data_check(sweep_of(["boolq", "demo_sentiment"], ["mistral-7b", "tiny-llama"]), hub, CATALOG,
                        env={"HF_TOKEN": "hf_x"})
    states = {(c.subject, c.state) for c in checks}
    assert states == {("task boolq", "unchecked"), ("task demo_sentiment", "ok"),
                      ("base model mistral-7b", "unchecked"), ("base model tiny-llama", "ok")}
    assert all("rerun where huggingface.co answers" == c.fix for c in checks if c.state == "unchecked")


def test_cli_offline_table_and_exit_status(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    sweeps = PROJECT_ROOT / "configs" / "sweeps"
    assert main(["data", "check", str(sweeps / "demo.yaml"), "--offline"]) == 0  # generated data, tiny models
    assert "tiny model" in capsys.readouterr().out
    assert main(["data", "check", str(sweeps / "lora_land.yaml"), "--offline", "--json"]) == 1  # files, tokens
    assert '"state": "fix"' in capsys.readouterr().out


def test_sweep_preflight_stops_before_ray_or_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # never reached: the preflight comes first
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        run_sweep(sweep_of(["boolq"], ["gemma-2b"]), tracking_uri="http://127.0.0.1:1")


def test_plan_sets_the_budget_beside_the_studys_published_cost(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli import main

    assert main(["plan", str(PROJECT_ROOT / "configs" / "sweeps" / "lora_land.yaml"), "--json"]) == 0
    budget = json.loads(capsys.readouterr().out)["study_budget"]
    # the study's 40,000 Ludwig batches of one example are 2,500 optimizer steps of 16 (configs/sweeps/lora_land.yaml)
    assert budget["examples_per_adapter"] == 40_000
    assert budget["study_cost_per_adapter"] == 8.0 and budget["study_total_cost"] == 2500.0
    assert 0 < budget["cost_per_adapter"] < budget["study_cost_per_adapter"]
    assert budget["study_gpu_hours_per_adapter_at_this_price"] == pytest.approx(8.0 / 1.21, abs=0.01)
    assert main(["plan", str(PROJECT_ROOT / "configs" / "sweeps" / "lora_land.yaml")]) == 0
    assert "the study published under $8 per adapter" in " ".join(capsys.readouterr().out.split())


def _containers(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_every_cluster_route_puts_data_on_shared_storage_and_the_token_on_every_node() -> None:
    infra = PROJECT_ROOT / "infra"
    job = yaml.safe_load((infra / "kuberay" / "rayjob.yaml").read_text())["spec"]
    service = yaml.safe_load((infra / "kuberay" / "rayservice.yaml").read_text())["spec"]
    runtime_envs = [yaml.safe_load(job["runtimeEnvYAML"]),
                    yaml.safe_load(service["serveConfigV2"])["applications"][0]["runtime_env"]]
    for env in runtime_envs:
        assert env["env_vars"]["LORALAND_HOME"].startswith("/mnt/shared/")
        assert env["env_vars"]["HF_HOME"].startswith("/mnt/shared/")
        assert "HF_TOKEN" not in env["env_vars"]  # from the secret, never in the job's record
    for spec in (job["rayClusterSpec"], service["rayClusterConfig"]):
        for container in _containers(spec):
            token = {e["name"]: e for e in container["env"]}["HF_TOKEN"]
            assert token["valueFrom"]["secretKeyRef"]["name"] == "loraland-hf-token"
            assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]
    launcher = yaml.safe_load((infra / "aws" / "cluster.yaml").read_text())
    assert ".loraland" in launcher["rsync_exclude"]  # hence the exports below
    for command in (launcher["head_start_ray_commands"][-1], launcher["worker_start_ray_commands"][-1]):
        assert "LORALAND_HOME=/mnt/shared/" in command and "HF_HOME=/mnt/shared/" in command
        assert "HF_TOKEN=$(cat ~/.cache/huggingface/token" in command
    assert launcher["file_mounts"]["/home/ubuntu/.cache/huggingface/token"] == "~/.cache/huggingface/token"


class FakeHubHandler(BaseHTTPRequestHandler):
    """The few Hub routes `HfHub` calls, as huggingface.co answers them: a dataset at a revision, a missing repository
    or revision, a public model, a gated one whose terms the token's account has not accepted."""

    datasets = {"/api/datasets/google/boolq/revision/main": SHA}
    models = {"/api/models/microsoft/phi-2": False, "/api/models/google/gemma-2b": "manual"}
    tokens: list[str] = []

    def do_GET(self) -> None:
        self.tokens.append(self.headers.get("authorization", ""))
        path = self.path.split("?")[0]
        if path in self.datasets:
            self._json(200, {"id": path.split("/")[3] + "/" + path.split("/")[4], "sha": self.datasets[path]})
        elif path in self.models:
            self._json(200, {"id": path.removeprefix("/api/models/"), "sha": SHA, "gated": self.models[path]})
        elif path == "/api/models/google/gemma-2b/auth-check":
            self._json(403, {"error": "Access restricted"}, "GatedRepo")
        elif "/revision/" in path and path.startswith("/api/datasets/tner/"):
            self._json(404, {"error": "Invalid rev id"}, "RevisionNotFound")
        else:
            self._json(404, {"error": "Repository not found"}, "RepoNotFound")

    def _json(self, status: int, body: dict[str, Any], error_code: str = "") -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_hub_url() -> Iterator[str]:
    FakeHubHandler.tokens.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub allowed to make requests (the suite runs with HF_HUB_OFFLINE=1): only to 127.0.0.1 here."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.mark.usefixtures("online")
def test_the_real_client_reads_revisions_and_gated_access_from_a_local_hub(fake_hub_url: str) -> None:
    hub = HfHub("hf_x", endpoint=fake_hub_url)
    assert hub.dataset_sha("google/boolq", "main") == SHA
    with pytest.raises(HubMissing, match="Repository Not Found"):
        hub.dataset_sha("ucinlp/drop", "main")
    with pytest.raises(HubMissing, match="Revision Not Found"):
        hub.dataset_sha("tner/bc5cdr", "refs/convert/parquet")
    assert hub.model_sha("microsoft/phi-2") == SHA
    with pytest.raises(HubDenied, match="gated"):
        hub.model_sha("google/gemma-2b")
    assert set(FakeHubHandler.tokens) == {"Bearer hf_x"}  # the workers' token, nothing cached on this machine


@pytest.mark.usefixtures("online")
def test_the_real_client_offline_says_so_once_and_stops_asking() -> None:
    hub = HfHub(None, endpoint=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(HubOffline):
        hub.dataset_sha("google/boolq", "main")
    assert hub.offline and "offline mode" not in hub.offline  # a refused connection, not the suite's offline switch
    with pytest.raises(HubOffline):
        hub.model_sha("microsoft/phi-2")
