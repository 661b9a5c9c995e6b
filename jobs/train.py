"""QLoRA fine-tuning of one (base model, task) job.

- The base is loaded in 4-bit nf4 with double quantization; LoRA is attached with PEFT.
- Loss is on completion tokens only. With `packing`, the examples of one optimizer step are packed
  padding-free into rows of at most `micro_batch_size * max_seq_length` tokens (position ids restart
  per example, so attention never crosses examples); the loss is the token mean over the whole step,
  exactly as for one padded batch of the same examples.
- Every `checkpoint_every` steps the adapter, optimizer, scheduler, RNG and data position are saved
  atomically; a job started again on the same `output_dir` continues the same trajectory. An object-store
  `output_dir` (s3://...) is mirrored from a local scratch folder (`jobs/storage.py`).
- A CUDA out-of-memory halves the micro-batch and doubles accumulation (same effective batch); packed,
  it halves the tokens of one forward pass (same examples per step) until each pass holds one example.

Run alone: `python -m jobs train --config job.yaml` (trains, evaluates, writes result.json; see jobs/cli.py).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase, get_scheduler

from core.errors import UserError
from core.paths import ADAPTER_WEIGHTS
from core.prompts import Examples, completion_for, prompt_for
from core.schemas import TrainingSettings
from jobs.checkpoints import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    AdapterWriter,
    TrainState,
    latest_checkpoint,
    load_trainer_state,
    save_adapter,
    save_checkpoint,
    set_rng_state,
)
from jobs.config import JobConfig
from jobs.data import example_rows, train_rows
from jobs.encoding import IGNORE, Example, encode_example
from jobs.models import attach_lora, load_base_model, load_tokenizer, resolve_device
from jobs.peak_memory import peak_memory_mb
from jobs.storage import JobStorage

TRAINING_SAMPLE = 1000  # training examples a result carries (in memory only) for the tracker to log as the run's input


class StepCallback(Protocol):
    """Receives step metrics (loss, learning_rate, tokens_per_second, ...) every `log_every` steps."""

    def __call__(self, step: int, metrics: dict[str, float]) -> None: ...


class TrainingError(UserError, RuntimeError):
    """A job cannot go on (out of memory at the micro-batch floor, an empty training split); the message says what
    the user changes."""


@dataclass
class TrainResult:
    """What training hands on: the adapter folder (safetensors), a summary of the run, and the first `TRAINING_SAMPLE`
    training examples as trained on (prompt, completion)."""

    adapter_dir: str
    summary: dict[str, float]
    history: list[dict[str, float]]
    examples: list[dict[str, str]] = field(default_factory=list)


@dataclass
class TrainingSet:
    """A job's training examples, tokenized, and the first `TRAINING_SAMPLE` of them as text (prompt, completion)."""

    examples: list[Example]
    sample: list[dict[str, str]]


# --------------------------------------------------------------------------- data


