"""Co-training (jobs/cotrain.py): K fine-tunes over one 4-bit base equal the same jobs trained alone, a diverging member
fails alone, a restarted group resumes each member, and members that cannot share a base are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from core.errors import ConfigError
from jobs.checkpoints import CHECKPOINT_DIR, latest_checkpoint
from jobs.config import JobConfig
from jobs.cotrain import check_group, co_train, run_group
from jobs.models import load_adapter, load_base_model
from jobs.run import run_job
from jobs.train import train
from tests.helpers import assert_same_adapter, tiny_job

NO_DROPOUT = {"dropout": 0.0}
# Three tasks of different prompt lengths, step counts, ranks, batching and packing.
MEMBERS: list[dict[str, Any]] = [
    dict(task="demo_sentiment", max_steps=3, lora=NO_DROPOUT | {"r": 4, "alpha": 8}, micro_batch_size=4,
         gradient_accumulation_steps=2),
    dict(task="demo_colors", max_steps=5, lora=NO_DROPOUT, micro_batch_size=8, seed=7, lr_scheduler="linear"),
    dict(task="demo_arithmetic", max_steps=4, lora=NO_DROPOUT, micro_batch_size=2, gradient_accumulation_steps=3,
         packing=False),
]


def member_jobs(root: Path, base: str, **overrides: Any) -> list[JobConfig]:
    return [tiny_job(root / spec["task"], base=base, **(spec | overrides)) for spec in MEMBERS]


def adapter_config(adapter_dir: str) -> dict[str, Any]:
    """adapter_config.json, its target modules sorted (PEFT writes the set it resolved `all-linear` to in set order)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return config | {"target_modules": sorted(config["target_modules"])}



def assert_same_as_alone(alone_dir: str, co_trained_dir: str) -> None:
    """A co-trained adapter equals the one trained alone, to float tolerance. The group's batched products
    (jobs.group_lora.GroupLoraLinear) sum in another order than PEFT's per-adapter linear layers, and Adam's
    normalisation magnifies such last-bit gradient differences where a gradient is near zero: after a few steps a weight
    of about 0.1 may differ by a few 1e-5."""
    assert_same_adapter(alone_dir, co_trained_dir, rtol=1e-3, atol=1e-4)

@pytest.mark.integration
@pytest.mark.parametrize("base", ["tiny-llama", "tiny-mistral"])
def test_each_co_trained_adapter_equals_the_one_trained_alone(tmp_path: Path, base: str) -> None:
    group, _ = co_train(member_jobs(tmp_path / "group", base))
    for config, outcome in zip(member_jobs(tmp_path / "alone", base), group):
        assert outcome.error is None and outcome.result is not None
        alone, _, _ = train(config)
        assert outcome.result.summary["steps"] == config.training.max_steps
        assert outcome.result.summary["trained_tokens"] == alone.summary["trained_tokens"]
        assert [h["loss"] for h in outcome.result.history] == pytest.approx([h["loss"] for h in alone.history],
                                                                            rel=1e-4)
        assert_same_as_alone(alone.adapter_dir, outcome.result.adapter_dir)
        assert adapter_config(outcome.result.adapter_dir) == adapter_config(alone.adapter_dir)
        base = load_base_model(config.base_model, config.quantization, "cpu")
        loaded = load_adapter(base, outcome.result.adapter_dir)  # PEFT reads it
        tensors = load_file(alone.adapter_dir + "/adapter_model.safetensors")
        assert sum("lora_A" in name for name, _ in loaded.named_parameters()) == len(tensors) // 2


@pytest.mark.integration
def test_a_diverging_member_fails_alone_and_a_restarted_group_resumes_each_member(tmp_path: Path) -> None:
    configs = member_jobs(tmp_path, "tiny-llama", checkpoint_every=2, log_every=1)
    diverging = configs[1].training.model_copy(update={"learning_rate": 1e30})
    configs[1] = configs[1].model_copy(update={"training": diverging})

    class Stop(Exception):
        pass

    def stop_at_3(step: int, metrics: dict[str, float]) -> None:
        if step == 3:
            raise Stop

    with pytest.raises(Stop):  # the group dies (a node lost) when member 2 reaches step 3
        co_train(configs, on_step={2: stop_at_3})
    newest = [latest_checkpoint(Path(c.output_dir) / CHECKPOINT_DIR) for c in configs]
    assert newest[0] is not None and newest[0].name == "step-00000003"  # member 0 had finished its 3 steps
    assert newest[2] is not None and newest[2].name == "step-00000002"
    outcome, _ = co_train(configs)
    assert outcome[1].result is None and outcome[1].error and "non-finite loss" in outcome[1].error
    for index, resumed_from in ((0, 3), (2, 2)):
        result = outcome[index].result
        assert outcome[index].error is None and result is not None
        assert result.summary["resumed_from_step"] == resumed_from
        assert result.summary["steps"] == configs[index].training.max_steps
        alone, _, _ = train(member_jobs(tmp_path / "alone", "tiny-llama")[index])
        assert_same_as_alone(alone.adapter_dir, result.adapter_dir)


