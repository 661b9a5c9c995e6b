"""Search trials co-trained over one base (jobs/trials.py): a trial ends with the same adapter whoever it shared steps
with and after a resume from its checkpoint, a dropped trial's place is taken without reloading the base, trials of
different ranks and target modules coexist, a trial's score is its adapter's, and the validation slice is never an
evaluation row."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedModel

from core.catalog import load_catalog
from core.errors import ConfigError
from core.schemas import BaseModelSpec, QuantizationSettings
from jobs import trials as trials_module
from jobs.config import JobConfig
from jobs.data import eval_rows, train_rows, validation_rows
from jobs.models import load_adapter, load_base_model, load_tokenizer
from jobs.trials import TrialHost, validation_score
from tests.helpers import tiny_job
from tests.test_cotrain import assert_same_as_alone

VALIDATION_ROWS = 16
# Three trials of different tasks, ranks, target modules, step counts, learning rates and batching (LoRA dropout 0).
TRIALS: list[dict[str, Any]] = [
    dict(task="demo_sentiment", max_steps=4, lora={"dropout": 0.0, "r": 4, "alpha": 8}, micro_batch_size=4),
    dict(task="demo_colors", max_steps=5, lora={"dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
         micro_batch_size=4, seed=7, learning_rate=5e-3),
    dict(task="demo_arithmetic", max_steps=3, lora={"dropout": 0.0, "r": 2, "target_modules": ["o_proj", "down_proj"]},
         micro_batch_size=2, gradient_accumulation_steps=2, packing=False),
]


def trial_jobs(root: Path) -> list[JobConfig]:
    return [tiny_job(root / f"trial-{i}", eval_limit=VALIDATION_ROWS, **({"log_every": 1} | spec))
            for i, spec in enumerate(TRIALS)]


class CountingLoader:
    """`load_base_model`, counting its calls."""

    def __init__(self) -> None:
        self.loads = 0

    def __call__(self, spec: BaseModelSpec, quant: QuantizationSettings, device: str) -> PreTrainedModel:
        self.loads += 1
        return load_base_model(spec, quant, device)


def host(slots: int, loader: CountingLoader | None = None, gather_s: float = 1.0) -> TrialHost:
    catalog = load_catalog()
    return TrialHost(catalog.base_model("tiny-llama"), QuantizationSettings(), "cpu", slots,
                     validation_size=VALIDATION_ROWS, load_base=loader or load_base_model, gather_s=gather_s)


def target_modules(adapter_dir: str) -> list[str]:
    return sorted(json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["target_modules"])


@pytest.mark.integration
def test_a_co_trained_trial_equals_it_alone_and_a_freed_place_is_taken_without_reloading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials of different ranks and targets co-trained (the first alone for two steps, then joined by the others from
    three threads, in step) end with the adapters each makes alone; alone, each in turn takes the place the previous
    one left, over the one base loaded once, and the first, saved at step 2 and dropped, resumes from its checkpoint.
    `save` writes a checkpoint only where training wrote none."""
    saves, save_checkpoint = list[int](), trials_module.save_checkpoint

    def counted_save(*args: Any) -> Path:
        saves.append(args[4].step)  # the trainer state's step
        return save_checkpoint(*args)

    monkeypatch.setattr(trials_module, "save_checkpoint", counted_save)
    co_host, co_jobs = host(slots=3, gather_s=60.0), trial_jobs(tmp_path / "co")  # its steps never wait that long
    assert co_host.train("t0", co_jobs[0], 2)[-1]["step"] == 2  # alone, then joined
    assert co_host.train("t1", co_jobs[1], 0) == [] and co_host.train("t2", co_jobs[2], 0) == []  # on, not training
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(co_host.train, f"t{i}", job, job.training.max_steps) for i, job in enumerate(co_jobs)]
        records = [future.result() for future in futures]
    assert [r["step"] for r in records[0]] == [3.0, 4.0]  # the loss records since the last call
    assert [r["step"] for r in records[2]] == [1.0, 2.0, 3.0]
    # in step: 2 steps of t0 alone, then 5 shared steps (t0's last 2, t2's 3 and t1's 5, whichever thread came first)
    assert (co_host.group_steps, co_host.trial_steps) == (7, 12)
    co_trained = [co_host.save(f"t{i}") for i in range(3)]
    assert saves == []  # training checkpointed each trial at its last step

    loader = CountingLoader()
    alone_host = host(slots=1, loader=loader)
    for index, job in enumerate(trial_jobs(tmp_path / "alone")):
        if index == 0:  # interrupted: saved at step 2 and dropped, then resumed from that checkpoint
            alone_host.train("alone-0", job, 2)
            alone_host.save("alone-0")
            alone_host.drop("alone-0")
            assert saves == [2]  # training wrote none at step 2 (checkpoint_every is larger)
        history = alone_host.train(f"alone-{index}", job, job.training.max_steps)  # resumed: its history came back
        assert [r["step"] for r in history] == [float(s + 1) for s in range(job.training.max_steps)]
        assert alone_host.trials == [f"alone-{index}"]
        alone = alone_host.save(f"alone-{index}")
        alone_host.drop(f"alone-{index}")
        assert_same_as_alone(alone, co_trained[index])
        assert target_modules(alone) == target_modules(co_trained[index])
    # one load; the resumed trial trained steps 3 and 4 only once
    assert loader.loads == 1 and alone_host.group_steps == sum(job.training.max_steps for job in co_jobs)
    assert target_modules(co_trained[1]) == ["q_proj", "v_proj"]