class DataOrder:
    """A fresh seeded permutation per epoch; the example at any data position is known without state."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._epochs: dict[int, list[int]] = {}

    def index(self, cursor: int) -> int:
        epoch, offset = divmod(cursor, self.size)
        if epoch not in self._epochs:
            order = list(range(self.size))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epochs = {epoch: order}
        return self._epochs[epoch][offset]


def make_batches(examples: list[Example], micro_batch_size: int, max_seq_length: int, packing: bool, pad_id: int,
                 pass_tokens: int = 0) -> list[dict[str, torch.Tensor]]:
    """Forward-pass inputs for one optimizer step's examples.

    Packed: rows of at most `pass_tokens` (default `micro_batch_size * max_seq_length`) tokens, no padding,
    position ids restarting per example; an example longer than that is a row of its own. Unpacked:
    `micro_batch_size` examples per pass, padded to the longest.
    """
    if not packing:
        return [_padded(examples[i : i + micro_batch_size], pad_id) for i in range(0, len(examples), micro_batch_size)]
    budget = pass_tokens or micro_batch_size * max_seq_length
    rows: list[list[Example]] = [[]]
    for example in examples:
        if rows[-1] and sum(len(e.input_ids) for e in rows[-1]) + len(example.input_ids) > budget:
            rows.append([])
        rows[-1].append(example)
    return [_packed(row) for row in rows]


def _packed(row: list[Example]) -> dict[str, torch.Tensor]:
    ids = [t for e in row for t in e.input_ids]
    labels = [t for e in row for t in e.labels]
    positions = [p for e in row for p in range(len(e.input_ids))]
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
    }


def _padded(row: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in row)
    pad = [width - len(e.input_ids) for e in row]
    return {
        "input_ids": torch.tensor([e.input_ids + [pad_id] * p for e, p in zip(row, pad)]),
        "labels": torch.tensor([e.labels + [IGNORE] * p for e, p in zip(row, pad)]),
        "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * p for e, p in zip(row, pad)]),
    }


def training_prompt(config: JobConfig, row: dict[str, Any], examples: Examples = ()) -> str:
    """A training row's prompt, as `evaluation.prompt_cut` sets up the job; `examples` are the task's worked examples
    (`jobs.data.example_rows`), the same as its evaluation prompts show.

    `study`: the whole prompt, no character cut. The study's 1,500-character cut belongs to its evaluation harness (the
    request-preparation script); its training config capped sequences in tokens (prompt 1,194, all 1,196: see
    shared/reference/lora_land_task_formats.yaml, defaults.training_config_figure), as `training.max_seq_length` does
    here (`encode_example`). Cutting training prompts at 1,500 characters from the front would train long-input tasks
    (jigsaw, customer_support) on prompts without their input or cue, which the study did not do.
    `keep_cue`: the same cue-keeping cut to `prompt_max_chars` as evaluation, so training and evaluation prompts match.
    """
    settings = config.evaluation
    max_chars = settings.prompt_max_chars if settings.prompt_cut == "keep_cue" else None
    return prompt_for(config.task, row, max_chars, cut="keep_cue", examples=examples)


def training_set(config: JobConfig, tokenizer: PreTrainedTokenizerBase, held_out: int = 0) -> TrainingSet:
    """Every training row of the job's task (but a search's `held_out` validation rows), tokenized (prompts from
    `training_prompt`), and the first rows as text."""
    rows = train_rows(config.task, config.training.max_train_examples, held_out)
    if not rows:
        raise TrainingError(f"task {config.task.name}: the training split is empty")
    worked = example_rows(config.task)
    examples: list[Example] = []
    sample: list[dict[str, str]] = []
    for row in rows:
        prompt, completion = training_prompt(config, row, worked), completion_for(config.task, row)
        examples.append(encode_example(tokenizer, prompt, completion, config.training.max_seq_length))
        if len(sample) < TRAINING_SAMPLE:
            sample.append({"prompt": prompt, "completion": completion})
    return TrainingSet(examples, sample)


def tokenize_task(config: JobConfig, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    """Every training row of the job's task, tokenized (`training_set`'s examples)."""
    return training_set(config, tokenizer).examples


# --------------------------------------------------------------------------- the loop


def make_optimizer(model: torch.nn.Module, settings: TrainingSettings, device: str) -> torch.optim.Optimizer:
    """Paged AdamW (bitsandbytes) on a GPU, torch AdamW on a CPU, unless the config names one; over the model's
    trainable parameters."""
    return optimizer_for([p for p in model.parameters() if p.requires_grad], settings, device)


def optimizer_for(params: list[torch.nn.Parameter], settings: TrainingSettings, device: str) -> torch.optim.Optimizer:
    """`make_optimizer` over the given parameters."""
    name = settings.optimizer
    if name == "auto":
        name = "paged_adamw_32bit" if device == "cuda" else "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    import bitsandbytes as bnb

    optimizer_class = bnb.optim.PagedAdamW32bit if name == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    return optimizer_class(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainingSettings) -> Any:
    """The learning-rate schedule: linear warm-up over `warmup_ratio` of the steps, then the configured decay."""
    return get_scheduler(settings.lr_scheduler if settings.lr_scheduler != "constant" else "constant_with_warmup",
                         optimizer, num_warmup_steps=math.ceil(settings.warmup_ratio * settings.max_steps),
                         num_training_steps=settings.max_steps)


def answer_token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward one pass; the cross-entropy of each position's next token where that token is labelled, [rows, kept]
    (0 where a row's token is not labelled). The LM head runs only at the positions that predict a labelled token in
    some row (`logits_to_keep`): a prompt position's logits, a [tokens x vocabulary] float32 tensor and its gradient,
    would be computed only to be ignored. Per token, the same values as the model's own loss over all positions."""
    labels = batch["labels"]
    keep = (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)  # positions whose next token has a label
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # [rows, kept, vocabulary]
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels[:, keep + 1], ignore_index=IGNORE,
                                             reduction="none")


def labelled_tokens(batches: list[dict[str, torch.Tensor]]) -> int:
    """The tokens a step's loss is the mean over (the labelled ones; at least 1, so a step with none has loss 0)."""
    return max(1, sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches))


