"""The mixed-adapter LoRA layer of co-training (jobs/cotrain.py), and each member's adapter inside it.

Every targeted linear layer of the shared base is wrapped once by `GroupLoraLinear`, which holds one LoRA A/B per
member that targets it and adds to each token its own member's delta (`y = base(x) + (x_k @ A_k^T @ B_k^T) * alpha_k /
r_k` on member k's tokens, nothing for a member that does not target the layer): the training counterpart of the
serving engine's mixed-adapter layer (serving/lora.py), differentiable. Members are keyed by index; a member's place can
be freed (`unwrap_member`) and reused (jobs/trials.py).
`Routing` says which member each row of the next forward pass belongs to. A member's weights are written and read in
PEFT's format (`MemberAdapter`), so its checkpoints and adapter are a single job's.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from core.paths import ADAPTER_WEIGHTS
from jobs.config import JobConfig
from jobs.models import lora_config
from jobs.train import TrainingError

PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for the base model's modules

# --------------------------------------------------------------------------- the mixed-adapter layer


@dataclass
class Routing:
    """Which member each row of the current forward pass belongs to. Set by the group before each pass; read by every
    wrapped layer. Every row is one member's (`join_pass`), so a layer computes all members' deltas as one batched
    matrix product per LoRA matrix, whatever the number of members."""

    scales: list[float] = field(default_factory=list)  # by member index: alpha / r
    dropouts: list[float] = field(default_factory=list)  # by member index: LoRA dropout
    members: list[int] = field(default_factory=list)  # the pass's members, in row-slot order
    row_slot: torch.Tensor | None = None  # [batch]: each row's slot in `members`
    one_row_each: bool = False  # row i is slot i's (no gathering needed)
    row_scale: torch.Tensor | None = None  # [batch, 1, 1]: each row's member's alpha / r
    row_dropout: list[float] = field(default_factory=list)  # [batch]: each row's member's LoRA dropout
    only: int | None = None  # every token through this member's adapter (evaluation, generation)

    def add_member(self, scale: float, dropout: float, index: int | None = None) -> int:
        """A member's LoRA scale and dropout, at `index` (a freed member's place, jobs/trials.py) or a new one; returns
        its index."""
        if index is None or index == len(self.scales):
            self.scales.append(scale)
            self.dropouts.append(dropout)
            return len(self.scales) - 1
        self.scales[index], self.dropouts[index] = scale, dropout
        return index

    def set_pass(self, members: list[int], row_members: list[int], device: str) -> None:
        """Route the next pass through the members' adapters: row i is member `row_members[i]`'s."""
        slot = {m: i for i, m in enumerate(members)}
        self.members, self.only = members, None
        self.row_slot = torch.tensor([slot[m] for m in row_members], device=device)
        self.one_row_each = row_members == members
        self.row_scale = torch.tensor([self.scales[m] for m in row_members], device=device).view(-1, 1, 1)
        self.row_dropout = [self.dropouts[m] for m in row_members]

    def use(self, member: int | None) -> None:
        """Every token through member `member`'s adapter (None: back to mixed passes)."""
        self.clear()
        self.only = member

    def clear(self) -> None:
        self.members, self.row_slot, self.one_row_each, self.row_scale, self.row_dropout = [], None, False, None, []