@pytest.mark.unit
@pytest.mark.parametrize(("change", "field"), [
    ({"base": "tiny-mistral"}, "base_model"),
    ({"lora": {"target_modules": ["q_proj"]}}, "lora.target_modules"),
])
def test_members_that_cannot_share_a_base_are_refused_naming_job_and_field(tmp_path: Path, change: dict[str, Any],
                                                                           field: str) -> None:
    odd = tiny_job(tmp_path / "odd", task="demo_colors", **change)
    with pytest.raises(ConfigError) as error:
        check_group([tiny_job(tmp_path / "a"), odd])
    (line,) = str(error.value).splitlines()
    assert "job #1 " in line and f" {field} " in line


@pytest.mark.unit
def test_a_member_with_other_quantization_is_refused(tmp_path: Path) -> None:
    odd = tiny_job(tmp_path / "odd").model_copy(update={"job_key": "sweep/tiny-llama/demo_sentiment/abc"})
    odd = odd.model_copy(update={"quantization": odd.quantization.model_copy(update={"quant_type": "fp4"})})
    with pytest.raises(ConfigError, match=r"job sweep/tiny-llama/demo_sentiment/abc: quantization .*fp4"):
        check_group([tiny_job(tmp_path / "a"), odd])


@pytest.mark.integration
def test_out_of_memory_first_splits_the_pass_then_backs_off_each_member(tmp_path: Path) -> None:
    """An out-of-memory at step 2 puts one member in each pass, with the same adapters; one at every pass ends, once
    every member is at its floor, with each member failed by a one-line error instead of looping."""
    raised: list[int] = []

    def oom_once_at_step_1(step: int) -> None:
        if step == 1 and not raised:
            raised.append(step)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    configs = member_jobs(tmp_path / "once", "tiny-llama")
    outcome, _ = co_train(configs, fault=oom_once_at_step_1)
    assert raised == [1]
    for config, member in zip(member_jobs(tmp_path / "alone", "tiny-llama"), outcome):
        assert member.result is not None
        assert member.result.summary["oom_backoffs"] == 0  # the pass split, not the member
        alone, _, _ = train(config)
        assert_same_as_alone(alone.adapter_dir, member.result.adapter_dir)

    def always_oom(step: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    failed, _ = co_train(member_jobs(tmp_path / "always", "tiny-llama"), fault=always_oom)
    assert all(m.result is None and m.error and "out of memory at step 0" in m.error for m in failed)


@pytest.mark.integration
def test_a_group_run_evaluates_each_member_through_its_own_adapter_and_skips_finished_members(tmp_path: Path) -> None:
    """`run_group` leaves each member's result.json as `run_job` does (the same predictions as the job run alone); run
    again, it returns the saved results without training."""
    configs = [tiny_job(tmp_path / "group" / spec["task"], eval_limit=8, **spec) for spec in MEMBERS[:2]]
    outcome = run_group(configs)
    for spec, member in zip(MEMBERS[:2], outcome):
        assert member.error is None and member.job is not None and member.job.adapter_dir
        alone = run_job(tiny_job(tmp_path / "alone" / spec["task"], eval_limit=8, **spec))
        assert [p["prediction"] for p in member.job.predictions] == [p["prediction"] for p in alone.predictions]
        assert member.job.score == alone.score and member.job.params == alone.params
    again = run_group(configs, fault=lambda step: pytest.fail("a finished member was trained again"))
    assert [m.job.score for m in again if m.job] == [m.job.score for m in outcome if m.job]


# --------------------------------------------------------------------------- the sweep: config, plan, driver


def sweep_with(co_train: Any, device: str = "auto", **resources: Any) -> Any:
    from orchestrator.config import SweepConfig

    return SweepConfig.model_validate({"name": "co", "base_models": ["mistral-7b", "tiny-llama"],
                                       "tasks": ["demo_sentiment", "demo_colors", "demo_arithmetic"],
                                       "resources": {"co_train": co_train, "device": device, **resources}})


@pytest.mark.unit
def test_co_train_is_off_auto_or_a_member_count_and_anything_else_is_refused() -> None:
    from orchestrator.config import SweepConfig

    assert [sweep_with(value).resources.co_train for value in ("off", "auto", 4)] == ["off", "auto", 4]
    for bad in (0, "4", "on", True):
        with pytest.raises(Exception, match="co_train"):
            SweepConfig.model_validate({"name": "co", "base_models": ["tiny-llama"], "tasks": ["demo_colors"],
                                        "resources": {"co_train": bad}})


@pytest.mark.unit
def test_plan_groups_a_base_models_fine_tunes_to_fit_one_gpu_with_one_base() -> None:
    from jobs.memory import shared_memory_gb
    from orchestrator.config import expand_jobs
    from orchestrator.plan import co_train_groups, group_size, plan_group, plan_job, plan_json

    assert plan_json(sweep_with("off"))["groups"] == []
    two = plan_json(sweep_with(2))["groups"]
    assert [(g["base_model"], list(g["tasks"])) for g in two] == [
        ("mistral-7b", ["demo_sentiment", "demo_colors"]), ("mistral-7b", ["demo_arithmetic"]),
        ("tiny-llama", ["demo_sentiment", "demo_colors"]), ("tiny-llama", ["demo_arithmetic"])]
    sweep = sweep_with("auto", gpu_memory_gb=80.0)
    jobs = [job for job in expand_jobs(sweep) if job.kind == "train"]
    groups = co_train_groups(jobs, sweep.resources)
    assert [len(g) for g in groups] == [3, 3]  # three 7B fine-tunes fit an 80 GB GPU with one base
    seven_b = groups[0]
    one = plan_job(seven_b[0], sweep.resources)
    shared = shared_memory_gb(seven_b[0].base_model, seven_b[0].quantization)
    planned = plan_group(seven_b, sweep.resources)
    assert planned.gpu_memory_gb == pytest.approx(shared + 3 * (one.gpu_memory_gb - shared), abs=0.02)
    assert planned.gpu_memory_gb < 3 * one.gpu_memory_gb and planned.gpus <= 1.0
    assert planned.gpu_hours == pytest.approx(sum(plan_job(job, sweep.resources).gpu_hours for job in seven_b),
                                              abs=0.002)
    member = one.gpu_memory_gb - shared  # a 7B member at micro-batch 1: under 1 GB beside its ~4.8 GB base
    assert group_size(seven_b[0], sweep.resources) == pytest.approx((80.0 / 1.15 - shared) / member, abs=1.5)
    assert group_size(seven_b[0], sweep_with("auto", gpu_memory_gb=7.0).resources) == 1  # room for one job only
    cpu = sweep_with("auto", device="cpu")
    fine_tunes = [j for j in expand_jobs(cpu) if j.kind == "train"]
    assert [len(g) for g in co_train_groups(fine_tunes, cpu.resources)] == [3, 3]


@pytest.mark.cluster
def test_a_co_trained_sweep_keeps_a_run_per_job_and_a_rerun_runs_none(mlflow_server, tmp_path: Path) -> None:
    """The mini sweep with co_train auto on the CPU: its two fine-tunes go out as one group, each ends with its own
    FINISHED run (score, lift, adapter artifact); run again, nothing runs."""
    import subprocess

    from tests.test_sweep import MINI, sweep_command, sweep_env
    from tracking import store

    sweep = tmp_path / "mini_co.yaml"
    co_trained = MINI.read_text().replace("name: mini", "name: mini-co")
    sweep.write_text(co_trained.replace("resources: {", "resources: {co_train: auto, "))
    first = subprocess.run(sweep_command(mlflow_server.uri, tmp_path / "storage", sweep), capture_output=True,
                           text=True, timeout=600, env=sweep_env(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert ("0 already finished, 4 to run" in first.stdout
            and "progress: 4 done, 0 failed" in first.stdout), first.stdout
    assert "group of 2" in first.stdout and first.stdout.count("(co-trained)") == 2, first.stdout  # a line per member
    runs = store.job_runs(store.experiment_id_for("mini-co", mlflow_server.uri), mlflow_server.uri)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    from mlflow import MlflowClient

    trained = [r for r in runs if r.data.tags["loraland.kind"] == "train"]
    assert len(trained) == 2 and all("lift" in r.data.metrics for r in trained)
    client = MlflowClient(mlflow_server.uri)
    assert all("adapter" in {a.path for a in client.list_artifacts(r.info.run_id)} for r in trained)
    second = subprocess.run(sweep_command(mlflow_server.uri, tmp_path / "storage", sweep), capture_output=True,
                            text=True, timeout=600, env=sweep_env(tmp_path))
    assert second.returncode == 0 and "4 already finished, 0 to run" in second.stdout, second.stderr[-3000:]
