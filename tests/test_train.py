"""Jobs: real 4-bit QLoRA training on the CPU, resume, out-of-memory back-off, runs without Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from jobs.config import dump_yaml
from jobs.run import run_job
from jobs.train import CHECKPOINT_DIR, TrainingError, encode_example, latest_checkpoint, make_batches, train
from jobs.models import load_tokenizer
from tests.helpers import tiny_job

pytestmark = pytest.mark.slow


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


class Stop(Exception):
    pass


def test_resume_continues_the_same_trajectory(tmp_path: Path) -> None:
    settings = dict(max_steps=12, checkpoint_every=4, micro_batch_size=4, log_every=1)
    straight, _, _ = train(tiny_job(tmp_path / "straight", **settings))

    def crash_at_6(step: int, metrics: dict[str, float]) -> None:
        if step == 6:
            raise Stop

    interrupted = tiny_job(tmp_path / "interrupted", **settings)
    with pytest.raises(Stop):
        train(interrupted, on_step=crash_at_6)
    assert latest_checkpoint(tmp_path / "interrupted" / CHECKPOINT_DIR).name == "step-00000004"
    (tmp_path / "interrupted" / CHECKPOINT_DIR / ".staging-00000008-1").mkdir()  # a save killed half-way
    resumed, _, _ = train(interrupted)
    assert resumed.summary["resumed_from_step"] == 4
    a = load_file(str(Path(straight.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.adapter_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_out_of_memory_halves_micro_batch_keeps_effective_batch(tmp_path: Path) -> None:
    raised: list[int] = []

    def oom_once_at_step_3(step: int) -> None:
        if step == 3 and not raised:
            raised.append(step)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    result, _, _ = train(tiny_job(tmp_path, max_steps=6, micro_batch_size=8, gradient_accumulation_steps=2), fault=oom_once_at_step_3)
    assert raised == [3]
    assert result.summary["steps"] == 6
    assert result.summary["oom_backoffs"] == 1
    assert result.summary["final_micro_batch_size"] == 4
    assert result.summary["final_gradient_accumulation_steps"] == 4  # 8 x 2 == 4 x 4


def test_out_of_memory_at_the_floor_fails_clearly(tmp_path: Path) -> None:
    def always_oom(step: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    with pytest.raises(TrainingError, match="micro_batch_size 1 .*max_seq_length"):
        train(tiny_job(tmp_path, max_steps=2, micro_batch_size=4), fault=always_oom)


def test_packing_is_padding_free_and_equals_padded_loss() -> None:
    from jobs.catalog import load_catalog
    from jobs.config import LoraSettings, QuantizationSettings
    from jobs.models import attach_lora, load_base_model

    spec = load_catalog().base_model("tiny-mistral")
    tokenizer = load_tokenizer(spec)
    examples = [encode_example(tokenizer, "Review: " + "very " * n + "good\nSentiment:", "positive", 64) for n in (1, 9, 3)]
    packed = make_batches(examples, 3, 64, True, tokenizer.pad_token_id)
    padded = make_batches(examples, 3, 64, False, tokenizer.pad_token_id)
    assert len(packed) == 1 and packed[0]["input_ids"].numel() == sum(len(e.input_ids) for e in examples)
    assert padded[0]["input_ids"].numel() == 3 * max(len(e.input_ids) for e in examples)
    model = attach_lora(load_base_model(spec, QuantizationSettings(), "cpu"), LoraSettings(dropout=0.0), False).eval()
    with torch.no_grad():
        losses = [float(model(**batch[0], use_cache=False).loss) for batch in (packed, padded)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_jobs_run_without_ray_from_the_command_line(tmp_path: Path) -> None:
    config = tiny_job(tmp_path / "job", max_steps=3, eval_limit=4)
    dump_yaml(config, tmp_path / "job.yaml")
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(tmp_path / "job.yaml")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and 0.0 <= summary["score"] <= 1.0
    out = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--config", str(tmp_path / "job.yaml"), "--adapter", summary["adapter_dir"]],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["examples"] == 4
    (tmp_path / "bad.yaml").write_text("kind: train\nbase_model: {}\n")
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(tmp_path / "bad.yaml")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "task: Field required" in out.stderr