class GroupLoraLinear(nn.Module):
    """A frozen base linear layer (plain or bitsandbytes 4-bit) plus one trainable LoRA A/B per member that targets it;
    each row gets its own member's delta, B(A(dropout(x))) * alpha / r as PEFT's LoRA layer computes it, the members' A
    and B stacked (zero-padded to the widest rank, which adds nothing and takes no gradient) into two batched products.
    A member that does not target the layer (other `target_modules`) adds nothing to its rows."""

    def __init__(self, base: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.lora_a = nn.ParameterDict()  # str(member index) -> A [r, in]
        self.lora_b = nn.ParameterDict()  # str(member index) -> B [out, r]

    def add_member(self, member: int, a: torch.Tensor, b: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
        """Member `member`'s A [r, in] and B [out, r]; returns them as its trainable parameters."""
        pair = nn.Parameter(a.clone()), nn.Parameter(b.clone())
        self.lora_a[str(member)], self.lora_b[str(member)] = pair
        return pair

    def remove_member(self, member: int) -> None:
        """Drop member `member`'s A and B, if it targets this layer."""
        if str(member) in self.lora_a:
            del self.lora_a[str(member)], self.lora_b[str(member)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.routing.only is not None:
            if str(self.routing.only) not in self.lora_a:
                return y
            return y + self._delta(x, self.routing.only, y.dtype)
        if not any(str(m) in self.lora_a for m in self.routing.members):
            return y
        return y + self._mixed_delta(x).to(y.dtype)

    def _mixed_delta(self, x: torch.Tensor) -> torch.Tensor:
        """Every row's delta through its own member's adapter (zero for a member without one here): x [batch, seq, in]
        -> [batch, seq, out]."""
        routing, members = self.routing, self.routing.members
        present = [str(m) for m in members if str(m) in self.lora_a]
        rank = max(self.lora_a[m].shape[0] for m in present)
        zero_a = self.lora_a[present[0]].new_zeros(rank, self.lora_a[present[0]].shape[1])
        zero_b = self.lora_b[present[0]].new_zeros(self.lora_b[present[0]].shape[0], rank)
        a = torch.stack([_pad_rank(self.lora_a[str(m)], rank, 0) if str(m) in self.lora_a else zero_a
                         for m in members])  # [members, r, in]
        b = torch.stack([_pad_rank(self.lora_b[str(m)], rank, 1) if str(m) in self.lora_b else zero_b
                         for m in members])  # [members, out, r]
        assert routing.row_slot is not None and routing.row_scale is not None, "a mixed pass needs set_pass first"
        if not routing.one_row_each:
            a, b = a.index_select(0, routing.row_slot), b.index_select(0, routing.row_slot)
        x = _row_dropout(x.to(a.dtype), routing.row_dropout, self.training)
        delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
        return delta * routing.row_scale

    def _delta(self, x: torch.Tensor, member: int, dtype: torch.dtype) -> torch.Tensor:
        """The member's LoRA delta of `x`, as PEFT computes it: B(A(dropout(x))), cast back, times alpha / r."""
        a, b = self.lora_a[str(member)], self.lora_b[str(member)]
        x = x.to(a.dtype)
        if self.routing.dropouts[member] and self.training:
            x = nn.functional.dropout(x, self.routing.dropouts[member])
        return nn.functional.linear(nn.functional.linear(x, a), b).to(dtype) * self.routing.scales[member]


def _pad_rank(weight: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """A [r, in] (dim 0) or B [out, r] (dim 1) zero-padded to `rank` along its rank dimension."""
    missing = rank - weight.shape[dim]
    if not missing:
        return weight
    return nn.functional.pad(weight, (0, 0, 0, missing) if dim == 0 else (0, missing))


def _row_dropout(x: torch.Tensor, rates: list[float], training: bool) -> torch.Tensor:
    """Inverted dropout with each row's own rate (one op when the rows share it)."""
    if not training or not any(rates):
        return x
    if len(set(rates)) == 1:
        return nn.functional.dropout(x, rates[0])
    keep = 1 - torch.tensor(rates, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * torch.bernoulli(keep.expand_as(x)) / keep


# --------------------------------------------------------------------------- one member's adapter


class MemberAdapter:
    """One member's LoRA weights inside the wrapped layers, written and read in PEFT's format (the keys, tensors and
    adapter_config.json a single job's PeftModel saves), so checkpoints and adapters are interchangeable."""

    def __init__(self, peft_config: PeftConfig, weights: dict[str, nn.Parameter]) -> None:
        self.peft_config = peft_config
        self.weights = weights  # PEFT key -> parameter, in PEFT's order (per module: A, then B)

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable parameters, in the order a single job's optimizer holds them."""
        return list(self.weights.values())

    def save_pretrained(self, save_directory: str, **_: Any) -> None:
        """Write adapter_model.safetensors + adapter_config.json (inference mode, as PEFT saves them)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({key: p.detach().contiguous() for key, p in self.weights.items()}, str(folder / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        config = copy.deepcopy(self.peft_config)
        config.inference_mode = True
        config.save_pretrained(str(folder))

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved weights (a checkpoint's adapter_model.safetensors) into the parameters."""
        missing = set(self.weights) ^ set(tensors)
        if missing:
            raise TrainingError(f"checkpoint does not fit the member's adapter: {len(missing)} keys differ, "
                                f"e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for key, param in self.weights.items():
                param.copy_(tensors[key])


def initial_adapter(base: PreTrainedModel, config: JobConfig) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The fresh adapter a single job of `config` starts from: PEFT attaches it after seeding with the job's seed (the
    base's loading and preparation draw no random numbers), then is taken off again, leaving `base` as it was."""
    torch.manual_seed(config.training.seed)
    random.seed(config.training.seed)
    peft_model = get_peft_model(base, lora_config(config.lora))
    weights = {key: tensor.detach().clone() for key, tensor in get_peft_model_state_dict(peft_model).items()}
    peft_config = copy.deepcopy(peft_model.peft_config["default"])
    peft_model.unload()
    return peft_config, weights


def _module_of(key: str) -> tuple[str, str]:
    """`base_model.model.<module>.lora_A.weight` -> (<module>, "A")."""
    module, kind, _ = key[len(PEFT_PREFIX):].rsplit(".", 2)
    return module, kind[-1]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of `model`'s submodule `name`."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@contextmanager
def bare_layers(base: nn.Module, layers: dict[str, GroupLoraLinear]) -> Iterator[None]:
    """The base's own layers in place of the wrappers for a while (e.g. for PEFT to draw a new member's
    `initial_adapter` on an already wrapped base); the wrappers are back afterwards."""
    for name, layer in layers.items():
        set_module(base, name, layer.base)
    try:
        yield
    finally:
        for name, layer in layers.items():
            set_module(base, name, layer)


def wrap_member(base: PreTrainedModel, routing: Routing, layers: dict[str, GroupLoraLinear], config: JobConfig,
                peft_config: PeftConfig, weights: dict[str, torch.Tensor], index: int | None = None) -> MemberAdapter:
    """Add a member's initial weights to the wrapped layers (wrapping a targeted layer the first time it is met), as a
    new member or at a freed member's `index`."""
    index = routing.add_member(config.lora.alpha / config.lora.r, config.lora.dropout, index)
    params = {}
    for key in weights:
        module, kind = _module_of(key)
        if kind != "A":
            continue
        if module not in layers:
            layers[module] = GroupLoraLinear(base.get_submodule(module), routing)
            set_module(base, module, layers[module])
        b_key = key.replace(".lora_A.", ".lora_B.")
        params[key], params[b_key] = layers[module].add_member(index, weights[key], weights[b_key])
    return MemberAdapter(peft_config, params)


def unwrap_member(layers: dict[str, GroupLoraLinear], index: int) -> None:
    """Take member `index`'s A and B out of every wrapped layer (its place can then be reused by `wrap_member`)."""
    for layer in layers.values():
        layer.remove_member(index)
