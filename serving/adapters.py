"""Model ids -> (base model, adapter id), and adapter ids -> checked local folders.

Model ids (the OpenAI `model` field):

- `<base>`: the base model alone;
- `<base>:<task>`: that task's adapter for that base (`TaskAdapters.for_base`: the champion when it
  is on that base, else the base's best-scoring version);
- `<task>`: the task's champion, on whichever served base it was trained.

An adapter id names one immutable registry version, `loraland-<task>/<version>`. A moved champion
therefore resolves to a new adapter id, which loads new weights, with no restart: the ingress
re-reads the registry when its view is older than `model_ttl_s`.

`AdapterStore` is the replica's `AdapterFetcher`: it downloads a version's `adapter/` artifact once
into a local disk cache (a lock per adapter id, across threads and processes), accepts only JSON
config and safetensors weights (no pickle, no code), checks the config names this replica's base,
and remembers a failure for a while so a broken adapter is not downloaded again by every request.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from core.errors import Unreachable
from core.paths import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from core.schemas import BaseModelSpec
from serving import faults
from serving.api import APIError, model_card, model_not_found
from serving.engine import AdapterLoadError
from tracking import registry, store
from tracking.registry import TaskAdapters
from tracking.retry import is_transient

log = logging.getLogger(__name__)

ADAPTER_ID = re.compile(rf"^{registry.MODEL_PREFIX}(?P<task>[A-Za-z0-9][A-Za-z0-9_.-]*)/(?P<version>[1-9][0-9]*)$")
HARMLESS_SUFFIXES = (".json", ".md", ".txt")  # besides the weights, what an adapter folder may hold
MIN_REFRESH_S = 1.0  # an unknown model id re-reads the registry at most this often
REGISTRY_BACKOFF_S = 1.0  # after a failed registry read, the next waits this long, doubling while reads keep failing
MAX_REGISTRY_BACKOFF_S = 30.0
REGISTRY_PROBE_S = 2.0  # how long the tracking server may take to answer /health before it counts as down

Published = dict[str, TaskAdapters]
ServedTasks = dict[str, frozenset[str] | None]  # base model -> tasks it serves (None: all)


# --------------------------------------------------------------------------- ids


def adapter_id(task: str, version: str | int) -> str:
    """`loraland-<task>/<version>`: one registry version, hence fixed weights."""
    return f"{registry.model_name(task)}/{version}"


def parse_adapter_id(adapter: str) -> tuple[str, str]:
    """(task, version) of an adapter id; AdapterLoadError if it is not one."""
    match = ADAPTER_ID.match(adapter)
    if match is None:
        raise AdapterLoadError(f"{adapter!r} is not an adapter id (loraland-<task>/<version>)")
    return match["task"], match["version"]


@dataclass(frozen=True)
class Route:
    """Where a model id is served: a base model's deployment, with an adapter or without."""

    model: str
    base_model: str
    adapter: str | None


def _serves(served: ServedTasks, base: str, task: str) -> bool:
    """Whether `base` is served and serves `task`."""
    if base not in served:
        return False
    tasks = served[base]
    return tasks is None or task in tasks


def _base_of(version: registry.ModelVersion) -> str:
    return version.tags.get(store.TAG_BASE_MODEL, "")


def resolve(model: str, published: Published, served: ServedTasks) -> Route | None:
    """The route of a model id, or None when this endpoint does not serve it."""
    if model in served:
        return Route(model, model, None)
    base, colon, task = model.rpartition(":")
    if colon:
        adapters = published.get(task)
        version = adapters.for_base(base) if adapters and _serves(served, base, task) else None
        return Route(model, base, adapter_id(task, version.version)) if version is not None else None
    champion = published[task].champion_version() if task in published else None
    if champion is None or not _serves(served, _base_of(champion), task):
        return None
    return Route(model, _base_of(champion), adapter_id(task, champion.version))


def model_ids(published: Published, served: ServedTasks) -> list[tuple[str, str]]:
    """Every id `resolve` accepts, as (id, owned_by): base models, `<base>:<task>` pairs, then task champions."""
    ids = [(base, "loraland") for base in served]
    for base in served:
        ids += [(f"{base}:{task}", base) for task in sorted(published) if resolve(f"{base}:{task}", published, served)]
    for task in sorted(published):
        route = resolve(task, published, served)
        ids += [(task, route.base_model)] if route else []
    return ids


