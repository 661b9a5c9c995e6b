"""The model registry: a registered model per task, a version per finished adapter, a `champion` alias.

- `loraland-<task>` is the task's registered model. Each finished train job's adapter (the run's
  `adapter/` artifact: PEFT safetensors + adapter_config.json naming the base by its Hub id, never
  the base weights) becomes a version tagged with its base model, score, metric and job key.
- `update_champion(task)` points the alias `champion` at the best score (ties: the earliest
  version). The tracker calls it after every registration, so the champion moves as better jobs
  finish. Two workers finishing the same task at the same instant can race; the function re-checks
  until the versions it saw are stable, and calling it again (the driver does at sweep end) settles it.
- `promote(task, version)` (`loraland promote TASK VERSION`) overrides the choice and pins it: the
  versions that existed when it was promoted are no longer candidates, so automatic moves never
  undo a person's decision; only a version registered later with a strictly better score than the
  promoted one takes the alias over. `unpin(task)` returns to "best of all versions".
- `load_adapter_model(ref)` is the one function that loads an adapter back into a PeftModel.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from core.errors import NotFound
from core.paths import ADAPTER_CONFIG, ADAPTER_WEIGHTS, data_home
from core.schemas import QuantizationSettings
from tracking import store
from tracking.retry import call_with_retry, retrying

CHAMPION = "champion"
MODEL_PREFIX = "loraland-"
TAG_SCORE = "loraland.score"
TAG_PINNED_VERSION = "loraland.pinned_version"  # on the registered model: the promoted version
TAG_PINNED_AFTER = "loraland.pinned_after"  # on the registered model: highest version number when promoted


def model_name(task: str) -> str:
    """The registered model of a task: `loraland-<task>`."""
    return f"{MODEL_PREFIX}{task}"


def model_uri(task: str, alias_or_version: str | int = CHAMPION) -> str:
    """`models:/loraland-<task>@champion` or `models:/loraland-<task>/<version>`."""
    ref = str(alias_or_version)
    return f"models:/{model_name(task)}/{ref}" if ref.isdigit() else f"models:/{model_name(task)}@{ref}"


@retrying
def register_adapter(run_id: str, task: str, base_model: str, score: float, job_key: str = "",
                     uri: str | None = None) -> str:
    """Register the run's `adapter/` artifact as a version of the task's model; returns the version.

    Idempotent: a run already registered returns its existing version (safe to retry)."""
    client = store.client(uri)
    name = model_name(task)
    try:
        client.create_registered_model(name, tags={store.TAG_TASK: task},
                                       description=f"LoRA adapters for task {task}; alias `{CHAMPION}` = best score.")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for version in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        return version.version
    tags = {store.TAG_BASE_MODEL: base_model, TAG_SCORE: repr(float(score)), store.TAG_JOB_KEY: job_key,
            store.TAG_TASK: task}
    source = f"runs:/{run_id}/{store.ADAPTER_ARTIFACT}"
    return client.create_model_version(name, source, run_id=run_id, tags=tags).version


def versions(task: str, uri: str | None = None) -> list[ModelVersion]:
    """Every version of the task's model, oldest first ([] when none is registered)."""
    try:
        found = call_with_retry(store.client(uri).search_model_versions, f"name='{model_name(task)}'")
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    return sorted(found, key=lambda v: int(v.version))


def version_score(version: ModelVersion) -> float:
    """A version's score tag (-inf when missing or not a number)."""
    try:
        value = float(version.tags.get(TAG_SCORE, "nan"))
    except ValueError:
        return -math.inf
    return value if math.isfinite(value) else -math.inf


def champion(task: str, uri: str | None = None) -> ModelVersion | None:
    """The version the `champion` alias points at, or None."""
    try:
        return call_with_retry(store.client(uri).get_model_version_by_alias, model_name(task), CHAMPION)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def best_version(candidates: list[ModelVersion]) -> ModelVersion | None:
    """Highest score; ties go to the earliest version."""
    return max(sorted(candidates, key=lambda v: int(v.version)), key=version_score, default=None)  # max keeps the first