def tokens_in(batch: dict[str, torch.Tensor]) -> int:
    """A forward pass's tokens, padding not counted."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def _forward_backward(model: PeftModel, batches: list[dict[str, torch.Tensor]], device: str) -> tuple[float, int]:
    """Accumulate gradients of the step's token-mean loss; returns (loss, non-padding tokens)."""
    label_tokens = labelled_tokens(batches)
    total_loss, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = answer_token_losses(model, batch).sum() / label_tokens
        loss.backward()
        total_loss += float(loss.detach())
        tokens += tokens_in(batch)
    return total_loss, tokens


Fault = Callable[[int], None]


class JobTrainer:
    """One job's optimisation around its adapter's trainable weights: data order, optimizer, schedule, state,
    checkpoints and step logs. `train` drives one over a PeftModel; a group (jobs/cotrain.py) drives one per member."""

    def __init__(self, config: JobConfig, adapter: AdapterWriter, params: list[torch.nn.Parameter], data: TrainingSet,
                 device: str, on_step: StepCallback | None = None) -> None:
        self.config, self.settings, self.adapter, self.params = config, config.training, adapter, params
        self.examples, self.sample, self.device, self.on_step = data.examples, data.sample, device, on_step
        self.optimizer = optimizer_for(params, self.settings, device)
        self.scheduler = make_scheduler(self.optimizer, self.settings)
        self.storage = JobStorage(config.output_dir)
        self.root = self.storage.local / CHECKPOINT_DIR
        self.state = TrainState(micro_batch_size=self.settings.micro_batch_size,
                                gradient_accumulation_steps=self.settings.gradient_accumulation_steps)
        self.order = DataOrder(len(self.examples), self.settings.seed)
        self.resumed_from = 0
        self.started = self.window_start = time.perf_counter()
        self.window_tokens = 0

    def resume(self, restore_weights: Callable[[dict[str, torch.Tensor]], None]) -> dict[str, Any] | None:
        """Continue from the newest checkpoint of `output_dir` (pulled from its store), if any: weights (through
        `restore_weights`), optimizer, schedule and state. Returns the checkpoint's RNG state, None on a fresh start."""
        self.storage.pull_checkpoint(CHECKPOINT_DIR)
        checkpoint = latest_checkpoint(self.root)
        if checkpoint is None:
            return None
        restore_weights(load_file(str(checkpoint / ADAPTER_WEIGHTS)))
        self.state, rng = load_trainer_state(checkpoint, self.optimizer, self.scheduler)
        self.resumed_from = self.state.step
        self.start_clock()
        return rng

    def start_clock(self) -> None:
        """Time training (the summary's wall time and tokens/s, the step logs' tokens/s) from now."""
        self.started = self.window_start = time.perf_counter()

    @property
    def done(self) -> bool:
        """Whether the job has run its `max_steps`."""
        return self.state.step >= self.settings.max_steps

    def step_examples(self) -> list[Example]:
        """The next optimizer step's examples (one effective batch from the data position)."""
        effective_batch = self.settings.micro_batch_size * self.settings.gradient_accumulation_steps
        return [self.examples[self.order.index(self.state.cursor + i)] for i in range(effective_batch)]

    def finish_step(self, loss: float, tokens: int) -> None:
        """Apply the accumulated gradients (clipped at norm 1), advance schedule and data position; checkpoint and
        report metrics when due."""
        settings, state = self.settings, self.state
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.cursor += settings.micro_batch_size * settings.gradient_accumulation_steps
        state.trained_tokens += tokens
        self.window_tokens += tokens
        if state.step % settings.checkpoint_every == 0 or state.step == settings.max_steps:
            saved = save_checkpoint(self.root, self.adapter, self.optimizer, self.scheduler, state,
                                    settings.keep_checkpoints)
            self.storage.push_checkpoint(CHECKPOINT_DIR, saved.name)
        if state.step % settings.log_every == 0 or state.step == settings.max_steps:
            now = time.perf_counter()
            metrics = {"loss": loss, "learning_rate": self.scheduler.get_last_lr()[0],
                       "tokens_per_second": self.window_tokens / max(now - self.window_start, 1e-9),
                       "micro_batch_size": float(state.micro_batch_size)}
            state.history.append({"step": float(state.step), **metrics})
            self.window_start, self.window_tokens = now, 0
            if self.on_step:
                self.on_step(state.step, metrics)

    def finish(self) -> TrainResult:
        """Save the final adapter into `output_dir` (and its store); the result with the run's summary."""
        wall = time.perf_counter() - self.started
        adapter_dir = save_adapter(self.adapter, self.config, self.storage.local)
        self.storage.push(ADAPTER_DIR)
        state, settings = self.state, self.settings
        summary = {
            "train_loss": state.history[-1]["loss"] if state.history else float("nan"),
            "steps": float(state.step),
            "trained_tokens": float(state.trained_tokens),
            "train_tokens_per_second": state.trained_tokens / max(wall, 1e-9) if self.resumed_from == 0
            else float("nan"),
            "train_wall_time_s": wall,
            "peak_memory_mb": peak_memory_mb(self.device),
            "final_micro_batch_size": float(state.micro_batch_size),
            "final_gradient_accumulation_steps": float(state.gradient_accumulation_steps),
            "final_pass_tokens": float(state.pass_tokens or state.micro_batch_size * settings.max_seq_length)
            if settings.packing else float("nan"),
            "oom_backoffs": float(state.oom_backoffs),
            "resumed_from_step": float(self.resumed_from),
        }
        return TrainResult(str(adapter_dir), summary, state.history, self.sample)