class ModelResolver:
    """The ingress's view of the registry: re-read when older than `ttl_s`, or at once for an unknown id.

    One read at a time, and no request waits for it while a view exists (it is served, and the read refreshes it in
    the background), except a request for an id that view lacks (published a moment ago?). After a failed read the
    next waits REGISTRY_BACKOFF_S, doubling up to MAX_REGISTRY_BACKOFF_S while reads keep failing."""

    def __init__(self, served: ServedTasks, read: Callable[[], Published], ttl_s: float, timeout_s: float) -> None:
        self.served = served
        self.read = read
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.published: Published | None = None
        self.read_at = -float("inf")
        self.read_error: str | None = None  # why the last registry read failed; None when it worked
        self.failures = 0  # registry reads failed in a row
        self.reading: asyncio.Future[None] | None = None  # the read in flight

    async def resolve(self, model: str) -> Route:
        """The route of `model`; a 404 APIError when it is not served, 503 when the registry cannot be read."""
        if model in self.served:  # a base model needs no registry
            return Route(model, model, None)
        route = resolve(model, await self._current(self.ttl_s), self.served)
        if route is None:
            route = resolve(model, await self._current(MIN_REFRESH_S, wait=True), self.served)  # published just now?
        if route is None:
            await self.refuse(model, [model_id for model_id, _ in model_ids(self.published or {}, self.served)])
        assert route is not None
        return route

    async def refuse(self, model: str, listed: list[str]) -> NoReturn:
        """What an id this endpoint does not serve gets after its second look (the registry re-read when older than
        MIN_REFRESH_S): 503 while the registry cannot be read (it may have been published meanwhile), else a 404 listing
        `listed`. Also what a caller gets for a model outside its scope, so the two cannot be told apart."""
        await self._current(MIN_REFRESH_S, wait=True)
        if self.read_error is not None:
            raise registry_unavailable(f"{model!r} is not in the last view of it ({self.read_error})")
        raise model_not_found(model, listed)

    async def published_view(self) -> Published:
        """What the registry publishes, as this resolver last read it (re-read when older than `ttl_s`)."""
        return await self._current(self.ttl_s)

    async def cards(self) -> list[dict[str, object]]:
        """GET /v1/models entries."""
        published = await self._current(self.ttl_s)
        return [model_card(model_id, owner) for model_id, owner in model_ids(published, self.served)]

    async def _current(self, max_age_s: float, wait: bool = False) -> Published:
        """The view, re-read when older than `max_age_s` (and not backing off); waits for the read only without a
        view or when `wait`; 503 while there is no view and the registry cannot be read."""
        backoff = min(MAX_REGISTRY_BACKOFF_S, REGISTRY_BACKOFF_S * 2 ** (self.failures - 1)) if self.failures else 0.0
        if time.monotonic() - self.read_at > max(max_age_s, backoff) and self.reading is None:
            self.reading = asyncio.ensure_future(self._read())
        if self.reading is not None and (wait or self.published is None):
            await asyncio.shield(self.reading)
        if self.published is None:
            raise registry_unavailable(self.read_error or "not read yet")
        return self.published

    async def _read(self) -> None:
        """One registry read (bounded by `timeout_s`) into the view; a failure keeps the last view and says why."""
        try:
            self.published = await asyncio.wait_for(asyncio.to_thread(self.read), self.timeout_s)
            self.read_error, self.failures = None, 0
        except Exception as error:
            self.read_error, self.failures = f"{type(error).__name__}: {error}", self.failures + 1
            if self.published is not None:
                log.warning("registry read failed, serving the last view: %s", error)
        finally:
            self.read_at, self.reading = time.monotonic(), None


def registry_unavailable(cause: str) -> APIError:
    """503 (Retry-After) for a model id that needs the registry while it cannot be read."""
    return APIError(503, f"the model registry cannot be read: {cause}", type="server_error",
                    code="registry_unavailable", retry_after_s=5)


def read_registry(uri: str, probe_s: float = REGISTRY_PROBE_S) -> Published:
    """`registry.published_adapters`, after checking within `probe_s` that the tracking server answers (a dead
    server would keep MLflow's own retries going for minutes); RegistryUnreachable naming the URI otherwise."""
    check_tracking(uri, probe_s)
    return registry.published_adapters(uri)


def check_tracking(uri: str, probe_s: float = REGISTRY_PROBE_S) -> None:
    """RegistryUnreachable unless the tracking server at `uri` answers within `probe_s` (a SQLite store always does)."""
    try:
        store.check_reachable(uri, timeout_s=probe_s)
    except Unreachable:
        raise RegistryUnreachable(f"the tracking server at {uri} does not answer") from None


class RegistryUnreachable(ConnectionError):
    """The tracking server (the model registry) does not answer."""


# --------------------------------------------------------------------------- files


def check_adapter_files(folder: Path, base: BaseModelSpec) -> None:
    """Refuse anything but a LoRA adapter of `base` in safetensors: pickle weights, code, links, folders,
    a config that is not JSON or names another base model. (The engine checks the tensors themselves.)"""
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or not path.is_file():
            raise AdapterLoadError(f"{path.name}: an adapter folder holds plain files only")
        if path.name != ADAPTER_WEIGHTS and not path.name.endswith(HARMLESS_SUFFIXES):
            raise AdapterLoadError(f"{path.name}: only {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} are loaded "
                                   "(pickle weights and code are refused)")
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / required).is_file():
            raise AdapterLoadError(f"{required} is missing")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise AdapterLoadError(f"{ADAPTER_CONFIG} is not valid JSON ({error})") from None
    named = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if named != base.hf_id:
        raise AdapterLoadError(f"{ADAPTER_CONFIG} names base model {named!r}, this deployment serves {base.hf_id!r}")


