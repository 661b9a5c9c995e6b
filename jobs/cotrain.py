"""Co-training: K fine-tunes of one base model trained together in one process over ONE shared (4-bit) base.

- Members share what lives in the base (base model, quantization, LoRA target modules, device, gradient
  checkpointing); everything else is each member's own: rank, alpha, optimizer, schedule, data order, packing,
  `max_steps`, checkpoints, result and output folder (`jobs.train.JobTrainer`, one per member).
- Every targeted linear layer is wrapped once by `jobs.group_lora.GroupLoraLinear`, which holds one LoRA A/B per
  member and adds to each token its own member's delta.
- One group step runs one optimizer step of every member still training. Pass j of the group stacks the j-th forward
  pass of each member as rows padded to the widest (packed rows keep their position ids restarting per example, so
  attention never crosses examples, and their padding is a sequence of its own). Each member's loss is the token mean
  over its own step, so a member's adapter gets gradient only from its own examples: with LoRA dropout 0 its adapter
  equals the one `jobs.train.train` makes alone with the same settings, to float tolerance. Its initial adapter is
  PEFT's, drawn after seeding with its own seed exactly as a single job does.
- A member whose loss is not finite fails alone (its pass is re-run member by member to find which): its error is
  in its result and the others go on. A CUDA out-of-memory first halves the members per pass, then backs off the
  pass's members as a single job does (`jobs.train.back_off`).
- A member's checkpoints and adapter are a single job's (PEFT's format, the same keys and optimizer state), so a
  group started again on the same output folders resumes each member from its own newest checkpoint.
- LoRA dropout > 0 draws its masks from the process's one RNG stream, so a member's masks then depend on the group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.errors import ConfigError
from jobs.config import JobConfig
from jobs.encoding import IGNORE
from jobs.evaluate import evaluate_model
from jobs.group_lora import GroupLoraLinear, MemberAdapter, Routing, initial_adapter, wrap_member
from jobs.models import load_base_model, load_tokenizer, prepare_for_training, resolve_device
from jobs.result import JobResult
from jobs.run import claim_output, finished_result, record_result, save_training, saved_training
from jobs.sandbox import check_code_task
from jobs.storage import JobStorage
from jobs.train import (
    Fault,
    JobTrainer,
    StepCallback,
    TrainingError,
    TrainResult,
    answer_token_losses,
    back_off,
    examples_in,
    labelled_tokens,
    make_batches,
    tokens_in,
    training_set,
)

SHARED_FIELDS = ("base_model", "quantization", "lora.target_modules", "device", "training.gradient_checkpointing")


# --------------------------------------------------------------------------- validation


def member_name(config: JobConfig, index: int) -> str:
    """How a member is named in messages: its job key, else `#index base/task`."""
    return config.job_key or f"#{index} {config.base_model.name}/{config.task.name}"


def _field_value(config: JobConfig, name: str) -> Any:
    value: Any = config
    for part in name.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def group_problems(configs: list[JobConfig]) -> list[str]:
    """A line per member that cannot share the group's base (it differs from the first member in a shared field),
    per output folder used twice, and per member that is not a fine-tune."""
    if not configs:
        return ["a group needs at least one fine-tune"]
    first, problems = configs[0], []
    seen: dict[str, str] = {}
    for index, config in enumerate(configs):
        name = member_name(config, index)
        if config.kind != "train":
            problems.append(f"job {name}: kind {config.kind!r}; only fine-tunes (kind train) are co-trained")
        for shared in SHARED_FIELDS:
            value, expected = _field_value(config, shared), _field_value(first, shared)
            if value != expected:
                shown = value["hf_id"] if shared == "base_model" else value
                wanted = expected["hf_id"] if shared == "base_model" else expected
                problems.append(f"job {name}: {shared} {shown!r} differs from the group's {wanted!r} "
                                f"(job {member_name(first, 0)}); co-trained jobs share it")
        if config.output_dir in seen:
            problems.append(f"job {name}: output_dir {config.output_dir!r} is also job {seen[config.output_dir]}'s")
        seen.setdefault(config.output_dir, name)
    return problems


def check_group(configs: list[JobConfig], source: str = "co_train group") -> None:
    """Refuse a group whose members cannot train over one base: one ConfigError, a line per problem."""
    problems = group_problems(configs)
    if problems:
        raise ConfigError(source, problems)
    for config in configs:  # before any training (jobs.sandbox)
        check_code_task(config.task.metric, config.evaluation.unconfined_code)


# --------------------------------------------------------------------------- the group


@dataclass
class MemberResult:
    """One member's outcome: its results, or the error it failed with (the others are unaffected)."""

    config: JobConfig
    result: TrainResult | None = None  # training's result (None when it failed, or when the job had finished before)
    error: str | None = None
    job: JobResult | None = None  # the job's whole result (result.json), from `run_group`


