"""Jobs: real 4-bit QLoRA training on the CPU, resume (also after a kill mid-save), out-of-memory back-off,
gradient checkpointing and the learning-rate schedule, completion-only labels, runs without Ray."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch

from core.catalog import Catalog, load_catalog
from core.parsing import dump_yaml
from core.prompts import completion_for, prompt_for
from core.schemas import QuantizationSettings
from jobs.checkpoints import CHECKPOINT_DIR, latest_checkpoint
from jobs.config import parse_job_config
from jobs.data import train_rows
from jobs.encoding import IGNORE, encode_example
from jobs.models import attach_lora, load_base_model, load_tokenizer
from jobs.run import run_job
from jobs.train import StepCallback, TrainingError, answer_token_losses, make_batches, train, training_prompt
from tests.helpers import assert_same_adapter, tiny_job

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_fine_tuning_lifts_the_score_with_real_4bit_layers(tmp_path: Path) -> None:
    base = run_job(tiny_job(tmp_path / "base", kind="evaluate_base", eval_limit=100))
    config = tiny_job(tmp_path / "ft", eval_limit=100, max_steps=150)
    seen: list[int] = []
    result, model, _ = train(config, on_step=lambda step, metrics: seen.append(step))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert seen[-1] == 150 and result.summary["trained_tokens"] > 0
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "tiny/tiny-llama"
    tuned = run_job(config)  # picks up the finished training from its checkpoint, then evaluates
    assert tuned.score - base.score >= 0.3, (base.score, tuned.score)
    assert len(tuned.predictions) == 100 and {"prompt", "prediction", "gold", "score"} <= set(tuned.predictions[0])


# demo_arithmetic in make test; the other two (about 25 s each) in make test-long
@pytest.mark.parametrize("task", [pytest.param("demo_colors", marks=pytest.mark.long),
                                  pytest.param("demo_similarity", marks=pytest.mark.long), "demo_arithmetic"])
def test_the_demo_sweep_lifts_every_other_demo_task_too(tmp_path: Path, task: str) -> None:
    """The shipped demo's settings (configs/sweeps/demo.yaml) on tiny-llama: ROUGE-L, stsb-style similarity and
    last-number accuracy each rise by at least 0.3 over the base's zero-shot score."""
    from orchestrator.config import expand_jobs, load_sweep

    sweep = load_sweep(ROOT / "configs" / "sweeps" / "demo.yaml")
    jobs = {job.kind: job.model_copy(update={"output_dir": str(tmp_path / job.kind)}) for job in expand_jobs(sweep)
            if job.base_model.name == "tiny-llama" and job.task.name == task}
    base, tuned = run_job(jobs["evaluate_base"]), run_job(jobs["train"])
    assert tuned.score - base.score >= 0.3, (base.score, tuned.score)


class Stop(Exception):
    pass


RESUME_SETTINGS: dict[str, Any] = dict(max_steps=12, checkpoint_every=4, micro_batch_size=4, log_every=1)


@pytest.fixture(scope="module")
def straight_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adapter of an uninterrupted run, for the resume tests to match."""
    result, _, _ = train(tiny_job(tmp_path_factory.mktemp("straight"), **RESUME_SETTINGS))
    return Path(result.adapter_dir)


def test_resume_continues_the_same_trajectory(tmp_path: Path, straight_adapter: Path) -> None:
    def crash_at_6(step: int, metrics: dict[str, float]) -> None:
        if step == 6:
            raise Stop

    interrupted = tiny_job(tmp_path / "interrupted", **RESUME_SETTINGS)
    with pytest.raises(Stop):
        train(interrupted, on_step=crash_at_6)
    checkpoint = latest_checkpoint(tmp_path / "interrupted" / CHECKPOINT_DIR)
    assert checkpoint is not None and checkpoint.name == "step-00000004"
    (tmp_path / "interrupted" / CHECKPOINT_DIR / ".staging-00000008-1").mkdir()  # a save killed half-way
    resumed, _, _ = train(interrupted)
    assert resumed.summary["resumed_from_step"] == 4
    assert_same_adapter(straight_adapter, resumed.adapter_dir)


# Run in a child process: the job dies (os._exit, no clean-up, like a kill) while saving the checkpoint of
# step 8, after the adapter's files are written to the staging folder and before the trainer state is.
DIE_WHILE_SAVING = """
import json, os, sys
from pathlib import Path
import torch
from jobs.train import train
from tests.helpers import tiny_job