class AdapterUnavailable(AdapterLoadError):
    """The adapter cannot be fetched now, for a reason that passes by itself (the registry is down, the cache's
    disk is full): its requests get a 503 with Retry-After and the failure is not remembered."""

    def __init__(self, message: str, code: str = "adapter_unavailable") -> None:
        super().__init__(message)
        self.code = code


def download_error(error: Exception, cache_dir: Path) -> AdapterLoadError:
    """What a failed download means for the adapter's requests: AdapterUnavailable when it may pass, else
    AdapterLoadError."""
    if isinstance(error, RegistryUnreachable) or is_transient(error):
        return AdapterUnavailable(f"the model registry cannot be reached ({type(error).__name__}: {str(error)[:300]})",
                                  "registry_unavailable")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return AdapterUnavailable(f"no space left on the adapter cache's disk ({cache_dir}); nothing was kept",
                                  "cache_full")
    return AdapterLoadError(f"download failed ({type(error).__name__}: {str(error)[:300]})")


# The most an adapter artifact may take to be downloaded at all: a rank-64 fp32 adapter on every linear layer of a 7B
# model takes about 0.7 GB; the engine's own check (serving/lora.py `read_adapter`) then holds it to its rank/layers.
MAX_DOWNLOAD_BYTES = 2 << 30


class AdapterStore:
    """An `AdapterFetcher`: adapter id -> checked local folder `<cache_dir>/<registered model>/<version>`."""

    def __init__(self, base: BaseModelSpec, cache_dir: Path, tracking_uri: str, failure_ttl_s: float = 30.0,
                 on_fetch: Callable[[str, str, float], None] | None = None,
                 max_download_bytes: int = MAX_DOWNLOAD_BYTES) -> None:
        self.base = base
        self.max_download_bytes = max_download_bytes  # an artifact listed larger is refused before it is fetched
        self.cache_dir = cache_dir
        self.tracking_uri = tracking_uri
        self.failure_ttl_s = failure_ttl_s
        self.on_fetch = on_fetch  # (adapter id, "disk" | "download", seconds)
        self.failures: dict[str, tuple[float, str]] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.locks_lock = threading.Lock()

    def __call__(self, adapter: str) -> Path:
        """The adapter's folder, downloaded if not cached; AdapterLoadError naming the adapter and the reason."""
        task, version = parse_adapter_id(adapter)
        recent = self.failures.get(adapter)
        if recent and time.monotonic() - recent[0] < self.failure_ttl_s:
            raise AdapterLoadError(recent[1])
        folder = self.cache_dir / registry.model_name(task) / version
        try:
            with self._exclusive(adapter):
                started, source = time.perf_counter(), "disk"
                if not (folder / ADAPTER_WEIGHTS).is_file():
                    self._download(adapter, folder)
                    source = "download"
                check_adapter_files(folder, self.base)
        except AdapterUnavailable as error:  # passes by itself (registry down, disk full): not remembered
            raise AdapterUnavailable(f"adapter {adapter!r} cannot be served now: {error}", error.code) from None
        except AdapterLoadError as error:
            message = f"adapter {adapter!r} cannot be served: {error}"
            self.failures[adapter] = (time.monotonic(), message)
            shutil.rmtree(folder, ignore_errors=True)
            raise AdapterLoadError(message) from None
        self.failures.pop(adapter, None)
        if self.on_fetch:
            self.on_fetch(adapter, source, time.perf_counter() - started)
        return folder

    def _download(self, adapter: str, folder: Path) -> None:
        """Download into a staging folder beside the cache, check it, then move it into place: the cache only ever
        holds complete, checked adapters (a failed or interrupted download leaves nothing that is loaded later)."""
        task, version = parse_adapter_id(adapter)
        staging = self.cache_dir / ".staging" / f"{registry.model_name(task)}-{version}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            check_tracking(self.tracking_uri)
            uri = registry.model_uri(task, version)
            staged = registry.download_adapter(uri, staging / "adapter", self.tracking_uri, self.max_download_bytes)
            faults.before_caching(self.base.name, adapter, staged)
            check_adapter_files(staged, self.base)
            shutil.rmtree(folder, ignore_errors=True)
            folder.parent.mkdir(parents=True, exist_ok=True)
            staged.rename(folder)
        except AdapterLoadError:
            raise
        except Exception as error:
            raise download_error(error, self.cache_dir) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @contextmanager
    def _exclusive(self, adapter: str) -> Iterator[None]:
        """One fetch of an adapter at a time: a lock per id in this process, a file lock across processes."""
        with self.locks_lock:
            lock = self.locks.setdefault(adapter, threading.Lock())
        lock_file = self.cache_dir / ".locks" / (adapter.replace("/", "@") + ".lock")
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        with lock, open(lock_file, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
