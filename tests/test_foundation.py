"""Foundation: layout and import direction, catalogue, configs, tiny models, CLI."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.catalog import load_catalog
from core.errors import ConfigError
from core.paths import PROJECT_ROOT
from core.schemas import StrictModel
from jobs.demo_data import GENERATORS, demo_rows
from jobs.memory import estimate_memory_gb
from orchestrator.cli import main as cli
from orchestrator.config import expand_jobs, load_sweep

pytestmark = pytest.mark.unit

REFERENCE = PROJECT_ROOT / "tracking" / "reference"
PACKAGES = ("jobs", "orchestrator", "serving", "tracking")


def test_catalog_json_is_the_study() -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "catalog", "--json"], capture_output=True,
                         text=True, check=True)
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
        out = subprocess.run([sys.executable, "-m", "orchestrator.cli", command, str(bad)], capture_output=True,
                             text=True)
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 3, out.stderr
        assert any("lora.r" in line for line in lines)
        assert any("trainng" in line and "unknown key" in line for line in lines)
        assert any("not_a_task" in line for line in lines)
        assert "Traceback" not in out.stderr


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: x\nbase_models: [tiny-llama]\ntasks: [demo_colors]\n"
                     "training: {learning_rate: -1, micro_batch_size: 0}\n")
    with pytest.raises(ConfigError) as error:
        load_sweep(sweep)
    assert sorted(p.split(":")[0] for p in error.value.problems) == ["training.learning_rate",
                                                                     "training.micro_batch_size"]
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


# --------------------------------------------------------------------------- config checks the audit asked for


def cli_errors(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    """Run `loraland ARGV` in-process; it must exit 2; its stderr lines."""
    assert cli(list(argv)) == 2
    return capsys.readouterr().err.strip().splitlines()


PHI_LAYERS = "(has q_proj, k_proj, v_proj, dense, fc1, fc2)"


def test_lora_target_modules_are_checked_against_each_base_model(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "targets.yaml"
    sweep.write_text("name: x\nbase_models: [tiny-llama, tiny-mistral, tiny-phi]\ntasks: [demo_colors]\n"
                     "lora: {target_modules: [q_proj, nope_proj, o_proj]}\n")
    for command in ("validate", "plan"):
        lines = cli_errors(capsys, command, str(sweep))
        # nope_proj: one line for the two llama-like bases (same layers), one for phi; o_proj: phi has no o_proj.
        assert lines == [
            f"error: {sweep}: lora.target_modules[1]: 'nope_proj' is not a linear layer of tiny-llama, tiny-mistral "
            "(has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)",
            f"error: {sweep}: lora.target_modules[1]: 'nope_proj' is not a linear layer of tiny-phi {PHI_LAYERS}",
            f"error: {sweep}: lora.target_modules[2]: 'o_proj' is not a linear layer of tiny-phi {PHI_LAYERS}",
        ]
    sweep.write_text("name: x\nbase_models: [tiny-llama]\ntasks: [demo_colors, nope_task]\n"
                     "lora: {r: -1, target_modules: [all-linear]}\n")
    lines = cli_errors(capsys, "validate", str(sweep))
    assert len(lines) == 3 and any("lora.r" in line for line in lines) and any("nope_task" in line for line in lines)
    assert any("lora.target_modules[0]: write `target_modules: all-linear` on its own" in line for line in lines)
    for targets in ("all-linear", "[q_proj, v_proj, dense, fc2]"):
        sweep.write_text(f"name: x\nbase_models: [tiny-phi]\ntasks: [demo_colors]\n"
                         f"lora: {{target_modules: {targets}}}\n")
        assert cli(["validate", str(sweep)]) == 0, capsys.readouterr().err


def test_job_config_checks_lora_target_modules_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from core.parsing import dump_yaml
    from jobs.cli import main as job_cli
    from jobs.config import load_job_config
    from tests.helpers import tiny_job

    path = tmp_path / "job.yaml"
    dump_yaml(tiny_job(tmp_path / "out", base="tiny-gemma", lora={"target_modules": ["q_proj", "fc1"]}), path)
    expected = ("lora.target_modules[1]: 'fc1' is not a linear layer of tiny-gemma "
                "(has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    with pytest.raises(ConfigError) as error:
        load_job_config(path)
    assert error.value.problems == [expected]
    assert cli_errors(capsys, "validate", str(path)) == [f"error: {path}: {expected}"]
    assert job_cli("train", ["--config", str(path)]) == 2  # `python -m jobs train`: refused before loading anything
    assert capsys.readouterr().err.strip() == f"error: {path}: {expected}"
    dump_yaml(tiny_job(tmp_path / "out", base="tiny-gemma", lora={"target_modules": ["q_proj", "down_proj"]}), path)
    assert load_job_config(path).lora.target_modules == ["q_proj", "down_proj"]


@pytest.mark.parametrize("content, message", [
    (b"name: x\nbase_models: [tiny-llama]\n# caf\xe9 au lait\n", "not UTF-8 text (byte 0xe9 at offset 39, line 3)"),
    (b"", "the file is empty"),
    (b"# only a comment\n", "the file is empty"),
    (b"name: x\nbase_models: [tiny-llama\n", "line 3: not valid YAML (expected ',' or ']'"),
    (b"- name: x\n- name: y\n", "expected a mapping of keys at the top level, got a list"),
    (b"just words\n", "expected a mapping of keys at the top level, got a str"),
])
def test_unreadable_yaml_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes,
                                                     message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    for command in ("validate", "plan"):
        lines = cli_errors(capsys, command, str(path))
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {message}"), lines
    assert cli_errors(capsys, "validate", str(tmp_path)) == [f"error: {tmp_path}: not a file"]


def config_models() -> list[type[StrictModel]]:
    """Every StrictModel subclass of the project, from each module that mentions StrictModel (new ones included)."""
    import importlib

    for package in PACKAGES:
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            if "StrictModel" in path.read_text():
                importlib.import_module(".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts))
    found: list[type[StrictModel]] = []
    pending = list(StrictModel.__subclasses__())
    while pending:
        model = pending.pop()
        found.append(model)
        pending += model.__subclasses__()
    return found


def nested_models(annotation: object) -> list[type]:
    """pydantic model classes inside a field's type (list[X], X | None, dict[str, X], ...)."""
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in nested_models(arg)]


