"""Local data files (jsonl, csv, parquet, gzipped text) through the loaders the catalogue's tasks use."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pytest

from core.catalog import load_catalog
from core.errors import ConfigError, NotFound
from core.prompts import completion_for, prompt_for
from core.schemas import DatasetSource, TaskSpec
from jobs.data import eval_rows, load_rows, train_rows

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tasks"
# The Kaggle Jigsaw task as `loraland data prepare jigsaw` writes it: a hex id, text, the six 0/1 labels (unused by
# the template) and `is_toxic`, which decides the completion.
ROWS: list[dict[str, Any]] = [json.loads(line) for line in (FIXTURES / "jigsaw.jsonl").read_text().splitlines()
                              if line.strip()]
GOLD = ["no", "yes", "no"]


def _csv_text(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write `rows` in the format `path`'s ending names (.jsonl, .csv, .parquet, optionally .gz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        pd.DataFrame(rows).to_parquet(path)
        return path
    text = _csv_text(rows) if name.endswith(".csv") else "".join(json.dumps(row) + "\n" for row in rows)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


def with_files(task: TaskSpec, **files: str) -> TaskSpec:
    """`task` reading its splits from `files` (validated like a config)."""
    data = task.model_dump()
    data["dataset"]["data_files"] = files
    return TaskSpec.model_validate(data)


def assert_task_rows(task: TaskSpec, rows: list[dict[str, Any]]) -> None:
    assert len(rows) == len(ROWS)
    for got, want in zip(rows, ROWS):
        assert {c: got[c] for c in task.columns} == {c: want[c] for c in task.columns}
    assert [completion_for(task, row) for row in rows] == GOLD
    assert [prompt_for(task, row) for row in rows] == [prompt_for(task, row) for row in ROWS]


def test_kaggle_csv_files_load_from_the_catalogue_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORALAND_HOME", str(tmp_path))
    task = load_catalog().task("jigsaw")
    assert task.dataset.kind == "kaggle" and task.dataset.data_files == {"train": "kaggle/jigsaw/train.csv",
                                                                         "test": "kaggle/jigsaw/test.csv"}
    write_rows(tmp_path / "data" / "kaggle" / "jigsaw" / "train.csv", ROWS)
    write_rows(tmp_path / "data" / "kaggle" / "jigsaw" / "test.csv", ROWS[::-1])
    assert_task_rows(task, train_rows(task))
    assert [row["id"] for row in eval_rows(task)] == [row["id"] for row in ROWS[::-1]]
    assert [row["id"] for row in eval_rows(task, 2)] == [row["id"] for row in ROWS[::-1][:2]]
    assert len(train_rows(task, 1)) == 1


@pytest.mark.parametrize("name", ["train.jsonl", "train.jsonl.gz", "train.csv.gz", "train.parquet"])
def test_every_local_format_loads(tmp_path: Path, name: str) -> None:
    path = write_rows(tmp_path / name, ROWS)
    task = with_files(load_catalog().task("jigsaw"), train=str(path), test=str(path))
    assert_task_rows(task, train_rows(task))


def _error(task: TaskSpec, kind: type[Exception]) -> str:
    with pytest.raises(kind) as caught:
        train_rows(task)
    message = str(caught.value)
    assert "\n" not in message, "errors are one line"
    return message


def test_bad_local_files_give_one_line_errors_naming_the_fix(tmp_path: Path) -> None:
    task = load_catalog().task("jigsaw")
    missing = tmp_path / "nowhere" / "train.csv"
    message = _error(with_files(task, train=str(missing)), NotFound)
    assert str(missing) in message and "data_files.train" in message
    for name in ("train.txt", "train.parquet.gz"):
        path = tmp_path / name
        path.write_text("id,comment_text,is_toxic\n1,hi,0\n")
        message = _error(with_files(task, train=str(path)), ConfigError)
        assert str(path) in message and "unsupported file type" in message and ".jsonl.gz" in message
    no_target = write_rows(tmp_path / "lacking.csv",
                           [{k: v for k, v in row.items() if k != "is_toxic"} for row in ROWS])
    message = _error(with_files(task, train=str(no_target)), ConfigError)
    assert str(no_target) in message and "missing column(s) is_toxic" in message
    assert "id, comment_text, is_toxic" in message
    message = _error(with_files(task, test=str(no_target)), ConfigError)
    assert "no file for split 'train'" in message and "data_files.train" in message


# Repositories that ship a dataset loading script, which `datasets` 4 and later refuse (huggingface/datasets#7693):
# the catalogue reads them only through the Hub's parquet conversion. Bare names are legacy ids the Hub redirects.
SCRIPT_REPOSITORIES = {"tner/bc5cdr", "eriktks/conllpp", "tuetschek/e2e_nlg", "JulesBelveze/tldr_news", "GEM/viggo",
                       "webnlg-challenge/web_nlg", "Salesforce/wikisql", "ucirvine/reuters21578"}
PARQUET_CONVERSION = "refs/convert/parquet"


def hub_sources() -> list[tuple[str, DatasetSource]]:
    """Every Hub source of the catalogue, training and separate evaluation sets, by task."""
    return [(task.name, source) for task in load_catalog().tasks.values()
            for source in [task.dataset] + ([task.eval.dataset] if task.eval else []) if source.kind == "hf"]


def test_no_catalogue_source_needs_a_loading_script_or_lacks_a_revision() -> None:
    sources = hub_sources()
    assert len(sources) == 28  # 27 study tasks on the Hub + HumanEval
    for task, source in sources:
        assert "/" in source.id, f"{task}: {source.id!r} is a legacy id (the Hub redirects it); name its repository"
        assert source.revision, f"{task}: {source.id} has no revision"
        if source.id in SCRIPT_REPOSITORIES:
            assert source.revision == PARQUET_CONVERSION, f"{task}: {source.id} ships a script; read its conversion"
        else:
            assert source.revision == "main" or re.fullmatch(r"[0-9a-f]{40}", source.revision), (task, source.revision)


def test_the_hub_loader_passes_each_sources_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def fake_load_dataset(*args: Any, **kwargs: Any) -> datasets.Dataset:
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([{"row": 0}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for _, source in hub_sources():
        calls.clear()
        load_rows(source, source.eval_split, limit=1)
        configs = source.config.split("+") if source.config else [None]
        assert calls == [((source.id, config), {"split": source.eval_split, "revision": source.revision})
                         for config in configs]