def update_champion(task: str, uri: str | None = None) -> str | None:
    """Point `champion` at the best eligible version (see the module doc on pins); returns it."""
    client = store.client(uri)
    best = None
    for _ in range(5):  # re-check: a version registered meanwhile by another worker is considered too
        listed = versions(task, uri)
        if not listed:
            return None
        model = call_with_retry(client.get_registered_model, model_name(task))
        pinned, after = model.tags.get(TAG_PINNED_VERSION), int(model.tags.get(TAG_PINNED_AFTER) or 0)
        eligible = [v for v in listed if pinned is None or str(v.version) == pinned or int(v.version) > after]
        best = best_version(eligible or listed)
        assert best is not None  # `listed` is not empty
        current = champion(task, uri)
        if current is None or current.version != best.version:
            call_with_retry(client.set_registered_model_alias, model_name(task), CHAMPION, best.version)
        if [v.version for v in versions(task, uri)] == [v.version for v in listed]:
            break
    return best.version if best else None


def promote(task: str, version: str | int, uri: str | None = None) -> None:
    """Make `version` the task's champion by hand (`loraland promote TASK VERSION`) and pin it.

    One-line errors: Unreachable when the tracking server does not answer, NotFound for a store that does not exist
    or a version the task lacks."""
    store.check_reachable(uri, existing=True)
    client = store.client(uri)
    known = versions(task, uri)
    if str(version) not in {str(v.version) for v in known}:
        listed = ", ".join(str(v.version) for v in known) or "none"
        raise NotFound(f"{model_name(task)} has no version {version}; versions: {listed}")
    call_with_retry(client.set_registered_model_alias, model_name(task), CHAMPION, str(version))
    call_with_retry(client.set_registered_model_tag, model_name(task), TAG_PINNED_VERSION, str(version))
    highest = str(max(int(v.version) for v in known))
    call_with_retry(client.set_registered_model_tag, model_name(task), TAG_PINNED_AFTER, highest)


def unpin(task: str, uri: str | None = None) -> str | None:
    """Undo `promote`: every version is a candidate again; returns the new champion."""
    client = store.client(uri)
    for key in (TAG_PINNED_VERSION, TAG_PINNED_AFTER):
        try:
            call_with_retry(client.delete_registered_model_tag, model_name(task), key)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    return update_champion(task, uri)


# --------------------------------------------------------------------------- what a server can serve


@dataclass(frozen=True)
class TaskAdapters:
    """One task's registered adapters: every version (oldest first) and the version `champion` points at."""

    task: str
    versions: list[ModelVersion]
    champion: str | None

    def champion_version(self) -> ModelVersion | None:
        """The champion's version entry, or None."""
        return next((v for v in self.versions if str(v.version) == self.champion), None)

    def for_base(self, base_model: str) -> ModelVersion | None:
        """The task's adapter for `base_model`: the champion when it is on that base (a promotion counts),
        else that base's best version (`best_version`); None when the task has none for it."""
        champion = self.champion_version()
        if champion is not None and champion.tags.get(store.TAG_BASE_MODEL) == base_model:
            return champion
        return best_version([v for v in self.versions if v.tags.get(store.TAG_BASE_MODEL) == base_model])


def published_adapters(uri: str | None = None) -> dict[str, TaskAdapters]:
    """Every task's registered adapters (task -> TaskAdapters), read with two paged registry searches."""
    client = store.client(uri)
    like = f"name LIKE '{MODEL_PREFIX}%'"
    models = call_with_retry(_all_pages, client.search_registered_models, like)
    found = call_with_retry(_all_pages, client.search_model_versions, like)
    by_name: dict[str, list[ModelVersion]] = {}
    for version in found:
        by_name.setdefault(version.name, []).append(version)
    return {model.name[len(MODEL_PREFIX):]: TaskAdapters(
        task=model.name[len(MODEL_PREFIX):],
        versions=sorted(by_name.get(model.name, []), key=lambda v: int(v.version)),
        champion=str(model.aliases[CHAMPION]) if CHAMPION in (model.aliases or {}) else None,
    ) for model in models}


