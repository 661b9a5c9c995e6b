"""`loraland data check SWEEP`: where each task's data and each base model's weights come from, whether they load,
and the one command that fixes each problem, before a GPU-hour is spent.

Two parts. `local_checks` needs nothing but this machine: prepared files present under `LORALAND_HOME`, every Hub
source declaring a revision, `HF_TOKEN` set where a base model is gated. `loraland sweep` runs it as its preflight,
before Ray or MLflow is touched. `hub_checks` asks the Hub through a `HubClient` (the real one: `HfHub`, huggingface_hub
and `datasets`' builder inspection; tests pass a fake): the revision exists and what commit it is, the split sizes
against the catalogue's, and whether the workers' token may download a gated model. Offline, every Hub check says it
could not be made and how to make it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from core.catalog import Catalog, load_catalog
from core.errors import ConfigError
from core.schemas import BaseModelSpec, DatasetSource, TaskSpec
from jobs.data import local_file, missing_file_fix
from orchestrator.config import SweepConfig

State = Literal["ok", "fix", "unchecked"]
SHA = re.compile(r"[0-9a-f]{40}")
HUB = "https://huggingface.co"


@dataclass(frozen=True)
class Check:
    """One row of the table: a task's or base model's source, whether it loads, and what to do if not."""

    subject: str
    source: str
    state: State
    detail: str
    fix: str = ""


class HubMissing(Exception):
    """The repository, revision, config or split does not exist (or needs a loading script)."""


class HubDenied(Exception):
    """The token may not read the repository (gated: its terms not accepted, or no token)."""


class HubOffline(Exception):
    """The Hub does not answer from this machine."""


class HubClient(Protocol):
    """What `hub_checks` asks the Hub; each method raises HubMissing, HubDenied or HubOffline."""

    def dataset_sha(self, repo_id: str, revision: str | None) -> str:
        """The commit `revision` of the dataset repository points at."""
        ...

    def split_sizes(self, repo_id: str, config: str | None, revision: str | None) -> dict[str, int]:
        """Rows per split as the dataset's builder declares them ({} when it declares none)."""
        ...

    def model_sha(self, repo_id: str) -> str:
        """The model's current commit, after checking that the client's token may download it."""
        ...


def source_label(source: DatasetSource) -> str:
    """Where a source's rows come from, in one short phrase."""
    if source.kind == "hf":
        return f"Hub {source.id}" + (f" [{source.config}]" if source.config else "") + f" @ {source.revision or '?'}"
    if source.kind == "demo":
        return f"generated ({source.id})"
    return f"{source.kind} files ({source.id})"


def task_sources(task: TaskSpec) -> list[DatasetSource]:
    """The training source and, when separate, the evaluation source."""
    return [task.dataset] + ([task.eval.dataset] if task.eval else [])


def local_source_check(task: TaskSpec, source: DatasetSource) -> Check:
    """What this machine can tell of one source: a Hub source declares a revision; a file source's files exist."""
    subject, label = f"task {task.name}", source_label(source)
    if source.kind == "demo":
        return Check(subject, label, "ok", "generated offline")
    if source.kind == "hf":
        if not source.revision:
            return Check(subject, label, "fix", "no revision: the Hub's copy may change under the sweep",
                         f"set dataset.revision of task {task.name} (a commit SHA; `loraland data check` prints it)")
        return Check(subject, label, "ok", f"declares revision {source.revision}")
    paths = {split: local_file(source, split) for split in (source.train_split, source.eval_split)}
    missing = {split: path for split, path in paths.items() if not path.is_file()}
    if missing:
        return Check(subject, label, "fix", f"missing {', '.join(map(str, missing.values()))}",
                     missing_file_fix(source, next(iter(missing))))
    return Check(subject, label, "ok", f"files present under {paths[source.train_split].parent}")


