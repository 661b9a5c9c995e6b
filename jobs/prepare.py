"""`loraland data prepare TASK --from PATH`: turn a task's original public download into the split files the catalogue reads.

Some of the study's tasks are not Hugging Face datasets; their catalogue entries read CSV files under
`<data_home()>/data/kaggle/<task>/` (`dataset.data_files`). Preparers (facts from
shared/reference/lora_land_task_formats.yaml):

- legal (Kaggle bahushruth/legalclausedataset: a folder of one CSV per clause type, columns clause_text and
  clause_type): all rows, in file-name order, shuffled with a fixed seed, then cut into the study's split sizes
  (train 17,000, validation 2,000, test 1,000; a smaller download keeps the same 17:2:1 proportions). Which rows the
  study put in which split is not published, so the split is ours, reproducible from the seed.
- covid (Kaggle datatattle/covid-19-nlp-text-classification: Corona_NLP_train.csv and Corona_NLP_test.csv, Latin-1
  encoded): the two files as they are (test 3,798 rows, the study's evaluation set), re-encoded as UTF-8.

customer_support and jigsaw have no preparer yet (see the catalogue's comments on their sources).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from jobs.config import data_home
from jobs.errors import ConfigError, NotFound

SEED = 42
LEGAL_SPLITS = {"train": 17000, "validation": 2000, "test": 1000}
LEGAL_COLUMNS = ["clause_text", "clause_type"]
COVID_FILES = {"train": "Corona_NLP_train.csv", "test": "Corona_NLP_test.csv"}
COVID_COLUMNS = ["UserName", "ScreenName", "Location", "TweetAt", "OriginalTweet", "Sentiment"]


def task_dir(task: str, root: Path | None = None) -> Path:
    """Where the catalogue reads a prepared task's split files (`data_files: kaggle/<task>/<split>.csv`)."""
    return (root or data_home() / "data") / "kaggle" / task


def split_sizes(total: int, study: dict[str, int]) -> dict[str, int]:
    """The study's split sizes when `total` holds them all; else the same proportions (the first split takes the rest)."""
    if total >= sum(study.values()):
        return dict(study)
    names = list(study)
    sizes = {name: round(total * study[name] / sum(study.values())) for name in names[1:]}
    return {names[0]: total - sum(sizes.values()), **sizes}


def _read_csv(path: Path, columns: list[str], encoding: str = "utf-8") -> pd.DataFrame:
    """A CSV with at least `columns` (only those kept), or a ConfigError naming what is missing."""
    frame = pd.read_csv(path, encoding=encoding)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ConfigError(str(path), [f"missing column(s) {', '.join(missing)}; expected {', '.join(columns)}"])
    return frame[columns]


def prepare_legal(source: Path) -> dict[str, pd.DataFrame]:
    """The legal clause download (a folder of per-type CSVs) as seeded train/validation/test splits of the study's sizes."""
    files = sorted(source.glob("*.csv"))
    if not files:
        raise NotFound(f"{source}: no CSV files; pass the unzipped Kaggle legalclausedataset folder")
    rows = pd.concat([_read_csv(path, LEGAL_COLUMNS) for path in files], ignore_index=True)
    rows = rows.sample(frac=1.0, random_state=SEED).reset_index(drop=True)
    splits, start = {}, 0
    for name, size in split_sizes(len(rows), LEGAL_SPLITS).items():
        splits[name] = rows.iloc[start:start + size].reset_index(drop=True)
        start += size
    return splits


def prepare_covid(source: Path) -> dict[str, pd.DataFrame]:
    """The COVID-19 tweets download (its train and test CSVs, Latin-1) as UTF-8 train/test splits, rows unchanged."""
    splits = {}
    for split, name in COVID_FILES.items():
        path = source / name
        if not path.is_file():
            raise NotFound(f"{path} not found; pass the unzipped Kaggle covid-19-nlp-text-classification folder")
        splits[split] = _read_csv(path, COVID_COLUMNS, encoding="latin-1")
    return splits


PREPARERS: dict[str, Callable[[Path], dict[str, pd.DataFrame]]] = {"legal": prepare_legal, "covid": prepare_covid}


def prepare(task: str, source: str | Path, root: Path | None = None) -> dict[str, int]:
    """Write `task`'s split files from its download at `source`; returns the rows written per split."""
    if task not in PREPARERS:
        raise NotFound(f"no preparer for task {task!r}; tasks with one: {', '.join(sorted(PREPARERS))}")
    path = Path(source)
    if not path.is_dir():
        raise NotFound(f"{path} is not a folder; pass the unzipped download of {task!r}")
    out = task_dir(task, root)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, frame in PREPARERS[task](path).items():
        frame.to_csv(out / f"{split}.csv", index=False)
        counts[split] = len(frame)
    return counts