def _all_pages(search: Callable[..., Any], filter_string: str) -> list[Any]:
    items: list[Any] = []
    token = None
    while True:
        page = search(filter_string, page_token=token)
        items += list(page)
        token = page.token
        if not token:
            return items


# --------------------------------------------------------------------------- getting adapters back


def resolve_run_id(ref: str, uri: str | None = None) -> str:
    """The run behind a reference: a run id, `runs:/<id>[/...]`, `models:/<name>/<version>` or
    `models:/<name>@<alias>`."""
    client = store.client(uri)
    if ref.startswith("runs:/"):
        return ref[len("runs:/"):].split("/", 1)[0]
    if ref.startswith("models:/"):
        body = ref[len("models:/"):]
        if "@" in body:
            name, alias = body.split("@", 1)
            version = call_with_retry(client.get_model_version_by_alias, name, alias)
        else:
            name, number = body.rsplit("/", 1)
            version = call_with_retry(client.get_model_version, name, number)
        if not version.run_id:
            raise NotFound(f"{ref} has no run behind it")
        return version.run_id
    return ref


def download_adapter(ref: str, dst: str | Path | None = None, uri: str | None = None,
                     max_bytes: int | None = None) -> Path:
    """Download the adapter folder of `ref` (see `resolve_run_id`); returns the local folder.

    Default destination: `<data_home()>/adapters/<run_id>` (reused when already there; a run's
    artifacts do not change once it finished). The download is staged and renamed into place. With `max_bytes`, an
    artifact whose listed files add up to more is refused (ValueError naming both sizes) before a byte is fetched."""
    run_id = resolve_run_id(ref, uri)
    target = Path(dst) if dst else data_home() / "adapters" / run_id
    if (target / ADAPTER_WEIGHTS).is_file():
        return target
    if max_bytes is not None:
        size = artifact_bytes(run_id, store.ADAPTER_ARTIFACT, uri)
        if size > max_bytes:
            raise ValueError(f"the adapter artifact of run {run_id} holds {size} bytes, more than the {max_bytes} an "
                             "adapter may take here")
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    local = Path(call_with_retry(store.client(uri).download_artifacts, run_id, store.ADAPTER_ARTIFACT, str(staging)))
    if target.exists():
        shutil.rmtree(target)
    local.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def artifact_bytes(run_id: str, path: str, uri: str | None = None) -> int:
    """The bytes the files under a run's artifact folder `path` add up to, as the artifact store lists them."""
    total = 0
    for item in call_with_retry(store.client(uri).list_artifacts, run_id, path):
        total += artifact_bytes(run_id, item.path, uri) if item.is_dir else int(item.file_size or 0)
    return total


def load_adapter_model(ref: str, device: str = "auto", uri: str | None = None, dst: str | Path | None = None) -> Any:
    """The adapter of `ref` (run id, runs:/, models:/name/version or models:/name@alias) on its base model: a PeftModel.

    The base model is the catalogue entry named by the run's `loraland.base_model` tag, loaded with
    the quantization the job trained with (the run's `quantization.*` params); the adapter's
    `base_model_name_or_path` must name that base, so a wrong pairing fails loudly."""
    from core.catalog import load_catalog
    from jobs.models import load_adapter, load_base_model, resolve_device

    run_id = resolve_run_id(ref, uri)
    run = call_with_retry(store.client(uri).get_run, run_id)
    base_name = run.data.tags.get(store.TAG_BASE_MODEL)
    if not base_name:
        raise ValueError(f"run {run_id} has no {store.TAG_BASE_MODEL} tag; was it logged by tracking.JobTracker?")
    spec = load_catalog().base_model(base_name)
    quant = QuantizationSettings.model_validate({key.split(".", 1)[1]: store.decode_param(value)
                                                 for key, value in run.data.params.items()
                                                 if key.startswith("quantization.")})
    folder = download_adapter(run_id, dst, uri)
    named = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if named != spec.hf_id:
        raise ValueError(f"adapter of run {run_id} was trained on {named!r}, but its run names base model "
                         f"{spec.name} ({spec.hf_id})")
    return load_adapter(load_base_model(spec, quant, resolve_device(device)), folder)
