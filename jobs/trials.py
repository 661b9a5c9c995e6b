"""Search trials co-trained over one base: `TrialHost`, the process a search's trials of one base model train in.

- The base is loaded once (4-bit as a job loads it); up to `slots` trials are members of one co-training group over
  it (jobs/cotrain.py's `Group`, jobs/group_lora.py's layers): each trial its own LoRA rank, alpha, dropout, target
  modules, learning rate, schedule, data order and checkpoints (a single job's, `jobs.train.JobTrainer`).
- Trials that are training at the same time share steps: one forward/backward pass over all of them (each row through
  its own trial's adapter); a trial training alone steps alone. With LoRA dropout 0 a trial ends with the same adapter
  as the same trial trained alone, whoever it shared steps with and whenever they joined.
- Trials stay in step: a trial that asks for steps while others on the host are between calls (being validated,
  saved, reported) waits for them, so that they step together instead of one after another, until the host has been
  idle `gather_s`; a trial that does not come back by then is not waited for again until it asks for steps
  (`trial_steps / group_steps` is the trials per shared step).
- A trial trains on its task's training rows but the validation slice (`jobs.data.validation_rows`, never an
  evaluation row) and is scored on that slice by its task's metric (greedy generation, jobs/evaluate.py's scoring).
- `drop` frees a trial's place: the next trial takes it without reloading the base. A trial added again resumes from
  its newest checkpoint in its `output_dir`.
- Thread-safe: one caller thread per trial (e.g. a Ray actor's threads serving Tune's trials); one of the waiting
  threads runs each shared step while the others wait for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.errors import ConfigError, NotFound
from core.prompts import CODE_METRIC
from core.schemas import BaseModelSpec, QuantizationSettings, TaskSpec
from jobs.checkpoints import CHECKPOINT_DIR, checkpoint_name, latest_checkpoint, save_checkpoint
from jobs.config import JobConfig
from jobs.cotrain import Group, Member
from jobs.data import Row, example_rows, validation_rows
from jobs.evaluate import evaluation_request, generate, score_evaluation
from jobs.group_lora import GroupLoraLinear, Routing, bare_layers, initial_adapter, unwrap_member, wrap_member
from jobs.models import load_base_model, load_tokenizer, prepare_for_training, resolve_device
from jobs.train import JobTrainer, TrainingError, TrainingSet, training_set

DEFAULT_VALIDATION_ROWS = 64
DEFAULT_GATHER_S = 1.0  # how long a trial waits for the host's other trials to ask for their next steps
BaseLoader = Callable[[BaseModelSpec, QuantizationSettings, str], PreTrainedModel]


class TrialFailed(TrainingError):
    """A trial cannot go on (e.g. its loss is not finite); the others are unaffected. The message says what to
    change."""


@dataclass
class Trial:
    """A trial on the host: its group member, the step its caller waits for, the loss records already returned, and
    whether the host stopped waiting for it to ask for more steps (until it does)."""

    id: str
    member: Member
    until: int = 0
    reported: int = 0
    given_up: bool = False

    @property
    def behind(self) -> bool:
        """Whether it still has steps to train before `until`."""
        return self.member.training and self.member.trainer.state.step < self.until

    @property
    def awaited(self) -> bool:
        """Whether a shared step should wait for it: it has steps left but has not asked for them yet (its caller is
        between calls), and the host has not given up on it."""
        return self.member.training and not self.behind and not self.given_up


class TrialHost:
    """Up to `slots` trials co-trained over one base model loaded once (see the module doc)."""

    def __init__(self, base: BaseModelSpec, quantization: QuantizationSettings, device: str, slots: int, *,
                 validation_size: int = DEFAULT_VALIDATION_ROWS, load_base: BaseLoader = load_base_model,
                 gather_s: float = DEFAULT_GATHER_S) -> None:
        """`validation_size`: the rows of each task's validation slice (held out of its trials' training);
        `load_base`: how the base is loaded (tests count the loads); `gather_s`: how long a step waits for the trials
        between calls (see the module doc)."""
        if slots < 1:
            raise ConfigError("trial host", [f"slots: {slots}; a host holds at least one trial"])
        self.base, self.quantization, self.device = base, quantization, resolve_device(device)
        self.slots, self.validation_size, self.gather_s = slots, validation_size, gather_s
        self.model = load_base(base, quantization, self.device)
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(base)
        self.gradient_checkpointing: bool | None = None  # set by the first trial (the base is prepared for it then)
        self.routing, self.layers = Routing(), dict[str, GroupLoraLinear]()
        self.group = Group(self.model, self.routing, [], self.tokenizer.pad_token_id, self.device, None)
        self.group.members_per_pass = slots
        self.group_steps = 0  # shared steps run (one forward/backward over every trial that was due)
        self.trial_steps = 0  # the trials' steps those ran (trial_steps / group_steps: trials per shared step)
        self._trials: dict[str, Trial] = {}
        self._validation: dict[str, tuple[list[Row], list[Row]]] = {}  # task -> validation rows, worked examples
        self._data: dict[tuple[Any, ...], TrainingSet] = {}  # tokenized training rows, shared by trials of one task
        self._data_lock = threading.Lock()
        self._busy = False  # a step, an addition, a validation, a save or a drop is running
        self._joining = 0  # callers adding a trial (tokenizing its rows, waiting for a place, building its member)
        self._changed = threading.Condition()

    # ----------------------------------------------------------------------- the interface

    def train(self, trial_id: str, job: JobConfig, until_step: int) -> list[dict[str, float]]:
        """Train trial `trial_id` (added with `job`'s settings if new, resuming from its newest checkpoint in
        `job.output_dir`) until it has run `until_step` steps (at most its `max_steps`), sharing steps with the trials
        training meanwhile; returns its loss records (`{"step", "loss", ...}`, every `log_every` steps) since the last
        call. Waits for a free place if all `slots` are taken. A trial that failed raises TrialFailed (drop it)."""
        trial = self._join(trial_id, job, until_step)
        while self._step_towards(trial):
            pass
        if trial.member.error:
            raise TrialFailed(trial.member.error)
        history = trial.member.trainer.state.history
        records, trial.reported = history[trial.reported :], len(history)
        return records

    def validate(self, trial_id: str) -> float:
        """Trial `trial_id`'s score by its task's metric on its task's validation slice (greedy generation)."""
        with self._exclusive():
            member = self._trial(trial_id).member
            rows, examples = self._validation_rows(member.config.task)
            self.routing.use(member.index)
            try:
                return validation_score(self.model, self.tokenizer, member.config, rows, examples)
            finally:
                self.routing.use(None)
                self.model.train()

    def save(self, trial_id: str) -> str:
        """Write trial `trial_id`'s checkpoint (to resume from) and its adapter (PEFT's format, as a job's) into its
        `output_dir`; returns the adapter folder."""
        with self._exclusive():
            member = self._trial(trial_id).member
            if member.error:
                raise TrialFailed(member.error)
            trainer = member.trainer
            if not checkpointed(trainer.root, trainer.state.step):  # training wrote none at this step
                saved = save_checkpoint(trainer.root, member.adapter, trainer.optimizer, trainer.scheduler,
                                        trainer.state, trainer.settings.keep_checkpoints)
                trainer.storage.push_checkpoint(CHECKPOINT_DIR, saved.name)
            return trainer.finish().adapter_dir

    def drop(self, trial_id: str) -> None:
        """Free trial `trial_id`'s place (its adapter leaves the base's layers); the next trial takes it."""
        with self._exclusive():
            trial = self._trials.pop(trial_id, None)
            if trial is None:
                return
            self.group.members.remove(trial.member)
            unwrap_member(self.layers, trial.member.index)
            trial.member.fail(f"trial {trial_id} was dropped")
            if self.device == "cuda":
                torch.cuda.empty_cache()

    @property
    def trials(self) -> list[str]:
        """The trials on the host now."""
        with self._changed:
            return list(self._trials)

    def resumed_from(self, trial_id: str) -> int:
        """The step trial `trial_id` resumed from (its newest checkpoint) when it joined this host; 0: from scratch."""
        with self._changed:
            return self._trial(trial_id).member.trainer.resumed_from

    # ----------------------------------------------------------------------- inside

    @contextmanager
    def _exclusive(self, ready: Callable[[], bool] = lambda: True) -> Iterator[None]:
        """Run alone (no step, addition, validation, save or drop meanwhile), once `ready()` holds."""
        with self._changed:
            self._changed.wait_for(lambda: not self._busy and ready())
            self._busy = True
        try:
            yield
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()

    def _step_towards(self, trial: Trial) -> bool:
        """Run one shared step of every trial that is behind, unless another thread is running one (then wait for it);
        before it, wait for the trials between calls (`Trial.awaited`) until the host has been idle `gather_s`. False
        once `trial` is no longer behind."""
        deadline = time.monotonic() + self.gather_s
        with self._changed:
            while trial.behind and (self._busy or self._awaited()):
                if self._busy:  # a validation or save of a trial we wait for, say: its time is not waiting time
                    self._changed.wait()
                    deadline = time.monotonic() + self.gather_s
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    for late in self._trials.values():
                        late.given_up = late.given_up or late.awaited
                    break
                self._changed.wait(left)
            if not trial.behind:
                return False
            self._busy = True
            due = [t.member for t in self._trials.values() if t.behind]
        try:
            self.group.step(due)
            self.group_steps += 1
            self.trial_steps += len(due)
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()
        return True

    def _awaited(self) -> bool:
        """Whether a step should wait: for a trial between calls, or one joining while a place is free."""
        return any(t.awaited for t in self._trials.values()) or (self._joining > 0 and self._free_index() is not None)

    def _free_index(self) -> int | None:
        taken = {t.member.index for t in self._trials.values()}
        return next((i for i in range(self.slots) if i not in taken), None)

    def _join(self, trial_id: str, job: JobConfig, until_step: int) -> Trial:
        """The trial, added in a free place (waiting for one) if it is not on the host, now waiting for `until_step`
        (set at once, so that the next shared step includes it)."""
        with self._changed:
            if trial_id in self._trials:
                self._ask(self._trials[trial_id], until_step)
                return self._trials[trial_id]
        self._check(job)
        data = self._training_set(job)  # before steps wait for it: a task's first trial tokenizes its rows
        with self._changed:
            self._joining += 1  # steps wait for it while a place is free (see `_awaited`)
        try:
            with self._exclusive(lambda: trial_id in self._trials or self._free_index() is not None):
                if trial_id not in self._trials:
                    index = self._free_index()
                    assert index is not None
                    self._trials[trial_id] = Trial(trial_id, self._member(index, job, data))
                    self.group.members.append(self._trials[trial_id].member)
                with self._changed:
                    self._ask(self._trials[trial_id], until_step)
                return self._trials[trial_id]
        finally:
            with self._changed:
                self._joining -= 1
                self._changed.notify_all()

    def _ask(self, trial: Trial, until_step: int) -> None:
        """`trial` now waits for `until_step` (call holding `_changed`): a step waiting for it goes on."""
        trial.until, trial.given_up = until_step, False
        self._changed.notify_all()

    def _training_set(self, job: JobConfig) -> TrainingSet:
        """`job`'s tokenized training rows, made once per host for all trials that train on the same rows (trials differ
        in LoRA and optimizer settings, not in their data; each keeps its own order), so a trial joins at once and
        shares the steps of the trials already training instead of falling behind them while it tokenizes."""
        key = (job.task.name, job.training.max_train_examples, job.training.max_seq_length,
               job.evaluation.prompt_cut, job.evaluation.prompt_max_chars)
        with self._data_lock:
            if key not in self._data:
                self._data[key] = training_set(job, self.tokenizer, self.validation_size)
            return self._data[key]

    def _member(self, index: int, job: JobConfig, data: TrainingSet) -> Member:
        """A new member at `index`: its initial adapter (a single job's, from its seed) in the wrapped layers, resumed
        from its newest checkpoint if it has one."""
        self._check(job)  # again: the first trial may have set gradient checkpointing meanwhile
        if self.gradient_checkpointing is None:
            self.model = prepare_for_training(self.model, job.training.gradient_checkpointing)
            self.gradient_checkpointing = job.training.gradient_checkpointing
        with bare_layers(self.model, self.layers):
            peft_config, weights = initial_adapter(self.model, job)
        adapter = wrap_member(self.model, self.routing, self.layers, job, peft_config, weights, index)
        try:
            trainer = JobTrainer(job, adapter, adapter.params, data, self.device)
            trainer.resume(adapter.load)
        except Exception:
            unwrap_member(self.layers, index)
            raise
        self.model.train()
        trainer.start_clock()
        return Member(index, job, trainer, adapter)

    def _check(self, job: JobConfig) -> None:
        """Refuse, in one line per problem, a trial that cannot train over this host's base."""
        problems = []
        if job.kind != "train":
            problems.append(f"kind {job.kind!r}; only fine-tunes are trials")
        if job.base_model.model_dump() != self.base.model_dump():
            problems.append(f"base_model {job.base_model.name!r}; this host holds {self.base.name!r}")
        if job.quantization != self.quantization:
            problems.append("quantization differs from the host's; trials of one host share it")
        if resolve_device(job.device) != self.device:
            problems.append(f"device {job.device!r}; this host trains on {self.device!r}")
        if self.gradient_checkpointing not in (None, job.training.gradient_checkpointing):
            problems.append(f"training.gradient_checkpointing {job.training.gradient_checkpointing}; the host's "
                            f"trials use {self.gradient_checkpointing}")
        if problems:
            raise ConfigError(f"trial {job.job_key or job.output_dir}", problems)

    def _trial(self, trial_id: str) -> Trial:
        if trial_id not in self._trials:
            raise NotFound(f"trial {trial_id!r} is not on this host; train it first")
        return self._trials[trial_id]

    def _validation_rows(self, task: TaskSpec) -> tuple[list[Row], list[Row]]:
        """A task's validation slice and worked examples, read once per host (not at every validation)."""
        if task.name not in self._validation:
            self._validation[task.name] = (validation_rows(task, self.validation_size), example_rows(task))
        return self._validation[task.name]


def checkpointed(root: Path, step: int) -> bool:
    """Whether the newest checkpoint under `root` is of `step`."""
    newest = latest_checkpoint(root)
    return newest is not None and newest.name == checkpoint_name(step)


def validation_score(model: Any, tokenizer: PreTrainedTokenizerBase, job: JobConfig, rows: list[Row],
                     examples: list[Row] | None = None) -> float:
    """`model`'s score by the job's task metric on `rows` (training rows held out), generated and scored as the job's
    evaluation would score evaluation rows (`examples`: the task's worked examples, read when None). Code tasks are
    refused: their training rows carry no tests to run."""
    task, settings = job.task, job.evaluation
    if task.metric == CODE_METRIC:
        raise ConfigError(f"task {task.name}", ["its metric runs tests that its training rows do not have; search "
                                                "another task, or give it a validation set"])
    request = evaluation_request(task, settings, rows, examples)  # the job's evaluation prompts, with its examples
    completions = generate(model, tokenizer, request.prompts, request.max_new_tokens, settings.batch_size,
                           request.strip)
    return score_evaluation(request, list(completions)).score