@dataclass
class Member:
    """A member during training: its index among the wrapped layers' adapters, trainer and adapter."""

    index: int
    config: JobConfig
    trainer: JobTrainer
    adapter: MemberAdapter
    error: str | None = None

    @property
    def training(self) -> bool:
        return self.error is None and not self.trainer.done

    def fail(self, error: str) -> None:
        self.error = error
        for param in self.adapter.params:
            param.grad = None


@dataclass
class Pass:
    """One forward pass of the group: each member's rows, and each member's label tokens over its whole step."""

    rows: dict[int, dict[str, torch.Tensor]]
    label_tokens: dict[int, int]


def join_pass(rows: dict[int, dict[str, torch.Tensor]], pad_id: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The members' rows of one pass stacked as one model input, padded to the widest, and the member of each row.

    Padding adds nothing to the loss (IGNORE labels) and, in packed rows, is a sequence of its own (position ids from
    0), so no example attends to it; each member's rows keep their own attention cost (rows are not joined end to
    end)."""
    members = list(rows)
    width = max(batch["input_ids"].shape[1] for batch in rows.values())
    packed = all("position_ids" in batch for batch in rows.values())

    def pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

    def pad_positions(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, torch.arange(width - tensor.shape[1]).expand(len(tensor), -1)], dim=1)

    joined = {
        "input_ids": torch.cat([pad(rows[m]["input_ids"], pad_id) for m in members]),
        "labels": torch.cat([pad(rows[m]["labels"], IGNORE) for m in members]),
    }
    if packed:
        joined["position_ids"] = torch.cat([pad_positions(rows[m]["position_ids"]) for m in members])
    else:
        joined["attention_mask"] = torch.cat([pad(rows[m]["attention_mask"], 0) for m in members])
    return joined, [m for m in members for _ in range(len(rows[m]["input_ids"]))]


def member_losses(model: nn.Module, routing: Routing, rows: dict[int, dict[str, torch.Tensor]],
                  label_tokens: dict[int, int], pad_id: int, device: str) -> torch.Tensor:
    """One mixed-adapter forward pass: each member's share of its step's token-mean loss (its own tokens only), in the
    order of `rows`."""
    joined, row_members = join_pass(rows, pad_id)
    members = list(rows)
    routing.set_pass(members, row_members, device)
    row_sums = answer_token_losses(model, {k: v.to(device) for k, v in joined.items()}).sum(1)
    assert routing.row_slot is not None
    sums = torch.zeros(len(members), device=row_sums.device).index_add(0, routing.row_slot, row_sums)
    return sums / torch.tensor([float(label_tokens[m]) for m in members], device=sums.device)


class Group:
    """The members over one base, stepped together (see the module doc)."""

    def __init__(self, model: nn.Module, routing: Routing, members: list[Member], pad_id: int, device: str,
                 fault: Fault | None) -> None:
        self.model, self.routing, self.members = model, routing, members
        self.pad_id, self.device, self.fault = pad_id, device, fault
        self.members_per_pass = max(len(members), 1)
        self.batches: dict[int, list[dict[str, torch.Tensor]]] = {}  # each member's forward passes of the current step
        self.in_pass: list[int] = []  # the members of the pass running now

    @property
    def by_index(self) -> dict[int, Member]:
        return {m.index: m for m in self.members}

    def step(self, members: list[Member] | None = None) -> None:
        """One optimizer step of every member still training (of `members`, default all; jobs/trials.py steps those
        whose trials asked for more steps)."""
        while True:
            active = [m for m in (self.members if members is None else members) if m.training]
            if not active:
                return
            try:
                losses, tokens = self._gradients(active)
                break
            except torch.OutOfMemoryError:
                for member in active:
                    member.trainer.optimizer.zero_grad(set_to_none=True)
                if self.device == "cuda":
                    torch.cuda.empty_cache()
                self._back_off()
        for member in active:
            if member.training:
                member.trainer.finish_step(losses[member.index], tokens[member.index])

    def _back_off(self) -> None:
        """Fewer members per pass first; with one member per pass, the member of the pass that ran out of memory backs
        off as a single job does (failing alone at its floor)."""
        if self.members_per_pass > 1:
            self.members_per_pass //= 2
            return
        for member in (self.by_index[i] for i in self.in_pass):
            try:
                back_off(member.trainer.state, member.config.training,
                         max(examples_in(b) for b in self.batches[member.index]))
            except TrainingError as error:
                member.fail(str(error))

    def _gradients(self, active: list[Member]) -> tuple[dict[int, float], dict[int, int]]:
        """Accumulate every active member's step gradients in mixed passes; returns each member's loss and tokens."""
        batches = self.batches = {}
        for m in active:
            state, settings = m.trainer.state, m.config.training
            batches[m.index] = make_batches(m.trainer.step_examples(), state.micro_batch_size, settings.max_seq_length,
                                            settings.packing, self.pad_id, state.pass_tokens)
        labels = {i: labelled_tokens(bs) for i, bs in batches.items()}
        losses, tokens = dict.fromkeys(batches, 0.0), dict.fromkeys(batches, 0)
        for rows in self._passes(batches):
            self.in_pass = list(rows)
            if self.fault:
                self.fault(min(self.by_index[i].trainer.state.step for i in rows))
            for index, loss in self._backward(Pass(rows, labels)).items():
                losses[index] += loss
                tokens[index] += tokens_in(rows[index])
        return losses, tokens

    def _passes(self, batches: dict[int, list[dict[str, torch.Tensor]]]) -> list[dict[int, dict[str, torch.Tensor]]]:
        """Pass j holds the j-th forward pass of each member (at most `members_per_pass`; packed and padded rows
        apart)."""
        passes = []
        for j in range(max(len(bs) for bs in batches.values())):
            for packed in (True, False):
                here = [i for i, bs in batches.items() if j < len(bs) and ("position_ids" in bs[j]) == packed]
                for start in range(0, len(here), self.members_per_pass):
                    passes.append({i: batches[i][j] for i in here[start : start + self.members_per_pass]})
        return passes

    def _backward(self, group_pass: Pass) -> dict[int, float]:
        """Forward and backward one pass; a non-finite loss re-runs the pass member by member, and the members whose
        own loss is still not finite fail (without gradient from this pass)."""
        losses = member_losses(self.model, self.routing, group_pass.rows, group_pass.label_tokens, self.pad_id,
                               self.device)
        finite = torch.isfinite(losses).tolist()
        if not all(finite) and len(losses) > 1:
            out: dict[int, float] = {}
            for index, row in group_pass.rows.items():
                out |= self._backward(Pass({index: row}, group_pass.label_tokens))
            return out
        if any(finite):
            losses[torch.tensor(finite)].sum().backward()
        self.routing.clear()
        values = losses.tolist()
        for (index, ok), value in zip(zip(group_pass.rows, finite), values):
            if not ok:
                member = self.by_index[index]
                member.fail(f"job {member_name(member.config, index)}: non-finite loss ({value}) at step "
                            f"{member.trainer.state.step + 1}; lower training.learning_rate")
        return {index: value for (index, ok), value in zip(zip(group_pass.rows, finite), values) if ok}


@dataclass
class GroupModel:
    """The shared base with every member's adapter in its wrapped layers; `use(i)` makes it member i's fine-tune."""

    model: PreTrainedModel
    routing: Routing
    tokenizer: PreTrainedTokenizerBase
    layers: dict[str, GroupLoraLinear] = field(default_factory=dict)  # module name -> its wrapper

    def use(self, member: int) -> PreTrainedModel:
        """The model as member `member`'s fine-tune alone (every token through its adapter), e.g. to evaluate it."""
        self.routing.use(member)
        return self.model

    def release(self) -> PreTrainedModel:
        """The base as it was before the group: its own layers back in place of the wrappers (the adapters dropped)."""
        for module, layer in self.layers.items():
            parent, _, leaf = module.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, leaf, layer.base)
        self.layers = {}
        return self.model