real_save = torch.save

def save(obj, f, *args, **kwargs):
    if ".staging-00000008-" in str(f):
        os._exit(17)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
train(tiny_job(Path(sys.argv[1]), **json.loads(sys.argv[2])))
"""


def test_job_killed_in_the_middle_of_a_save_resumes_from_the_last_complete_checkpoint(tmp_path: Path,
                                                                                      straight_adapter: Path) -> None:
    out = subprocess.run([sys.executable, "-c", DIE_WHILE_SAVING, str(tmp_path), json.dumps(RESUME_SETTINGS)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 17, out.stderr[-2000:]
    root = tmp_path / CHECKPOINT_DIR
    (staging,) = root.glob(".staging-00000008-*")
    assert (staging / "adapter_model.safetensors").is_file() and not (staging / "state.json").exists()
    assert [p.name for p in root.glob("step-*")] == ["step-00000004"]
    assert latest_checkpoint(root) == root / "step-00000004"
    resumed, _, _ = train(tiny_job(tmp_path, **RESUME_SETTINGS))
    assert resumed.summary["resumed_from_step"] == 4 and resumed.summary["steps"] == 12
    assert_same_adapter(straight_adapter, resumed.adapter_dir)
    assert not list(root.glob(".staging-*")), "the half-written save is cleaned up"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000008", "step-00000012"]


def test_a_job_on_an_object_store_resumes_elsewhere_from_its_last_uploaded_checkpoint(s3_store,
                                                                                      straight_adapter: Path) -> None:
    """output_dir on S3 (moto's server on loopback): the job stops after step 6, its node's scratch folder is lost, and
    the job started again resumes from step 4 in the bucket, ignoring a newer checkpoint whose upload was cut off."""
    import shutil

    from jobs.run import RESULT_FILE
    from jobs.storage import JobStorage

    config = tiny_job(s3_store.uri("resume", "job"), eval_limit=8, **RESUME_SETTINGS)
    storage = JobStorage(config.output_dir)

    def crash_at_6(step: int, metrics: dict[str, float]) -> None:
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        run_job(config, on_step=crash_at_6)
    assert storage.remote_checkpoints(CHECKPOINT_DIR) == ["step-00000004"]
    shutil.rmtree(storage.local)  # another node: nothing local
    s3_store.put("resume/job/checkpoints/step-00000008/adapter_model.safetensors",
                 b"cut off")  # an upload cut off mid-way
    result = run_job(config)
    assert result.summary["resumed_from_step"] == 4 and result.summary["steps"] == 12 and result.adapter_dir
    assert_same_adapter(straight_adapter, result.adapter_dir)
    keys = s3_store.keys("resume/job/")
    assert {"resume/job/" + RESULT_FILE, "resume/job/adapter/adapter_model.safetensors",
            "resume/job/adapter/adapter_config.json"} <= set(keys)
    # keep_checkpoints 2: step 4's is gone
    assert storage.remote_checkpoints(CHECKPOINT_DIR) == ["step-00000008", "step-00000012"]
    assert not (storage.local / CHECKPOINT_DIR).exists()  # scratch checkpoints dropped once the result is in the store

    # a finished job, asked again on a third node: its result and adapter come from the store
    shutil.rmtree(storage.local)
    again = run_job(config)
    assert again.score == result.score and json.dumps(again.summary) == json.dumps(result.summary)  # NaN-safe
    assert again.adapter_dir
    assert_same_adapter(straight_adapter, again.adapter_dir)


def test_out_of_memory_halves_micro_batch_keeps_effective_batch(tmp_path: Path) -> None:
    raised: list[int] = []

    def oom_once_at_step_3(step: int) -> None:
        if step == 3 and not raised:
            raised.append(step)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    result, _, _ = train(tiny_job(tmp_path, max_steps=6, micro_batch_size=8, gradient_accumulation_steps=2),
                         fault=oom_once_at_step_3)
    assert raised == [3]
    assert result.summary["steps"] == 6
    assert result.summary["oom_backoffs"] == 1
    assert result.summary["final_micro_batch_size"] == 4
    assert result.summary["final_gradient_accumulation_steps"] == 4  # 8 x 2 == 4 x 4


def test_out_of_memory_when_packed_splits_the_step_into_smaller_passes_with_the_same_result(tmp_path: Path) -> None:
    """The study's micro-batch 1: packed, one step's 8 examples share one row; after an injected out-of-memory at step 2
    the same examples go in passes of half the tokens, and the adapter ends as if nothing had happened."""
    settings: dict[str, Any] = dict(max_steps=4, micro_batch_size=1, gradient_accumulation_steps=8, max_seq_length=256,
                                    checkpoint_every=1000)
    no_dropout = {"dropout": 0.0}  # dropout masks follow the passes' shapes; without it the trajectory is the same
    straight, _, _ = train(tiny_job(tmp_path / "straight", lora=no_dropout, **settings))
    passes: list[tuple[int, int]] = []  # (step, tokens of the forward pass)
    raised: list[int] = []

    def oom_once_at_step_2(step: int) -> None:
        passes.append((step, -1))  # an attempt starts
        if step == 2 and not raised:
            raised.append(step)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    config = tiny_job(tmp_path / "oom", lora=no_dropout, **settings)
    torch.manual_seed(config.training.seed)  # as train() does before it attaches LoRA: the same initial adapter
    model = attach_lora(load_base_model(config.base_model, config.quantization, "cpu"), config.lora, False)
    model.register_forward_pre_hook(lambda _m, _a, kwargs: passes.append((passes[-1][0], kwargs["input_ids"].numel())),
                                    with_kwargs=True)
    result, _, _ = train(config, model=model, fault=oom_once_at_step_2)
    sizes = {step: [tokens for s, tokens in passes if s == step and tokens > 0] for step in range(4)}
    assert raised == [2] and result.summary["oom_backoffs"] == 1 and result.summary["final_pass_tokens"] == 128
    assert len(sizes[1]) == 1 and sizes[1][0] > 128  # before: the step in one packed row
    assert len(sizes[3]) >= 2 and max(sizes[3]) <= 128  # after: several passes of at most half the tokens
    assert result.summary["final_micro_batch_size"] == 1 and result.summary["steps"] == 4
    assert_same_adapter(straight.adapter_dir, result.adapter_dir)


def test_out_of_memory_at_the_floor_fails_clearly(tmp_path: Path) -> None:
    def always_oom(step: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    with pytest.raises(TrainingError, match="micro_batch_size 1 .*max_seq_length"):
        train(tiny_job(tmp_path, max_steps=2, micro_batch_size=4), fault=always_oom)


def test_packing_is_padding_free_and_equals_padded_loss() -> None:
    from core.catalog import load_catalog
    from core.schemas import LoraSettings, QuantizationSettings
    from jobs.models import attach_lora, load_base_model

    spec = load_catalog().base_model("tiny-mistral")
    tokenizer = load_tokenizer(spec)
    examples = [encode_example(tokenizer, "Review: " + "very " * n + "good\nSentiment:", "positive", 64)
                for n in (1, 9, 3)]
    packed = make_batches(examples, 3, 64, True, tokenizer.pad_token_id)
    padded = make_batches(examples, 3, 64, False, tokenizer.pad_token_id)
    assert len(packed) == 1 and packed[0]["input_ids"].numel() == sum(len(e.input_ids) for e in examples)
    assert padded[0]["input_ids"].numel() == 3 * max(len(e.input_ids) for e in examples)
    model = attach_lora(load_base_model(spec, QuantizationSettings(), "cpu"), LoraSettings(dropout=0.0), False).eval()
    with torch.no_grad():
        losses = [float(model(**batch[0], use_cache=False).loss) for batch in (packed, padded)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_an_evaluation_between_training_steps_leaves_the_4bit_layers_training_as_before() -> None:
    """An eval-mode forward without gradients (a search trial's validation) must not move the 4-bit layers to
    bitsandbytes' AVX512-BF16 CPU inference kernel, which passes no gradient to its input: the LoRA gradients of a
    training pass after it equal those before it (`jobs.models.keep_compute_dtype_kernel`)."""
    from core.schemas import LoraSettings

    spec = load_catalog().base_model("tiny-llama")
    model = attach_lora(load_base_model(spec, QuantizationSettings(), "cpu"), LoraSettings(dropout=0.0), False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.arange(3, 3 + 2 * 24).view(2, 24)

    def lora_gradients() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    before = lora_gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids[:, :5], use_cache=False)
    after = lora_gradients()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


@pytest.mark.long  # make test runs `python -m jobs` train and evaluate in the test below
def test_jobs_run_without_ray_from_the_command_line(tmp_path: Path) -> None:
    config = tiny_job(tmp_path / "job", max_steps=3, eval_limit=4)
    dump_yaml(config, tmp_path / "job.yaml")
    out = subprocess.run([sys.executable, "-m", "jobs", "train", "--config", str(tmp_path / "job.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and 0.0 <= summary["score"] <= 1.0
    out = subprocess.run([sys.executable, "-m", "jobs", "evaluate", "--config", str(tmp_path / "job.yaml"),
                          "--adapter", summary["adapter_dir"]],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["examples"] == 4
    (tmp_path / "bad.yaml").write_text("kind: train\nbase_model: {}\n")
    out = subprocess.run([sys.executable, "-m", "jobs", "train", "--config", str(tmp_path / "bad.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "task: Field required" in out.stderr


def run_cli(mode: str, config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs", mode, "--config", str(config), *extra], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_an_output_folder_belongs_to_one_job_and_the_command_line_names_what_to_fix(tmp_path: Path) -> None:
    """Catalogue names stand for whole entries; the base's evaluation has a folder of its own beside the fine-tune's;
    the same folder with other settings, an adapter folder without an adapter and an unknown base each get one line."""
    job = tmp_path / "job.yaml"
    job.write_text(f"base_model: tiny-llama\ntask: demo_sentiment\noutput_dir: {tmp_path / 'out'}\ndevice: cpu\n"
                   "lora: {target_modules: all-linear}\nevaluation: {limit: 4}\n"
                   "training: {max_steps: 2, micro_batch_size: 4, gradient_accumulation_steps: 1, "
                   "gradient_checkpointing: false}\n")
    base = run_cli("evaluate", job)
    assert base.returncode == 0, base.stderr[-2000:]
    trained = run_cli("train", job)
    assert trained.returncode == 0, trained.stderr[-2000:]
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    # trained, not the base's result
    assert summary["steps"] == 2 and summary["adapter_dir"] == str(tmp_path / "out" / "adapter")
    assert json.loads((tmp_path / "out" / "evaluate_base" / "job.json").read_text())["kind"] == "evaluate_base"

    job.write_text(job.read_text().replace("max_steps: 2", "max_steps: 3"))
    cases = [(run_cli("train", job),
              f"output_dir {tmp_path / 'out'}: holds a job with other settings (training.max_steps 2 -> 3)"),
             (run_cli("evaluate", job, "--adapter", str(tmp_path)), "holds no adapter_model.safetensors"),
             (run_cli("train", write(tmp_path / "unknown.yaml", job.read_text().replace("tiny-llama", "tiny-nope"))),
              "base_model: unknown base model 'tiny-nope'")]
    for out, message in cases:
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["summary"]["steps"] == 2  # nothing done was lost


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_gradient_checkpointing_with_cosine_warmup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp_calls: list[int] = []
    forward = LlamaMLP.forward

    def counted_forward(self: LlamaMLP, x: torch.Tensor) -> torch.Tensor:
        mlp_calls.append(1)
        return forward(self, x)

    def recorder(seen: list[tuple[int, float, float]]) -> StepCallback:
        def on_step(step: int, metrics: dict[str, float]) -> None:
            seen.append((step, metrics["learning_rate"], metrics["loss"]))

        return on_step

    monkeypatch.setattr(LlamaMLP, "forward", counted_forward)
    settings: dict[str, Any] = dict(max_steps=10, warmup_ratio=0.3, lr_scheduler="cosine", learning_rate=1e-2,
                                    micro_batch_size=4, log_every=1)
    runs = {}
    for checkpointing in (True, False):
        mlp_calls.clear()
        seen: list[tuple[int, float, float]] = []
        _, model, _ = train(tiny_job(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, **settings),
                            on_step=recorder(seen))
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        runs[checkpointing] = (seen, len(mlp_calls))
    (seen, calls), (plain, plain_calls) = runs[True], runs[False]
    assert calls == 2 * plain_calls > 0, "with checkpointing every block is run again in the backward pass"
    assert [loss for *_, loss in seen] == pytest.approx([loss for *_, loss in plain], rel=1e-5)
    assert seen[-1][2] < seen[0][2]
    # 3 warm-up steps (0.3 x 10) rising linearly to the peak, then cosine decay to 0 at step 10.
    peak, warmup = 1e-2, 3
    expected = [peak * s / warmup if s <= warmup
                else peak * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (10 - warmup))) for s in range(1, 11)]
    assert [step for step, *_ in seen] == list(range(1, 11))
    assert [lr for _, lr, _ in seen] == pytest.approx(expected, abs=1e-12)
    rates = [lr for _, lr, _ in seen]
    assert rates[:3] == sorted(rates[:3]) and rates[2:] == sorted(rates[2:], reverse=True)
    assert rates[-1] == pytest.approx(0.0)


def test_loss_covers_only_completion_tokens_in_a_packed_batch() -> None:
    spec = load_catalog().base_model("tiny-llama")
    tokenizer = load_tokenizer(spec)
    task = load_catalog().task("demo_sentiment")
    pairs = [(prompt_for(task, row), completion_for(task, row)) for row in train_rows(task, 3)]
    pairs.append(("Review: " + "very " * 100 + "good\nSentiment:", "positive"))  # too long: the prompt's start is cut
    max_len = 40
    examples = [encode_example(tokenizer, prompt, completion, max_len) for prompt, completion in pairs]
    assert [len(e.input_ids) < max_len for e in examples] == [True, True, True, False]
    (packed,) = make_batches(examples, 4, max_len, True, tokenizer.pad_token_id)
    ids, labels, positions = packed["input_ids"][0], packed["labels"][0], packed["position_ids"][0]
    assert "attention_mask" not in packed and ids.numel() == sum(len(e.input_ids) for e in examples)  # no padding
    starts = positions.eq(0).nonzero().flatten().tolist()
    assert len(starts) == len(pairs)
    completion_mask = torch.zeros_like(ids, dtype=torch.bool)
    for (prompt, completion), start, end in zip(pairs, starts, starts[1:] + [len(ids)]):
        segment, segment_labels = ids[start:end], labels[start:end]
        answer = len(tokenizer(" " + completion, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        assert segment_labels[:-answer].eq(IGNORE).all(), "every prompt token is ignored"
        assert segment_labels[-answer:].tolist() == segment[-answer:].tolist()
        assert tokenizer.decode(segment[-answer:]) == " " + completion + tokenizer.eos_token
        shown = tokenizer.decode(segment[:-answer], skip_special_tokens=True)
        assert isinstance(shown, str)
        if len(segment) < max_len:
            assert shown == prompt
        else:  # cut to max_len by dropping the prompt's start: its end (the cue) and the completion stay whole
            assert len(segment) == max_len and prompt.endswith(shown) and len(shown) < len(prompt)
        completion_mask[end - answer : end] = True
    (padded,) = make_batches(examples, 4, max_len, False, tokenizer.pad_token_id)
    padding = padded["attention_mask"].eq(0)
    assert padding.any() and padded["labels"][padding].eq(IGNORE).all()
    assert padded["input_ids"][padding].eq(tokenizer.pad_token_id).all()
    # The loss training minimises is the mean cross-entropy of exactly the completion tokens.
    model = load_base_model(spec, QuantizationSettings(), "cpu").eval()
    with torch.no_grad():
        out = model(**packed, use_cache=False)
    targets = completion_mask[1:]
    manual = torch.nn.functional.cross_entropy(out.logits[0, :-1][targets], ids[1:][targets])
    assert float(out.loss) == pytest.approx(float(manual), rel=1e-5)
    # Training computes it with the LM head at the answer positions only: the same per token, packed or padded rows.
    with torch.no_grad():
        assert float(answer_token_losses(model, packed).sum() / targets.sum()) == pytest.approx(float(manual), rel=1e-5)
        padded_loss = model(**padded, use_cache=False).loss
        padded_labels = int(padded["labels"][:, 1:].ne(IGNORE).sum())
        kept_loss = float(answer_token_losses(model, padded).sum() / padded_labels)
        assert kept_loss == pytest.approx(float(padded_loss), rel=1e-5)


def test_a_tracked_job_logs_its_own_task_and_training_rows_from_a_users_catalogue(mlflow_server,
                                                                                  tmp_path: Path) -> None:
    """A task only a user's catalogue has (a renamed, re-worded copy of a demo task): the tracker logs that task's tags
    and the rows the job trained on (their prompts as the job rendered them), from the job itself; result.json stays
    without them."""
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    from tracking import store
    from tracking.tracker import JobTracker

    shipped = load_catalog()
    mine = shipped.task("demo_sentiment").model_copy(update={
        "name": "my_reviews", "category": "classic_nlp", "prompt": "My review: {{ review }}\nVerdict:"})
    assert "my_reviews" not in shipped.tasks
    data = {"job_key": "user-catalogue/tiny-llama/my_reviews/train", "base_model": "tiny-llama", "task": "my_reviews",
            "output_dir": str(tmp_path / "job"), "device": "cpu", "evaluation": {"limit": 4},
            "training": {"max_steps": 2, "micro_batch_size": 4, "gradient_accumulation_steps": 1,
                         "gradient_checkpointing": False, "max_train_examples": 24}}
    config = parse_job_config(data, "job.yaml", Catalog(shipped.base_models, {"my_reviews": mine}))
    experiment_id = store.ensure_experiment("user-catalogue", mlflow_server.uri)
    with JobTracker.for_job(config, experiment_id, uri=mlflow_server.uri, system_metrics=False,
                            register=False) as tracker:
        result = run_job(config, on_step=tracker.on_step)
        tracker.finish(result, base_score=0.0)

    run = store.client(mlflow_server.uri).get_run(tracker.run_id)
    assert run.data.tags[store.TAG_TASK] == "my_reviews" and run.data.tags[store.TAG_CATEGORY] == "classic_nlp"
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
              for d in run.inputs.dataset_inputs}
    training = inputs["training"]
    rows = train_rows(mine, 24)
    trained_on = pd.DataFrame({"prompt": [training_prompt(config, row) for row in rows],
                               "completion": [completion_for(mine, row) for row in rows]})
    assert trained_on["prompt"][0].startswith("My review: ")
    assert training.name == "my_reviews-training" and json.loads(training.profile)["num_rows"] == 24
    assert training.digest == from_pandas(trained_on, targets="completion").digest  # the very rows, not the demo task's
    assert json.loads(training.source)["tags"]["loraland.source"] == "demo:sentiment"
    saved = json.loads((tmp_path / "job" / "result.json").read_text())
    assert "training_examples" not in saved and saved["task"] == "my_reviews"
