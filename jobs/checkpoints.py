"""A job's checkpoints and final adapter on its output folder, written atomically.

A checkpoint (`checkpoints/step-NNNNNNNN/`) holds the adapter in PEFT's format, the optimizer, scheduler and RNG states
and the `TrainState` (step, data position, back-offs, history): enough to continue the same trajectory. Each is staged
in a hidden folder, fsynced, then renamed into place, so a kill mid-save never leaves a broken one; the final adapter
(`adapter/`) likewise.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from core.errors import Conflict
from core.paths import ADAPTER_CONFIG
from jobs.config import JobConfig

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"

class AdapterWriter(Protocol):
    """Trainable LoRA weights that write themselves in PEFT's format (adapter_model.safetensors + adapter_config.json):
    a PeftModel, or one member's adapter in a group (jobs/cotrain.py)."""

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> Any: ...


@dataclass
class TrainState:
    """What a checkpoint needs besides weights and optimizer to continue the same trajectory."""

    step: int = 0
    cursor: int = 0  # examples consumed so far: the data position
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    pass_tokens: int = 0  # packed: tokens of a forward pass after out-of-memory back-offs (0: micro_batch x max_seq)
    trained_tokens: int = 0
    oom_backoffs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint of `step` (sorting by name sorts by step)."""
    return f"step-{step:08d}"


def save_checkpoint(root: Path, model: AdapterWriter, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: TrainState, keep: int) -> Path:
    """Write a checkpoint into a hidden folder, then rename it into place: a kill mid-save leaves no broken
    checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state.step)
    staging = root / f".staging-{state.step:08d}-{os.getpid()}"
    for leftover in root.glob(".staging-*"):  # a save killed half-way (by us or an earlier run of the job)
        shutil.rmtree(leftover, ignore_errors=True)
    model.save_pretrained(str(staging), save_embedding_layers=False)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               staging / "trainer_state.pt")
    (staging / "state.json").write_text(json.dumps(asdict(state)))
    sync_to_disk(staging)  # a machine crash (or NFS) must not leave a renamed checkpoint with cut-off files
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    sync_to_disk(root, files=False)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def sync_to_disk(folder: Path, files: bool = True) -> None:
    """fsync the files in `folder` (if `files`) and the folder itself, so what is renamed next is on disk."""
    for path in sorted(folder.iterdir()) if files else []:
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (staging folders are ignored)."""
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer,
                       scheduler: Any) -> tuple[TrainState, dict[str, Any]]:
    """Restore a checkpoint's optimizer and scheduler; return its saved state and RNG state (adapter weights are the
    caller's: `adapter_model.safetensors` in the same folder). `trainer_state.pt` is read with `weights_only=True`:
    tensors and plain values only, never code; anything else is a one-line Conflict naming the checkpoint."""
    try:
        saved = torch.load(path / "trainer_state.pt", weights_only=True)
    except pickle.UnpicklingError as error:
        raise Conflict(f"checkpoint {path}: trainer_state.pt holds more than tensors and plain values "
                       f"({str(error).strip().splitlines()[0][:200]}); delete that checkpoint folder") from None
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return TrainState(**json.loads((path / "state.json").read_text())), saved["rng"]



def save_adapter(model: AdapterWriter, config: JobConfig, folder: Path) -> Path:
    """Save the final adapter into `folder` (safetensors + adapter_config.json naming the base by its Hub id)
    atomically."""
    target = folder / ADAPTER_DIR
    staging = target.with_name(f".{ADAPTER_DIR}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True, save_embedding_layers=False)
    adapter_config = json.loads((staging / ADAPTER_CONFIG).read_text())
    adapter_config["base_model_name_or_path"] = config.base_model.hf_id  # portable: never a local cache path
    (staging / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target
