"""Many LoRA adapters in one forward pass, without a Python loop over adapters.

Every targeted linear layer of the base model is wrapped once by `MultiLoraLinear`. It keeps a
stack of adapter weights, one slot per adapter held on the accelerator (slot 0 is "no adapter",
all zeros), padded to the largest rank a replica accepts. A batch's rows use U distinct slots; each
layer adds every row's own LoRA delta in one of two ways, chosen per batch (`LoraSlots.set_batch`):

- **side by side**: `y = base(x) + ((x @ A_cat^T) * M) @ B_cat^T`, where
  A_cat [R, in] and B_cat [out, R] are the U adapters' A and B (B pre-scaled by alpha / rank) laid side
  by side, each at its own rank (R = the sum of the U ranks, no padding), and M [rows, R] is 1 on each
  row's own block. Each active adapter's weights are read once per step; A_cat/B_cat are rebuilt only
  when the set of active slots changes. Two dense products, but every token multiplies every block, so
  its cost grows with tokens x R.
- **gathered**: each row's A and B (padded to the batch's largest rank r, with zeros that add nothing)
  are gathered [rows, in, r] / [rows, r, out] and applied with two batched matmuls: cost rows x r for the
  gather plus tokens x r, whatever U, but small batched products are slow per multiply.

`uses_gather` picks the cheaper by a cost model measured on a CPU (tiny-llama's 64 -> 128 layers, rank 8,
one thread, torch 2.13, 2026-12-06): gathering a row's weights costs about `GATHER_ROW_COST` side-by-side
multiplies per weight, and each multiply of the small batched products about `GATHER_TOKEN_COST`. So a
decode step (one token a row) lays up to ~20 equal-rank adapters side by side (256 rows: 8 adapters 225 us
a layer side by side against 486 us gathered; 31 adapters 851 us against 407 us), while a prefill of
30-token prompts gathers from ~5 adapters on (36 rows, 31 adapters: 290 us gathered, 5.8 ms side by
side). On a GPU (not measured there) side by side reads each active adapter once per decode step, gathered once
per row.

`read_adapter` turns a PEFT adapter folder (safetensors only) into host tensors keyed by module
name; `LoraSlots.load` copies them into a slot.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from core.errors import ConfigError
from core.paths import ADAPTER_CONFIG, ADAPTER_WEIGHTS

GATHER_ROW_COST = 16  # a row's gathered weight, in side-by-side multiplies (see the module doc)
GATHER_TOKEN_COST = 4  # one multiply of the gathered batched products, in side-by-side multiplies


def uses_gather(ranks: list[int], tokens_per_row: int) -> bool:
    """Whether a batch of rows using adapters of `ranks` (the distinct active ones), `tokens_per_row` tokens each,
    is cheaper gathered than side by side (per row and layer feature: side by side multiplies T x R, gathered
    copies r weights and multiplies T x r, r the largest rank)."""
    side_by_side = tokens_per_row * sum(ranks)
    return side_by_side > max(ranks) * (GATHER_ROW_COST + GATHER_TOKEN_COST * tokens_per_row)


class AdapterFormatError(ValueError):
    """The folder is not a LoRA adapter this replica can serve; the message says why."""


@dataclass
class LoraBatch:
    """What every wrapped layer reads during one forward pass (set by `LoraSlots.set_batch`).

    Side by side: `slot_index`/`rank_index` [R] name the (slot, rank row) of each column of A_cat/B_cat, `mask`
    [rows, R] is 1 on each row's own block (None when every row uses the one adapter). Gathered: `row_slots` [rows]
    is each row's slot and `rank` the batch's largest rank. No adapter at all: everything None."""

    slot_index: torch.Tensor | None = None
    rank_index: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    row_slots: torch.Tensor | None = None
    rank: int = 0
    version: int = 0  # changes whenever the side-by-side columns or a slot's weights change


@dataclass
class AdapterWeights:
    """One adapter in host memory: per module, A [r, in] and B [out, r] with the scale folded into B."""

    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


class MultiLoraLinear(nn.Module):
    """A frozen base linear layer (plain or bitsandbytes 4-bit) plus a stack of LoRA slots."""

    # Buffers, stored transposed so that a gathered row's weights are one contiguous index_select (3x faster than
    # gathering [r, in] and transposing, measured on the tiny model).
    lora_a: torch.Tensor  # [slots + 1, in_features, max_rank]: A^T per slot
    lora_b: torch.Tensor  # [slots + 1, max_rank, out_features]: B^T per slot (scale folded in)

    def __init__(self, base: nn.Linear, batch: LoraBatch, slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        # Uninitialised (zeroing every slot of a large stack costs seconds): `LoraSlots.load` writes a whole slot, and
        # slot 0, "no adapter", which gathered rows without an adapter read, is zeros.
        self.register_buffer("lora_a", torch.empty(slots + 1, self.in_features, max_rank, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.empty(slots + 1, max_rank, self.out_features, dtype=dtype, device=device))
        self.lora_a[0].zero_()
        self.lora_b[0].zero_()

        self.cached_version = -1
        self.a_cat = self.b_cat = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.batch
        if batch.row_slots is not None:
            return y + self._gathered(x, batch.row_slots, batch.rank).to(y.dtype)
        if batch.slot_index is None or batch.rank_index is None:
            return y
        if self.cached_version != batch.version:  # the active adapters changed: lay them side by side once
            self.a_cat = self.lora_a[batch.slot_index, :, batch.rank_index]  # [R, in]
            self.b_cat = self.lora_b[batch.slot_index, batch.rank_index].T.contiguous()  # [out, R]
            self.cached_version = batch.version
        hidden = x.to(self.a_cat.dtype) @ self.a_cat.T  # [rows, (T,) R]
        if batch.mask is not None:
            hidden = hidden * (batch.mask if hidden.dim() == 2 else batch.mask[:, None, :])
        return y + (hidden @ self.b_cat.T).to(y.dtype)

    def _gathered(self, x: torch.Tensor, row_slots: torch.Tensor, rank: int) -> torch.Tensor:
        """Each row's own LoRA delta: its slot's A and B gathered, two batched matmuls."""
        rows = x.to(self.lora_a.dtype)
        flat = rows.dim() == 2
        rows = rows[:, None, :] if flat else rows  # [rows, T, in]
        a = self.lora_a[:, :, :rank].index_select(0, row_slots)  # [rows, in, r]: only r of max_rank columns copied
        b = self.lora_b[:, :rank].index_select(0, row_slots)  # [rows, r, out]
        delta = torch.bmm(torch.bmm(rows, a), b)
        return delta[:, 0] if flat else delta


class LoraSlots:
    """The accelerator tier: `slots` adapter slots in every wrapped layer of one model."""

    def __init__(self, model: nn.Module, target_modules: list[str], slots: int, max_rank: int,
                 dtype: torch.dtype) -> None:
        self.batch = LoraBatch()
        self.slots = slots
        self.max_rank = max_rank
        self.layers: dict[str, MultiLoraLinear] = {}
        self.ranks = [0] * (slots + 1)
        self._active: tuple[int, ...] = ()  # the distinct slots of the last batch
        targets = set(target_modules)
        for name, module in list(model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in targets or not isinstance(module, nn.Linear):
                continue
            device = next(module.parameters()).device
            wrapped = MultiLoraLinear(module, self.batch, slots, max_rank, dtype, device)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, leaf, wrapped)
            self.layers[name] = wrapped
        if not self.layers:
            raise ConfigError("engine.target_modules",
                              [f"no linear layer of the base model is named one of {sorted(targets)}"])

    @staticmethod
    def slot_bytes(model: nn.Module, target_modules: list[str], max_rank: int, dtype: torch.dtype) -> int:
        """Bytes one slot takes over all target layers (to size the tier from free memory)."""
        targets = set(target_modules)
        features = sum(m.in_features + m.out_features for n, m in model.named_modules()
                       if n.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear))
        return features * max_rank * torch.tensor([], dtype=dtype).element_size()

    def load(self, slot: int, adapter: AdapterWeights) -> None:
        """Copy an adapter into `slot` (1..slots); layers it does not target get zeros."""
        for name, layer in self.layers.items():
            layer.lora_a[slot].zero_()
            layer.lora_b[slot].zero_()
            if name in adapter.modules:
                a, b = adapter.modules[name]
                layer.lora_a[slot, :, : adapter.rank].copy_(a.T, non_blocking=True)
                layer.lora_b[slot, : adapter.rank].copy_(b.T, non_blocking=True)
        self.ranks[slot] = adapter.rank
        self._active = ()  # the slot's rank may have changed: the next batch rebuilds its columns
        self.batch.version += 1

    def set_batch(self, slots: list[int], tokens_per_row: int = 1, gather: bool | None = None) -> None:
        """Point every layer at the rows' slots (one per row, 0 for none) for the next forward pass of
        `tokens_per_row` tokens a row (1 when decoding); `gather` forces a path (None: `uses_gather` picks)."""
        active = tuple(sorted({s for s in slots if self.ranks[s] > 0}))  # rows joining or leaving keep the columns
        batch, stack = self.batch, next(iter(self.layers.values())).lora_a
        device = stack.device
        batch.row_slots = batch.mask = None
        if not active:
            batch.slot_index = batch.rank_index = None
            self._active = ()
            return
        if gather if gather is not None else uses_gather([self.ranks[s] for s in active], tokens_per_row):
            batch.row_slots = torch.tensor(slots, dtype=torch.long, device=device)
            batch.rank = max(self.ranks[s] for s in active)
            return
        if active != self._active or batch.slot_index is None:
            self._active = active
            slot_of_column = [s for s in active for _ in range(self.ranks[s])]
            rank_of_column = [j for s in active for j in range(self.ranks[s])]
            batch.slot_index = torch.tensor(slot_of_column, dtype=torch.long, device=device)
            batch.rank_index = torch.tensor(rank_of_column, dtype=torch.long, device=device)
            batch.version += 1
        if len(active) == 1 and all(s == active[0] for s in slots):
            return
        block = {slot: index for index, slot in enumerate(active)}
        owner = torch.tensor([block.get(s, -1) for s in slots], device=device)  # -1: no adapter
        columns = torch.tensor([index for index, s in enumerate(active) for _ in range(self.ranks[s])], device=device)
        batch.mask = (columns[None, :] == owner[:, None]).to(stack.dtype)


HEADER_BYTES = 1 << 20  # what a safetensors header and a folder's config may add to the weights themselves


def read_adapter(path: Path, layers: dict[str, tuple[int, int]], max_rank: int, dtype: torch.dtype) -> AdapterWeights:
    """Read a PEFT LoRA folder into host memory, checked against the base model's layers.

    `layers` maps each wrapped module name to its (in_features, out_features). Only safetensors are
    read; a pickle (.bin) adapter, DoRA, LoRA biases, embedding/LM-head deltas or a rank above
    `max_rank` are refused with the reason. The file's size (at most what a rank-`max_rank` fp32 adapter of every
    layer takes) and its tensors' names and shapes (from the safetensors header) are checked before any weight is read.
    """
    config_path, weights_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterFormatError(f"{path.name}: needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                                 "(pickle .bin adapters are refused)")
    cap = max_rank * sum(fan_in + fan_out for fan_in, fan_out in layers.values()) * 4 + HEADER_BYTES
    size = weights_path.stat().st_size
    if size > cap or config_path.stat().st_size > HEADER_BYTES:
        raise AdapterFormatError(f"{path.name}: {size} bytes of weights, more than a rank-{max_rank} adapter of this "
                                 f"base model holds ({cap} bytes)")
    try:
        config = json.loads(config_path.read_text())
        with safe_open(str(weights_path), framework="pt") as header:
            shapes = {key: tuple(header.get_slice(key).get_shape()) for key in header.keys()}
    except Exception as error:
        raise AdapterFormatError(f"{path.name}: unreadable adapter ({type(error).__name__}: {error})") from error
    rank, scale = lora_settings(path, config, max_rank)
    modules = lora_modules(path, shapes, layers, rank)
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except Exception as error:
        raise AdapterFormatError(f"{path.name}: unreadable adapter ({type(error).__name__}: {error})") from error
    adapter = AdapterWeights(rank=rank)
    for module, (a_key, b_key) in modules.items():
        a, b = tensors[a_key], tensors[b_key]
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterFormatError(f"{path.name}: {module} holds NaN or infinite weights")
        adapter.modules[module] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
    return adapter


def lora_settings(path: Path, config: dict[str, Any], max_rank: int) -> tuple[int, float]:
    """(rank, scale) of a LoRA adapter's config; AdapterFormatError for what is not served."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{path.name}: peft_type {config.get('peft_type')} is not LORA")
    if config.get("use_dora") or config.get("lora_bias"):
        raise AdapterFormatError(f"{path.name}: DoRA and LoRA biases are not served")
    rank = int(config.get("r", 0))
    if not 0 < rank <= max_rank:
        raise AdapterFormatError(f"{path.name}: rank {rank} is outside 1..{max_rank} (max_lora_rank)")
    alpha = float(config.get("lora_alpha", rank))
    return rank, alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def lora_modules(path: Path, shapes: dict[str, tuple[int, ...]], layers: dict[str, tuple[int, int]],
                 rank: int) -> dict[str, tuple[str, str]]:
    """Module -> (A key, B key) of the tensors a safetensors header lists, each pair of this base's shapes."""
    prefix = "base_model.model."
    modules: dict[str, tuple[str, str]] = {}
    for key, a_shape in shapes.items():
        if not key.endswith(".lora_A.weight"):
            if ".lora_B." not in key:
                raise AdapterFormatError(f"{path.name}: unexpected tensor {key} "
                                         "(only LoRA A/B of linear layers are served)")
            continue
        module = key[len(prefix):] if key.startswith(prefix) else key
        module = module[: -len(".lora_A.weight")]
        b_key = key.replace(".lora_A.", ".lora_B.")
        if module not in layers or b_key not in shapes:
            raise AdapterFormatError(f"{path.name}: {module} is not a served layer of this base model")
        fan_in, fan_out = layers[module]
        if a_shape != (rank, fan_in) or shapes[b_key] != (fan_out, rank):
            raise AdapterFormatError(f"{path.name}: {module} has shapes {a_shape}/{shapes[b_key]}, "
                                     f"expected ({rank}, {fan_in})/({fan_out}, {rank}): adapter of another base model?")
        modules[module] = (key, b_key)
    if not modules:
        raise AdapterFormatError(f"{path.name}: holds no LoRA weights")
    return modules