def local_model_check(model: BaseModelSpec, env: Mapping[str, str]) -> Check:
    """A tiny model is built here; a gated Hub model needs `HF_TOKEN` in the environment the workers get."""
    subject = f"base model {model.name}"
    if model.tiny:
        return Check(subject, "built from config", "ok", "tiny model, no download")
    label = f"Hub {model.hf_id}"
    if model.gated and not env.get("HF_TOKEN"):
        return Check(subject, label, "fix", "gated on the Hub and HF_TOKEN is not set",
                     f"accept the terms at {HUB}/{model.hf_id}, then `export HF_TOKEN=hf_...` (that account's "
                     "read token) and pass it to the workers (docs/cluster.md)")
    return Check(subject, label, "ok", "gated; HF_TOKEN is set" if model.gated else "public")


def local_checks(sweep: SweepConfig, catalog: Catalog | None = None,
                 env: Mapping[str, str] | None = None) -> list[Check]:
    """Every check this machine can make alone, for each task and base model of the sweep (no network)."""
    catalog = catalog or load_catalog()
    env = os.environ if env is None else env
    checks = [local_source_check(catalog.task(name), source)
              for name in sweep.tasks for source in task_sources(catalog.task(name))]
    return checks + [local_model_check(catalog.base_model(name), env) for name in sweep.base_models]


def data_preflight(sweep: SweepConfig, catalog: Catalog | None = None, env: Mapping[str, str] | None = None) -> None:
    """`loraland sweep`'s data preflight: a ConfigError with one line per problem (and its fix) before Ray or MLflow
    is touched."""
    problems = [f"{c.subject}: {c.detail}; fix: {c.fix}" for c in local_checks(sweep, catalog, env) if c.state == "fix"]
    if problems:
        raise ConfigError(f"sweep {sweep.name} (data preflight; `loraland data check` for the rest)", problems)


def split_rows(sizes: Mapping[str, int], split: str) -> int | None:
    """Rows of `split` (`a+b` adds two splits); None when the builder does not declare one of them."""
    parts = [sizes.get(name) for name in split.split("+")]
    return None if any(p is None for p in parts) else sum(p for p in parts if p is not None)


def hub_source_check(task: TaskSpec, source: DatasetSource, hub: HubClient) -> Check:
    """The revision resolves (and is pinned), and the evaluation split holds the catalogue's row count."""
    subject, label = f"task {task.name}", source_label(source)
    sha = hub.dataset_sha(source.id, source.revision)
    sizes: dict[str, int] = {}
    for config in source.config.split("+") if source.config else [None]:
        for split, rows in hub.split_sizes(source.id, config, source.revision).items():
            sizes[split] = sizes.get(split, 0) + rows
    eval_rows = split_rows(sizes, source.eval_split)
    if sizes and (split_rows(sizes, source.train_split) is None or eval_rows is None):
        return Check(subject, label, "fix", f"splits {', '.join(sorted(sizes))} lack {source.train_split} or "
                     f"{source.eval_split}", f"set train_split/eval_split of task {task.name} to splits it has")
    if source.eval_split_size is not None and eval_rows is not None and eval_rows != source.eval_split_size:
        return Check(subject, label, "fix", f"{source.eval_split} has {eval_rows} rows, the catalogue says "
                     f"{source.eval_split_size}", f"check the revision of task {task.name} against the study's data")
    counted = f"{source.eval_split} {eval_rows} rows" if eval_rows is not None else "split sizes not declared"
    if source.revision is None or not SHA.fullmatch(source.revision):
        return Check(subject, label, "fix", f"loads ({counted}); {source.revision or 'no revision'} is not pinned",
                     f"set dataset.revision of task {task.name} to {sha}")
    return Check(subject, label, "ok", f"loads ({counted}) at {sha[:12]}")


def hub_model_check(model: BaseModelSpec, hub: HubClient) -> Check:
    """The weights exist and the workers' token may download them."""
    sha = hub.model_sha(model.hf_id)
    return Check(f"base model {model.name}", f"Hub {model.hf_id}", "ok",
                 f"downloadable{' with HF_TOKEN' if model.gated else ''} at {sha[:12]}")