def co_train(configs: list[JobConfig], tokenizer: PreTrainedTokenizerBase | None = None,
             on_step: dict[int, StepCallback] | None = None, fault: Fault | None = None,
             base: PreTrainedModel | None = None) -> tuple[list[MemberResult], GroupModel]:
    """Fine-tune every member's adapter together over one base, each resuming from its own newest checkpoint; each
    member's adapter is saved into its `output_dir` as a single job's would be. A member that fails does so alone.

    `on_step[i]` receives member i's step metrics; `fault(step)` is called before each pass (tests inject errors);
    `base` is the members' base model already loaded (default: loaded from the first member's settings)."""
    check_group(configs)
    first = configs[0]
    device = resolve_device(first.device)
    tokenizer = tokenizer or load_tokenizer(first.base_model)
    base = prepare_for_training(base or load_base_model(first.base_model, first.quantization, device),
                                first.training.gradient_checkpointing)
    initial = [initial_adapter(base, config) for config in configs]
    routing, layers = Routing(), dict[str, GroupLoraLinear]()
    members = []
    for index, (config, (peft_config, weights)) in enumerate(zip(configs, initial)):
        adapter = wrap_member(base, routing, layers, config, peft_config, weights)
        trainer = JobTrainer(config, adapter, adapter.params, training_set(config, tokenizer), device,
                             (on_step or {}).get(index))
        trainer.resume(adapter.load)
        members.append(Member(index, config, trainer, adapter))
    base.train()
    group = Group(base, routing, members, tokenizer.pad_token_id, device, fault)
    for member in members:  # training starts now for all: the other members' set-up is not a member's training time
        member.trainer.start_clock()
    while any(m.training for m in members):
        group.step()
    results = [MemberResult(m.config, error=m.error) if m.error else MemberResult(m.config, result=m.trainer.finish())
               for m in members]
    return results, GroupModel(base, routing, tokenizer, layers)