@pytest.mark.integration
def test_a_trials_score_is_its_adapters_on_the_validation_rows(tmp_path: Path) -> None:
    """`validate` scores a trial (among others) as its saved adapter, loaded by PEFT on a fresh base, scores on the
    validation rows."""
    job, other = trial_jobs(tmp_path)[:2]  # sentiment: 4 new tokens a row to validate
    trials = host(slots=2)
    trials.train("other", other, 1)
    trials.train("t", job, job.training.max_steps)
    score = trials.validate("t")
    base = load_base_model(job.base_model, job.quantization, "cpu")
    peft_model = load_adapter(base, trials.save("t"))
    assert score == validation_score(peft_model, load_tokenizer(job.base_model), job,
                                     validation_rows(job.task, VALIDATION_ROWS))
    assert 0.0 <= score <= 1.0


@pytest.mark.integration
def test_a_trial_that_cannot_share_the_hosts_base_is_refused_in_one_line(tmp_path: Path) -> None:
    odd = tiny_job(tmp_path / "odd", base="tiny-mistral")
    with pytest.raises(ConfigError) as error:
        host(slots=1).train("odd", odd, 1)
    (line,) = str(error.value).splitlines()
    assert "base_model 'tiny-mistral'" in line and "tiny-llama" in line


@pytest.mark.unit
def test_the_validation_slice_is_held_out_of_training_and_never_an_evaluation_row(tmp_path: Path) -> None:
    catalog = load_catalog()
    demo = catalog.task("demo_colors")  # evaluates on its own test split
    train = train_rows(demo)
    assert validation_rows(demo, 50) == train[-50:]
    assert train_rows(demo, held_out=50) == train[:-50] and train_rows(demo, 100, held_out=50) == train[:100]
    assert train_rows(demo, 100) == train[:100]  # plain jobs keep their rows

    rows = [{"text": f"row {i}", "colors": ["red"]} for i in range(150)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = {"kind": "local", "id": "rows", "train_split": "train", "eval_split": "train", "eval_split_size": 100,
              "data_files": {"train": str(data)}}
    same_split = demo.model_copy(update={"dataset": demo.dataset.model_validate(source)})  # evaluates on its training
    held_out = validation_rows(same_split, 50)
    assert held_out == rows[100:]
    assert not [row for row in held_out if row in eval_rows(same_split, 100)]
    assert train_rows(same_split, held_out=50) == rows[:100]
    with pytest.raises(ConfigError, match="no room for 51 validation rows") as error:
        validation_rows(same_split, 51)
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.unit
def test_asha_breaks_score_ties_by_loss_and_the_search_runs_at_most_k_trials() -> None:
    """Trials tied on a coarse score at a rung are ranked by their training loss (ASHA alone stops nothing on ties);
    a better score still wins over a lower loss. Random and Optuna searches both cap the trials running at once."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from orchestrator.search_config import SearchSettings
    from orchestrator.search_trials import ScoreThenLoss, search_algorithm

    def decisions(results: list[tuple[float, float]]) -> list[str]:
        scheduler = ScoreThenLoss(time_attr="step", metric="score", mode="max", max_t=8, grace_period=2,
                                  reduction_factor=2)
        actions = []
        for index, (score, loss) in enumerate(results):
            trial = SimpleNamespace(trial_id=f"t{index}")
            scheduler.on_trial_add(None, trial)  # type: ignore[arg-type]
            actions.append(scheduler.on_trial_result(None, trial, {"step": 2, "score": score, "loss": loss}))
        return actions

    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert decisions([(0.0, 1.0), (0.0, 2.0), (0.0, 0.5)]) == [go, stop, go]  # ties: the higher loss stops
    assert decisions([(0.0, 0.5), (0.25, 9.0)]) == [go, go]  # the score first
    assert decisions([(0.0, float("nan")), (0.0, float("nan"))]) == [go, go]  # no loss recorded: plain ASHA

    random_search = search_algorithm(SearchSettings(), 3)
    assert isinstance(random_search, BasicVariantGenerator) and random_search.max_concurrent == 3
    optuna = search_algorithm(SearchSettings(algorithm="optuna"), 2)
    assert isinstance(optuna, ConcurrencyLimiter) and optuna.max_concurrent == 2