def train(config: JobConfig, model: PeftModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
          on_step: StepCallback | None = None, fault: Fault | None = None
          ) -> tuple[TrainResult, PeftModel, PreTrainedTokenizerBase]:
    """Fine-tune the job's adapter, resuming from `output_dir`'s latest checkpoint; returns the result and the model.

    `fault(step)` is called before each forward-backward attempt (tests inject out-of-memory there).
    """
    settings = config.training
    device = resolve_device(config.device)
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    tokenizer = tokenizer or load_tokenizer(config.base_model)
    model = model or attach_lora(load_base_model(config.base_model, config.quantization, device), config.lora,
                                 settings.gradient_checkpointing)
    model.train()
    data = training_set(config, tokenizer)
    trainer = JobTrainer(config, model, [p for p in model.parameters() if p.requires_grad], data, device, on_step)
    rng = trainer.resume(lambda tensors: set_peft_model_state_dict(model, tensors))
    if rng is not None:
        set_rng_state(rng)
    while not trainer.done:
        loss, tokens = _train_step(model, trainer.step_examples(), trainer.state, settings, device,
                                   tokenizer.pad_token_id, fault)
        trainer.finish_step(loss, tokens)
    return trainer.finish(), model, tokenizer


def _train_step(model: PeftModel, step_examples: list[Example], state: TrainState, settings: TrainingSettings,
                device: str, pad_id: int, fault: Fault | None) -> tuple[float, int]:
    """One optimizer step's gradients; on out-of-memory make the forward passes smaller (`back_off`) and retry."""
    while True:
        batches = make_batches(step_examples, state.micro_batch_size, settings.max_seq_length, settings.packing,
                               pad_id, state.pass_tokens)
        try:
            if fault:
                fault(state.step)
            return _forward_backward(model, batches, device)
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            back_off(state, settings, max(examples_in(batch) for batch in batches))


def examples_in(batch: dict[str, torch.Tensor]) -> int:
    """Examples in one forward pass: rows of a padded batch, position-id restarts of a packed row."""
    return int((batch["position_ids"] == 0).sum()) if "position_ids" in batch else len(batch["input_ids"])


def back_off(state: TrainState, settings: TrainingSettings, most_per_pass: int) -> None:
    """After an out-of-memory, the same examples per step in smaller forward passes: half the micro-batch and twice the
    accumulation (down to `min_micro_batch_size`); packed, with a micro-batch of 1, half the tokens of a pass, down to
    one example per pass. Past the floor, a TrainingError saying what to change."""
    if state.micro_batch_size // 2 >= settings.min_micro_batch_size:
        state.micro_batch_size //= 2
        state.gradient_accumulation_steps *= 2
        state.pass_tokens = state.micro_batch_size * settings.max_seq_length if settings.packing else 0
    elif settings.packing and most_per_pass > 1:
        state.pass_tokens = max((state.pass_tokens or state.micro_batch_size * settings.max_seq_length) // 2, 1)
    else:
        floor = "one example per forward pass" if settings.packing else f"floor {settings.min_micro_batch_size}"
        raise TrainingError(f"out of memory at step {state.step} with micro_batch_size {state.micro_batch_size} "
                            f"({floor}); lower training.max_seq_length or use a GPU with more memory")
    state.oom_backoffs += 1
