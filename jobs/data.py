"""Task data: rows by task and split, from the Hub (`datasets.load_dataset`), local files, or the demo generators."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.config import DatasetSource, TaskSpec, data_home
from jobs.demo_data import demo_rows

Row = dict[str, Any]
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: DatasetSource, split: str, limit: int | None = None) -> list[Row]:
    """The first `limit` rows of `split` of `source` (all rows when `limit` is None)."""
    if source.kind == "demo":
        rows = demo_rows(source.id, split)
    elif source.kind == "hf":
        rows = _hub_rows(source, split, limit)
    else:
        rows = _file_rows(source, split)
    return rows[:limit] if limit else rows


def train_rows(task: TaskSpec, limit: int | None = None) -> list[Row]:
    """The rows a job fine-tunes on."""
    return load_rows(task.dataset, task.dataset.train_split, limit)


def eval_rows(task: TaskSpec, limit: int | None = None) -> list[Row]:
    """The rows a job evaluates on: the task's own eval set if it has one (e.g. HumanEval), first `limit` rows."""
    source = task.eval.dataset if task.eval else task.dataset
    return load_rows(source, source.eval_split, limit or task.eval_limit)


def _hub_rows(source: DatasetSource, split: str, limit: int | None) -> list[Row]:
    import datasets  # heavy: only workers that read the Hub pay for it

    configs = source.config.split("+") if source.config else [None]
    rows: list[Row] = []
    for config in configs:
        part = datasets.load_dataset(source.id, config, split=split)
        rows += part.select(range(min(limit, len(part)))).to_list() if limit else part.to_list()
    return rows


def _file_rows(source: DatasetSource, split: str) -> list[Row]:
    import datasets

    files = source.data_files or {}
    if split not in files:
        raise KeyError(f"dataset {source.id!r} has no file for split {split!r}; set dataset.data_files.{split}")
    path = Path(files[split])
    if not path.is_absolute():
        path = data_home() / "data" / path
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (download {source.id!r} there, or set dataset.data_files.{split})")
    builder = LOCAL_FORMATS.get(path.suffix)
    if builder is None:
        raise ValueError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_FORMATS)}")
    return datasets.load_dataset(builder, data_files=str(path), split="train").to_list()