def test_every_config_field_is_described_and_unknown_keys_are_rejected() -> None:
    from pydantic import ValidationError

    models = config_models()
    names = {m.__name__ for m in models}
    assert {"JobConfig", "SweepConfig", "ResourceSettings", "ServeConfig", "BatchingEngineConfig", "VllmEngineConfig",
            "LoraSettings"} <= names
    undescribed, loose, unknown_accepted = [], [], []
    for model in models:
        for field_name, info in model.model_fields.items():
            if not (info.description or "").strip():
                undescribed.append(f"{model.__name__}.{field_name}")
            loose += [f"{model.__name__}.{field_name}: {m.__name__}" for m in nested_models(info.annotation)
                      if not issubclass(m, StrictModel)]
        with pytest.raises(ValidationError) as error:
            model.model_validate({"zz_not_a_field": 1})
        if not any(e["type"] == "extra_forbidden" and e["loc"] == ("zz_not_a_field",) for e in error.value.errors()):
            unknown_accepted.append(model.__name__)
    assert undescribed == [] and loose == [] and unknown_accepted == []


def test_plan_totals_follow_gpu_memory_and_price(capsys: pytest.CaptureFixture[str]) -> None:
    path = PROJECT_ROOT / "configs/sweeps/lora_land.yaml"
    headroom = load_sweep(path).resources.memory_headroom
    plans = {}
    for memory, price in ((24.0, 1.21), (80.0, 2.5)):
        assert cli(["plan", str(path), "--json", "--gpu-memory-gb", str(memory), "--price-per-gpu-hour",
                    str(price)]) == 0
        plan = json.loads(capsys.readouterr().out)
        planned, totals = plan["jobs"] + plan["base_evaluations"], plan["totals"]
        assert totals["gpu_memory_gb"] == memory and totals["price_per_gpu_hour"] == price
        for job in planned:
            # gpu_memory_gb is shown rounded to 0.01 GB: jobs per GPU from either end of that interval.
            fits = {int(memory // ((job["gpu_memory_gb"] + d) * headroom)) for d in (-0.005, 0.005)}
            assert job["jobs_per_gpu"] in fits and job["jobs_per_gpu"] >= 1, job
            assert job["gpus"] == math.floor(10_000 / job["jobs_per_gpu"]) / 10_000
        assert totals["jobs_per_gpu"] == min(j["jobs_per_gpu"] for j in planned)
        compute = sum(j["gpu_hours"] + j["eval_gpu_hours"] for j in planned)  # evaluations through the evaluators too
        assert totals["gpu_hours"] == pytest.approx(compute, abs=0.006)
        assert totals["cost"] == pytest.approx(compute * price, abs=0.006)
        plans[memory] = totals
    assert plans[80.0]["jobs_per_gpu"] > plans[24.0]["jobs_per_gpu"]
    assert plans[80.0]["gpu_hours"] == plans[24.0]["gpu_hours"]  # memory and price change packing and cost, not compute
    for option, value in (("--gpu-memory-gb", "-24"), ("--gpu-memory-gb", "0"), ("--price-per-gpu-hour", "-1")):
        lines = cli_errors(capsys, "plan", str(path), option, value)
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: command line: {option}: Input should be greater than"), lines


def test_wrong_types_and_huge_numbers_are_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Strict types (no `true` as a rank, no "100" as a step count), a lone name where a list belongs, an absurd
    headroom: each one line naming its field, list positions written [i], for validate and plan alike."""
    sweep = tmp_path / "types.yaml"
    sweep.write_text("name: x\nbase_models: [tiny-llama]\ntasks: [demo_colors, 7]\nevaluate_base: 'yes'\n"
                     "lora: {r: true, target_modules: q_proj}\ntraining: {max_steps: '100'}\n"
                     "resources: {memory_headroom: 1.0e+308}\n")
    for command in ("validate", "plan"):
        lines = cli_errors(capsys, command, str(sweep))
        fields = sorted(line.split(": ")[2] for line in lines)
        assert fields == ["evaluate_base", "lora.r", "lora.target_modules", "resources.memory_headroom", "tasks[1]",
                          "training.max_steps"], lines
        assert any("expected a list of names or 'all-linear'; write [q_proj] for one name" in line for line in lines)


def test_a_catalogue_file_with_a_broken_template_or_a_name_twice_is_refused(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    demo = yaml.safe_load((PROJECT_ROOT / "configs/catalog/demo_tasks.yaml").read_text())
    first, second = demo["tasks"][0], dict(demo["tasks"][1])
    broken = dict(first, name="broken", prompt="Review: {{ review", completion="{{ stars }}")
    second["name"] = first["name"]
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": [first, broken, second]}))
    lines = cli_errors(capsys, "validate", str(path))
    assert len(lines) == 3, lines
    assert "tasks[1].prompt: not a valid Jinja template (line 1:" in lines[0]
    assert "tasks[1].completion: uses 'stars', not among its columns (review, label)" in lines[1]
    assert f"tasks[2].name: {first['name']!r} is listed twice" in lines[2]


def test_a_ray_serve_file_with_keys_ray_would_ignore_is_refused(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    data = yaml.safe_load((PROJECT_ROOT / "configs/serve/demo.yaml").read_text())
    data["bogus_top"] = 1
    data["http_options"]["bogus_http"] = 1
    data["applications"][0]["bogus_app"] = 1
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli_errors(capsys, "validate", str(path)) == [
        f"error: {path}: bogus_top: unknown key (remove it or check its spelling)",
        f"error: {path}: http_options.bogus_http: unknown key (remove it or check its spelling)",
        f"error: {path}: applications[0].bogus_app: unknown key (remove it or check its spelling)",
    ]


def test_tiny_model_builds_are_reproducible_and_keyed_by_their_recipe(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.tiny import build_digest, tiny_model_dir

    spec = load_catalog().base_model("tiny-phi")
    built = []
    for home in ("a", "b"):
        monkeypatch.setenv("LORALAND_HOME", str(tmp_path / home))
        built.append(tiny_model_dir(spec))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (built[0] / name).read_bytes() == (built[1] / name).read_bytes(), name
    wider = spec.model_copy(update={"architecture": spec.architecture.model_copy(update={"hidden_size": 96})})
    assert build_digest(wider) != build_digest(spec) and built[0].name == f"tiny-phi-{build_digest(spec)}"
