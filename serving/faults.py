"""Fault injection for tests: make a replica die, stall or run out of disk on demand. Off unless switched on.

Switched on by `$LORALAND_FAULTS_DIR` (a folder) in the replicas' environment; with it unset every hook
returns at once. A fault is a JSON file in that folder, named after it, that tests write and remove
while the app runs:

- `crash.json` `{"adapter": "<pattern>", "after_tokens": N}`: the replica generating a matching request
  kills itself (SIGKILL) after sending N deltas of it. It fires once: the replica that fires it renames the
  file to `crash.json.fired` first, so the replica Serve starts in its place does not crash again.
- `slow.json` `{"adapter": "<pattern>", "after_tokens": N, "delay_s": S}`: every delta of a matching request
  after the first N waits S seconds before it is sent (the ingress's `request_timeout_s` path).
- `disk_full.json` `{"adapter": "<pattern>"}`: caching a matching adapter fails as a full disk does, after
  half of its weights were written (`errno.ENOSPC`).

`adapter` is an fnmatch pattern over the adapter id (`loraland-<task>/<version>`), `base` for requests
without an adapter; `base_model` one over the replica's base model name; both default to `*`.
Nothing here runs unless a test created the folder and the file.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import json
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from core.schemas import StrictModel

if TYPE_CHECKING:
    from serving.engine import Engine

FAULTS_DIR_ENV = "LORALAND_FAULTS_DIR"
CRASH, SLOW, DISK_FULL = "crash", "slow", "disk_full"


class Fault(StrictModel):
    """One injected fault: which requests or adapters it hits, and when."""

    base_model: str = Field(default="*", description="fnmatch pattern over the replica's base model name.")
    adapter: str = Field(default="*", description="fnmatch pattern over adapter ids; `base` for the base model.")
    after_tokens: int = Field(default=0, ge=0, description="Deltas sent normally before the fault strikes.")
    delay_s: float = Field(default=0.0, ge=0, description="`slow`: the wait before each later delta.")

    def hits(self, base_model: str, adapter: str | None) -> bool:
        return fnmatch.fnmatchcase(base_model, self.base_model) and fnmatch.fnmatchcase(adapter or "base", self.adapter)


def faults_dir() -> Path | None:
    """The folder faults are read from, or None when injection is off (the default)."""
    folder = os.environ.get(FAULTS_DIR_ENV)
    return Path(folder) if folder else None


def active(name: str, base_model: str, adapter: str | None) -> Fault | None:
    """The fault `name` when it is switched on and hits `adapter` on `base_model`; None otherwise (always None when
    off)."""
    folder = faults_dir()
    if folder is None:
        return None
    try:
        fault = Fault.model_validate(json.loads((folder / f"{name}.json").read_text()))
    except (OSError, ValueError):  # absent, or being written
        return None
    return fault if fault.hits(base_model, adapter) else None


def claim(name: str) -> bool:
    """Take a one-shot fault: True for the one caller that renamed its file (across processes)."""
    folder = faults_dir()
    if folder is None:
        return False
    try:
        os.rename(folder / f"{name}.json", folder / f"{name}.json.fired")
    except OSError:
        return False
    return True


async def before_delta(base_model: str, adapter: str | None, sent: int) -> None:
    """Called by a replica of `base_model` before it sends the next delta of a request (`sent` deltas so far)."""
    if faults_dir() is None:
        return
    slow = active(SLOW, base_model, adapter)
    if slow is not None and sent >= slow.after_tokens:
        await asyncio.sleep(slow.delay_s)
    crash = active(CRASH, base_model, adapter)
    if crash is not None and sent >= crash.after_tokens and claim(CRASH):
        os.kill(os.getpid(), signal.SIGKILL)  # the replica dies as a lost node or an OOM kill would


def before_caching(base_model: str, adapter: str, staged: Path) -> None:
    """Called once an adapter is staged for the cache, before it is checked and moved into place: a full disk
    leaves half its weights written and raises OSError(ENOSPC)."""
    if active(DISK_FULL, base_model, adapter) is None:
        return
    for weights in staged.glob("*.safetensors"):
        os.truncate(weights, weights.stat().st_size // 2)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staged))


def held_resources(engine: Engine) -> dict[str, float]:
    """What an engine holds now (`Engine.held_resources`: rows, pending, slots_held, kv_bytes) and the live threads of
    this process: the soak test's leak check."""
    import threading

    return engine.held_resources() | {"threads": float(threading.active_count())}