def run_group(configs: list[JobConfig], on_step: dict[int, StepCallback] | None = None,
              fault: Fault | None = None) -> list[MemberResult]:
    """Run every member as `jobs.run.run_job` runs a job (claimed output folder, result.json), training the unfinished
    ones together: a finished member returns its saved result, the others are co-trained, then each is evaluated
    through its own adapter. A member failing in training or evaluation fails alone, its error in its outcome."""
    check_group(configs)
    storages = [JobStorage(config.output_dir) for config in configs]
    outcomes = [MemberResult(config, job=finished_result(storage, config))
                for config, storage in zip(configs, storages)]
    pending = [i for i, outcome in enumerate(outcomes) if outcome.job is None]
    if not pending:
        return outcomes
    trained, group = co_train([configs[i] for i in pending],
                              on_step={pending.index(i): s for i, s in (on_step or {}).items() if i in pending},
                              fault=fault)
    for member, (index, outcome) in enumerate(zip(pending, trained)):
        outcomes[index] = outcome
        if outcome.result is None:
            continue
        config = configs[index]
        try:
            evaluation = evaluate_model(group.use(member), group.tokenizer, config.task, config.evaluation)
        except Exception as error:
            outcome.error = f"job {member_name(config, index)}: evaluation failed ({type(error).__name__}: {error})"
            continue
        outcome.job = record_result(config, storages[index], evaluation, outcome.result)
    return outcomes


def train_group(configs: list[JobConfig], on_step: dict[int, StepCallback] | None = None,
                fault: Fault | None = None) -> list[MemberResult]:
    """The members' training without their evaluation (a sweep that evaluates through its base's evaluator,
    orchestrator/evaluator.py): the ones not trained before are co-trained, each saved with `trained.json` as
    `jobs.run.train_step` saves a single job; a member trained before returns its saved training. A member failing
    fails alone, its error in its outcome."""
    check_group(configs)
    storages = [JobStorage(config.output_dir) for config in configs]
    outcomes = []
    for config, storage in zip(configs, storages):
        claim_output(storage, config)
        outcomes.append(MemberResult(config, result=saved_training(storage)))
    pending = [i for i, outcome in enumerate(outcomes) if outcome.result is None]
    if not pending:
        return outcomes
    steps = {pending.index(i): step for i, step in (on_step or {}).items() if i in pending}
    trained, _ = co_train([configs[i] for i in pending], on_step=steps, fault=fault)
    for index, outcome in zip(pending, trained):
        outcomes[index] = outcome
        if outcome.result is not None:
            save_training(storages[index], outcome.result)
    return outcomes