@contextlib.contextmanager
def _outcome(into: list[Check], subject: str, label: str, model_id: str | None = None) -> Iterator[None]:
    """Turn the Hub's answer into a row: missing, denied or offline (the row says how to make the check)."""
    try:
        yield
    except HubMissing as exc:
        into.append(Check(subject, label, "fix", str(exc), "point the catalogue entry at a loadable source "
                          "(docs/data.md)"))
    except HubDenied as exc:
        into.append(Check(subject, label, "fix", str(exc), f"accept the terms at {HUB}/{model_id} and set HF_TOKEN to "
                          "that account's read token" if model_id else "set HF_TOKEN to a token that may read it"))
    except HubOffline as exc:
        into.append(Check(subject, label, "unchecked", f"the Hub did not answer ({exc})",
                          "rerun where huggingface.co answers"))


def hub_checks(sweep: SweepConfig, hub: HubClient, catalog: Catalog | None = None) -> list[Check]:
    """Every Hub source and Hub model of the sweep, asked of `hub`; once it is offline the rest are left unchecked."""
    catalog = catalog or load_catalog()
    checks: list[Check] = []
    for name in sweep.tasks:
        task = catalog.task(name)
        for source in (s for s in task_sources(task) if s.kind == "hf"):
            with _outcome(checks, f"task {name}", source_label(source)):
                checks.append(hub_source_check(task, source, hub))
    for name in sweep.base_models:
        model = catalog.base_model(name)
        if not model.tiny:
            with _outcome(checks, f"base model {name}", f"Hub {model.hf_id}", model.hf_id):
                checks.append(hub_model_check(model, hub))
    return checks


def data_check(sweep: SweepConfig, hub: HubClient | None, catalog: Catalog | None = None,
               env: Mapping[str, str] | None = None) -> list[Check]:
    """The whole table: the local checks, each local `ok` replaced by the Hub's row for the same source (`hub` None:
    local checks only)."""
    local = local_checks(sweep, catalog, env)
    remote = hub_checks(sweep, hub, catalog) if hub is not None else []
    answered = {(c.subject, c.source) for c in remote}
    return [c for c in local if c.state == "fix" or (c.subject, c.source) not in answered] + remote


class HfHub:
    """The real Hub: huggingface_hub's API for revisions, models and gated access, `datasets`' builder for splits.
    `HF_ENDPOINT` points both at a mirror; a failure to connect ends every later call at once (HubOffline)."""

    def __init__(self, token: str | None = None, endpoint: str | None = None) -> None:
        from huggingface_hub import HfApi

        self.token: str | bool = token or False  # the workers' token only, never a login cached on this machine
        self.api = HfApi(endpoint=endpoint, token=self.token)
        self.offline: str | None = None

    def dataset_sha(self, repo_id: str, revision: str | None) -> str:
        with self._translated():
            return str(self.api.dataset_info(repo_id, revision=revision).sha)

    def split_sizes(self, repo_id: str, config: str | None, revision: str | None) -> dict[str, int]:
        import datasets

        with self._translated():
            builder = datasets.load_dataset_builder(repo_id, config, revision=revision, token=self.token)
        return {name: int(split.num_examples) for name, split in (builder.info.splits or {}).items()}

    def model_sha(self, repo_id: str) -> str:
        with self._translated():
            info = self.api.model_info(repo_id)
            if info.gated:
                self.api.auth_check(repo_id, repo_type="model")
            return str(info.sha)

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        import httpx2  # the HTTP client huggingface_hub 2 uses (datasets goes through it too)
        from huggingface_hub import errors

        if self.offline:
            raise HubOffline(self.offline)
        try:
            yield
        except errors.GatedRepoError as exc:
            raise HubDenied(f"gated: {_first_line(exc)}") from None
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError) as exc:
            raise HubMissing(_first_line(exc)) from None
        except (errors.OfflineModeIsEnabled, httpx2.TransportError, ConnectionError) as exc:
            self.offline = _first_line(exc) or type(exc).__name__
            raise HubOffline(self.offline) from None
        except (RuntimeError, ValueError, FileNotFoundError) as exc:  # `datasets`: a script, a config, a split
            raise HubMissing(_first_line(exc)) from None


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """The error's message on one line, cut to `limit` characters (the Hub's messages run to a paragraph)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
