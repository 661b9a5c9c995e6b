"""Task data: rows by task and split, from the Hub (`datasets.load_dataset`), local files, or the demo generators."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import ConfigError, NotFound
from core.paths import data_home
from core.schemas import DatasetSource, TaskSpec
from jobs.demo_data import demo_rows

Row = dict[str, Any]
# file ending -> `datasets` builder; text formats may be gzipped (HumanEval ships as HumanEval.jsonl.gz)
LOCAL_FORMATS = {
    ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
    ".jsonl.gz": "json", ".json.gz": "json", ".csv.gz": "csv",
}


def load_rows(source: DatasetSource, split: str, limit: int | None = None, columns: Sequence[str] = ()) -> list[Row]:
    """The first `limit` rows of `split` of `source` (all rows when `limit` is None).

    A local file (kind local/kaggle/github) must hold every one of `columns`.
    """
    if source.kind == "demo":
        rows = demo_rows(source.id, split)
    elif source.kind == "hf":
        rows = _hub_rows(source, split, limit)
    else:
        rows = _file_rows(source, split, columns)
    return rows[:limit] if limit else rows


def train_rows(task: TaskSpec, limit: int | None = None, held_out: int = 0) -> list[Row]:
    """The rows a job fine-tunes on; with `held_out`, none of `validation_rows(task, held_out)` (a search trial's)."""
    if not held_out:
        return load_rows(task.dataset, task.dataset.train_split, limit, task.columns)
    rows = load_rows(task.dataset, task.dataset.train_split, None, task.columns)
    validation = _validation_range(task, len(rows), held_out)
    rows = rows[: validation.start] + rows[validation.stop :]
    return rows[:limit] if limit else rows


def example_rows(task: TaskSpec) -> list[Row]:
    """The rows a task's prompt shows as worked examples (`task.worked_examples`, core/prompts.py): the first rows of
    its training split in the dataset's order (before any shuffle, `max_train_examples` cut or held-out slice), with
    the task's columns only; none for a task without worked examples (its data is not read)."""
    if not task.worked_examples:
        return []
    rows = load_rows(task.dataset, task.dataset.train_split, task.worked_examples, task.columns)
    return [{column: row[column] for column in task.columns if column in row} for row in rows]


def validation_rows(task: TaskSpec, n: int) -> list[Row]:
    """A search's validation slice: the last `n` rows of the training split (which its trials then never train on,
    `train_rows(held_out=n)`). Never an evaluation row: where the task evaluates on its training split itself, the
    slice must lie after the rows evaluation reads, else a ConfigError says so."""
    rows = load_rows(task.dataset, task.dataset.train_split, None, task.columns)
    return rows[_validation_range(task, len(rows), n)]


def _validation_range(task: TaskSpec, size: int, n: int) -> slice:
    """Where `validation_rows` lies in a training split of `size` rows."""
    train, evaluation = task.dataset, task.eval.dataset if task.eval else task.dataset
    same_split = (train.kind, train.id, train.config, train.train_split) == (
        evaluation.kind, evaluation.id, evaluation.config, evaluation.eval_split)
    # the training split's leading rows that evaluation may read (none when it evaluates on another split)
    evaluated = (evaluation.eval_split_size or task.eval_limit) if same_split else 0
    if n <= 0 or size - n < evaluated:
        raise ConfigError(f"task {task.name}", [f"no room for {n} validation rows in its training split of {size} rows "
                                                f"({evaluated} are evaluation rows); lower the validation rows"])
    return slice(size - n, size)


def eval_rows(task: TaskSpec, limit: int | None = None) -> list[Row]:
    """The rows a job evaluates on: the task's own eval set if it has one (e.g. HumanEval), first `limit` rows.

    The eval set is read from the Hub by default; a local copy (e.g. HumanEval.jsonl.gz in the
    standard format) is used by setting `task.eval.dataset` to `{kind: local, data_files: {test: PATH}}`.
    """
    source, columns = (task.eval.dataset, task.eval.columns) if task.eval else (task.dataset, task.columns)
    return load_rows(source, source.eval_split, limit or task.eval_limit, columns)


def _hub_rows(source: DatasetSource, split: str, limit: int | None) -> list[Row]:
    import datasets  # heavy: only workers that read the Hub pay for it

    configs = source.config.split("+") if source.config else [None]
    rows: list[Row] = []
    for config in configs:
        part = datasets.load_dataset(source.id, config, split=split, revision=source.revision)
        rows += part.select(range(min(limit, len(part)))).to_list() if limit else part.to_list()
    return rows


def local_file(source: DatasetSource, split: str) -> Path:
    """The file a local (kaggle/github/local) source reads for `split`; a relative path is under `data_home()/data`
    (`LORALAND_HOME`, the sweep's shared storage on a cluster: docs/cluster.md)."""
    files = source.data_files or {}
    if split not in files:
        raise ConfigError(f"dataset {source.id!r}", [f"no file for split {split!r}; set data_files.{split}"])
    path = Path(files[split])
    return path if path.is_absolute() else data_home() / "data" / path


def missing_file_fix(source: DatasetSource, split: str) -> str:
    """The one thing to do when a local source's file for `split` is missing."""
    path = local_file(source, split)
    prepare = (f"run `loraland data prepare {path.parent.name} --from DOWNLOAD_DIR`, "
               if source.kind in ("kaggle", "github") else "")
    return f"{prepare}download {source.id!r} there, or set data_files.{split}"


def _file_rows(source: DatasetSource, split: str, columns: Sequence[str]) -> list[Row]:
    """Rows of the local file for `split`; a relative path is under `data_home()/data`."""
    import datasets

    path = local_file(source, split)
    builder = LOCAL_FORMATS.get("".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix)
    if builder is None:
        raise ConfigError(str(path),
                          [f"unsupported file type; use one of {', '.join(LOCAL_FORMATS)} (data_files.{split})"])
    if not path.is_file():
        raise NotFound(f"{path} not found ({missing_file_fix(source, split)})")
    table = datasets.load_dataset(builder, data_files=str(path), split="train")
    missing = [column for column in columns if column not in table.column_names]
    if missing:
        raise ConfigError(str(path), [f"missing column(s) {', '.join(missing)}; the task needs {', '.join(columns)} "
                                      f"(the file has {', '.join(table.column_names) or 'none'})"])
    return table.to_list()
