"""Foundation: layout and import direction, catalogue, configs, tiny models, CLI."""

from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.catalog import load_catalog
from jobs.config import ConfigError, PROJECT_ROOT
from jobs.demo_data import GENERATORS, demo_rows
from jobs.memory import estimate_memory_gb
from orchestrator.cli import main as cli
from orchestrator.config import expand_jobs, load_sweep

REFERENCE = PROJECT_ROOT / "tracking" / "reference"
PACKAGES = ("jobs", "orchestrator", "serving", "tracking")


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level modules each file of `package` imports."""
    found = {}
    for path in (PROJECT_ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(PROJECT_ROOT))] = names
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("jobs", {"orchestrator", "serving", "tracking", "mlflow"}),
    ("serving", {"orchestrator", "mlflow"}),
    ("orchestrator", {"mlflow"}),
])
def test_import_direction(package: str, forbidden: set[str]) -> None:
    """jobs/ never imports orchestrator/ or serving/; serving/ never orchestrator/; only tracking/ imports mlflow."""
    offenders = {f: sorted(names & forbidden) for f, names in imported_packages(package).items() if names & forbidden}
    assert offenders == {}


def test_catalog_json_is_the_study() -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "catalog", "--json"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    with open(REFERENCE / "lora_land_base_models.csv") as f:
        models = {row["name"]: row["hf_id"] for row in csv.DictReader(f)}
    with open(REFERENCE / "lora_land_tasks.csv") as f:
        tasks = {row["task"]: row["metric"] for row in csv.DictReader(f)}
    assert {m["name"]: m["hf_id"] for m in data["base_models"]} == models
    assert {t["name"]: t["metric"] for t in data["tasks"]} == tasks
    assert all(t["category"] for t in data["tasks"])


def test_shipped_yaml_all_validate(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted((PROJECT_ROOT / "configs").rglob("*.yaml"))
    assert len(files) >= 7
    for path in files:
        assert cli(["validate", str(path)]) == 0, capsys.readouterr().err


def test_lora_land_plan_has_310_jobs_in_a10g_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["plan", str(PROJECT_ROOT / "configs/sweeps/lora_land.yaml"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    pairs = {(j["base_model"], j["task"]) for j in plan["jobs"]}
    assert len(plan["jobs"]) == 310 == len(pairs) == plan["totals"]["jobs"]
    assert plan["totals"]["gpu_hours"] > 0 and plan["totals"]["cost"] > 0
    seven_b = [j for j in plan["jobs"] if j["base_model"] in ("llama-2-7b", "mistral-7b")]
    # The study trained these on 24 GB A10Gs: a 4-bit 7B with rank-8 LoRA needs a few GB, well under 24.
    assert all(4.0 <= j["gpu_memory_gb"] <= 24.0 and 0 < j["gpus"] <= 1 for j in seven_b)


def test_memory_estimate_grows_with_what_it_should() -> None:
    catalog = load_catalog()
    sweep = load_sweep(PROJECT_ROOT / "configs/sweeps/lora_land.yaml")
    small, large = catalog.base_model("phi-2"), catalog.base_model("gemma-7b")
    base = estimate_memory_gb(small, sweep.lora, sweep.quantization, sweep.training)
    assert estimate_memory_gb(large, sweep.lora, sweep.quantization, sweep.training) > base
    longer = sweep.training.model_copy(update={"max_seq_length": 4096})
    assert estimate_memory_gb(small, sweep.lora, sweep.quantization, longer) > base
    bf16 = sweep.quantization.model_copy(update={"load_in_4bit": False})
    assert estimate_memory_gb(small, sweep.lora, bf16, sweep.training) > base + 3


def test_bad_sweep_exit_2_one_line_per_problem() -> None:
    bad = PROJECT_ROOT / "tests/fixtures/bad_sweep.yaml"
    for command in ("plan", "validate"):
        out = subprocess.run([sys.executable, "-m", "orchestrator.cli", command, str(bad)], capture_output=True, text=True)
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 3, out.stderr
        assert any("lora.r" in line for line in lines)
        assert any("trainng" in line and "unknown key" in line for line in lines)
        assert any("not_a_task" in line for line in lines)
        assert "Traceback" not in out.stderr


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: x\nbase_models: [tiny-llama]\ntasks: [demo_colors]\ntraining: {learning_rate: -1, micro_batch_size: 0}\n")
    with pytest.raises(ConfigError) as error:
        load_sweep(sweep)
    assert sorted(p.split(":")[0] for p in error.value.problems) == ["training.learning_rate", "training.micro_batch_size"]
    sweep.write_text("name: x\nbase_models: [tiny-llama\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(sweep)


def test_demo_sweep_expands_to_keyed_jobs() -> None:
    sweep = load_sweep(PROJECT_ROOT / "configs/sweeps/demo.yaml")
    jobs = expand_jobs(sweep)
    assert len(jobs) == 2 * len(sweep.base_models) * len(sweep.tasks)
    assert len({j.job_key for j in jobs}) == len(jobs)
    assert expand_jobs(sweep)[0].job_key == jobs[0].job_key  # stable
    changed = sweep.model_copy(update={"lora": sweep.lora.model_copy(update={"r": 16})})
    assert expand_jobs(changed)[0].job_key != jobs[0].job_key


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-gemma", "tiny-phi"])
def test_tiny_models_are_real_architectures(name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.tiny import tiny_model_dir

    spec = load_catalog().base_model(name)
    path = tiny_model_dir(spec)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__.lower().startswith(spec.family)
    assert model.config.num_hidden_layers == spec.architecture.num_layers
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = "Review: the movie was great\nSentiment: positive"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    out = model(torch.tensor([tokenizer(text)["input_ids"]]))
    assert out.logits.shape[-1] == spec.architecture.vocab_size


@pytest.mark.parametrize("generator", sorted(GENERATORS))
def test_demo_data_has_declared_columns_and_is_deterministic(generator: str) -> None:
    task = next(t for t in load_catalog().tasks.values() if t.dataset.kind == "demo" and t.dataset.id == generator)
    rows = demo_rows(generator, "train")
    assert rows == demo_rows(generator, "train") and rows != demo_rows(generator, "test")
    assert all(set(task.columns) <= set(row) for row in rows)
