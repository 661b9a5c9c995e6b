"""`loraland data prepare TASK --from PATH`: a task's original public download as the split files the catalogue reads.

Four of the study's tasks are not Hugging Face datasets; their catalogue entries read CSV files under
`<data_home()>/data/<kind>/<task>/` (`dataset.data_files`). Preparers (facts from
shared/reference/lora_land_task_formats.yaml and lora_land_tasks.csv; where the study's own preprocessing is not
published, the choice below is ours and says so):

- legal (Kaggle bahushruth/legalclausedataset: a folder of one CSV per clause type, columns clause_text and
  clause_type): all rows, in file-name order, shuffled with a fixed seed, then cut into the study's split sizes
  (train 17,000, validation 2,000, test 1,000; a smaller download keeps the same 17:2:1 proportions). Which rows the
  study put in which split is not published, so the split is ours, reproducible from the seed.
- covid (Kaggle datatattle/covid-19-nlp-text-classification: Corona_NLP_train.csv and Corona_NLP_test.csv, Latin-1
  encoded): the two files as they are (test 3,798 rows, the study's evaluation set), re-encoded as UTF-8.
- jigsaw (Kaggle jigsaw-toxic-comment-classification-challenge: train.csv, test.csv and test_labels.csv, each
  possibly still zipped as NAME.zip; columns id, comment_text and the six 0/1 labels toxic, severe_toxic, obscene,
  threat, insult, identity_hate): the study's 159,571 training rows are all of train.csv, its 153,164 test rows all of
  test.csv. Kaggle marks the test rows it never labelled with -1; having no gold answer, they are left out (63,978
  labelled rows remain, in file order). The study's `is_toxic` column is not documented; ours is 1 when any of the
  six labels is 1, else 0.
- customer_support (the Gridspace-Stanford Harper Valley Bank corpus, a GitHub release: the repository's
  `data/metadata/<sid>.json` and `data/transcript/<sid>.json`; pass the repository or its `data` folder): one row
  per call with a task, `task` = the first assigned task's `task_type` (spelled with spaces, as the catalogue's
  labels are) and `text` = the transcript's segments in order, one `speaker_role: words` line per turn (the
  transcriptionists' `human_transcript`, else the machine `transcript`; consecutive segments of one speaker
  joined). How the study flattened a call is not published. Split like legal: seeded shuffle into the study's
  train 1,245, validation 245 and test 391 rows, or those proportions of a smaller download (the release holds
  1,446 calls).

Every input is read and checked before anything is written (a download that is not a readable CSV, a truncated or
corrupt zip included, is one line naming the file); the files are written to a temporary folder next to the task's
folder, which then takes the task folder's place in one atomic exchange (`swap_folders`), so a failed or killed run
leaves the files prepared earlier as they were, and a reader never sees old and new split files mixed.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from core.errors import ConfigError, NotFound, UserError
from core.paths import data_home

SEED = 42
LEGAL_SPLITS = {"train": 17000, "validation": 2000, "test": 1000}
LEGAL_COLUMNS = ["clause_text", "clause_type"]
COVID_FILES = {"train": "Corona_NLP_train.csv", "test": "Corona_NLP_test.csv"}
COVID_COLUMNS = ["UserName", "ScreenName", "Location", "TweetAt", "OriginalTweet", "Sentiment"]
JIGSAW_LABELS = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
JIGSAW_UNLABELLED = -1  # test_labels.csv's value on the test rows Kaggle did not score
CUSTOMER_SUPPORT_SPLITS = {"train": 1245, "validation": 245, "test": 391}

Splits = dict[str, pd.DataFrame]


@dataclass(frozen=True)
class Preparer:
    """How one task's download becomes its split files."""

    folder: str  # under data_home()/data, where the catalogue's `data_files` point
    download: str  # what `--from` names, for messages
    read: Callable[[Path], Splits]


def task_dir(task: str, root: Path | None = None) -> Path:
    """Where the catalogue reads a prepared task's split files (`data_files: <kind>/<task>/<split>.csv`)."""
    if task not in PREPARERS:
        raise NotFound(f"no preparer for task {task!r}; tasks with one: {', '.join(sorted(PREPARERS))}")
    return (root or data_home() / "data") / PREPARERS[task].folder


def split_sizes(total: int, study: dict[str, int]) -> dict[str, int]:
    """The study's split sizes when `total` holds them all; else the same proportions (the first split takes the rest).
    """
    if total >= sum(study.values()):
        return dict(study)
    names = list(study)
    sizes = {name: round(total * study[name] / sum(study.values())) for name in names[1:]}
    return {names[0]: total - sum(sizes.values()), **sizes}


def seeded_splits(rows: pd.DataFrame, study: dict[str, int]) -> Splits:
    """`rows` shuffled with SEED and cut, in order, into `split_sizes(len(rows), study)`."""
    rows = rows.sample(frac=1.0, random_state=SEED).reset_index(drop=True)
    splits, start = {}, 0
    for name, size in split_sizes(len(rows), study).items():
        splits[name] = rows.iloc[start:start + size].reset_index(drop=True)
        start += size
    return splits


def _read_csv(path: Path, columns: list[str], encoding: str = "utf-8") -> pd.DataFrame:
    """A CSV (or a zip holding one) with at least `columns` (only those kept), or a ConfigError naming what is wrong
    (unreadable, not `encoding`, missing columns)."""
    try:
        frame = pd.read_csv(path, encoding=encoding)
    # UnicodeDecodeError, EmptyDataError, zips of several files; a truncated or corrupt zip (BadZipFile, zlib, EOF)
    except (ValueError, pd.errors.ParserError, zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise ConfigError(str(path), [f"not a readable {encoding} CSV with columns {', '.join(columns)}: "
                                      f"{str(error).splitlines()[0]}"]) from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ConfigError(str(path), [f"missing column(s) {', '.join(missing)}; expected {', '.join(columns)}"])
    return frame[columns]


def _download_file(source: Path, name: str, download: str, zipped: bool = False) -> Path:
    """`source/name` (or `source/name.zip` when `zipped` allows it), else a NotFound naming the download to pass."""
    for path in (source / name, source / f"{name}.zip") if zipped else (source / name,):
        if path.is_file():
            return path
    raise NotFound(f"{source / name} not found; pass {download}")


def prepare_legal(source: Path) -> Splits:
    """The legal clause download (a folder of per-type CSVs) as seeded train/validation/test splits of the study's
    sizes."""
    files = sorted(source.glob("*.csv"))
    if not files:
        raise NotFound(f"{source}: no CSV files; pass {PREPARERS['legal'].download}")
    return seeded_splits(pd.concat([_read_csv(path, LEGAL_COLUMNS) for path in files], ignore_index=True), LEGAL_SPLITS)


def prepare_covid(source: Path) -> Splits:
    """The COVID-19 tweets download (its train and test CSVs, Latin-1) as UTF-8 train/test splits, rows unchanged."""
    download = PREPARERS["covid"].download
    return {split: _read_csv(_download_file(source, name, download), COVID_COLUMNS, encoding="latin-1")
            for split, name in COVID_FILES.items()}


def with_is_toxic(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` plus `is_toxic`: 1 when any of JIGSAW_LABELS is 1, else 0."""
    return frame.assign(is_toxic=(frame[JIGSAW_LABELS] == 1).any(axis=1).astype(int))


def prepare_jigsaw(source: Path) -> Splits:
    """The Jigsaw toxic comment download as train (all of train.csv) and test (the labelled rows of test.csv), each with
    `is_toxic`."""
    download = PREPARERS["jigsaw"].download
    columns = ["id", "comment_text", *JIGSAW_LABELS]
    train = _read_csv(_download_file(source, "train.csv", download, zipped=True), columns)
    test = _read_csv(_download_file(source, "test.csv", download, zipped=True), ["id", "comment_text"])
    labels = _read_csv(_download_file(source, "test_labels.csv", download, zipped=True), ["id", *JIGSAW_LABELS])
    try:
        test = test.merge(labels, on="id", how="inner", validate="one_to_one")
    except pd.errors.MergeError:
        raise ConfigError(str(source),
                          ["test.csv and test_labels.csv repeat an id; pass the unmodified download"]) from None
    test = test[(test[JIGSAW_LABELS] != JIGSAW_UNLABELLED).all(axis=1)].reset_index(drop=True)
    return {"train": with_is_toxic(train), "test": with_is_toxic(test)}


def call_text(segments: list[dict[str, Any]]) -> str:
    """A Harper Valley transcript (its list of segments) as one `speaker_role: words` line per turn, in segment
    order."""
    spoken = [(s["speaker_role"], (s.get("human_transcript") or s.get("transcript") or "").strip())
              for s in sorted(segments, key=lambda s: s["index"])]
    turns = itertools.groupby([(role, words) for role, words in spoken if words], key=lambda pair: pair[0])
    return "\n".join(f"{role}: {' '.join(words for _, words in group)}" for role, group in turns)


def _harper_valley_call(metadata: Path, transcripts: Path) -> dict[str, str] | None:
    """One call's row (sid, text, task), or None for a call with no assigned task."""
    try:
        meta = json.loads(metadata.read_text(encoding="utf-8"))
        if not meta.get("tasks"):
            return None
        transcript = transcripts / metadata.name
        if not transcript.is_file():
            raise NotFound(f"{transcript} not found; pass {PREPARERS['customer_support'].download}")
        segments = json.loads(transcript.read_text(encoding="utf-8"))
        return {"sid": metadata.stem, "text": call_text(segments), "task": meta["tasks"][0]["task_type"]}
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
        raise ConfigError(str(metadata), [f"not a Harper Valley call ({type(error).__name__}: {error}); pass "
                                          f"{PREPARERS['customer_support'].download}"]) from None


def prepare_customer_support(source: Path) -> Splits:
    """The Harper Valley Bank release as seeded train/validation/test splits of the study's sizes, one row per call."""
    data = source / "data" if (source / "data" / "metadata").is_dir() else source
    files = sorted((data / "metadata").glob("*.json"))
    if not files:
        raise NotFound(f"{data / 'metadata'}: no call metadata (.json); pass {PREPARERS['customer_support'].download}")
    calls = [row for path in files if (row := _harper_valley_call(path, data / "transcript")) is not None]
    return seeded_splits(pd.DataFrame(calls, columns=["sid", "text", "task"]), CUSTOMER_SUPPORT_SPLITS)


PREPARERS: dict[str, Preparer] = {
    "legal": Preparer("kaggle/legal", "the unzipped Kaggle legalclausedataset folder", prepare_legal),
    "covid": Preparer("kaggle/covid", "the unzipped Kaggle covid-19-nlp-text-classification folder", prepare_covid),
    "jigsaw": Preparer("kaggle/jigsaw", "the unzipped Kaggle jigsaw-toxic-comment-classification-challenge folder "
                       "(train.csv, test.csv, test_labels.csv)", prepare_jigsaw),
    "customer_support": Preparer("github/customer_support", "a clone of cricketclub/gridspace-stanford-harper-valley "
                                 "(or its data folder)", prepare_customer_support),
}


def write_splits(splits: Splits, out: Path) -> None:
    """Write the splits as the folder `out` (`<split>.csv` each, nothing else): all into a temporary folder beside `out`
    first, which then takes `out`'s place at once (`swap_folders`); the old folder is deleted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for split, frame in splits.items():
            frame.to_csv(staging / f"{split}.csv", index=False)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the prepared files from other users of the data folder
        swap_folders(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


RENAME_EXCHANGE = 2  # linux/fs.h: renameat2 swaps the two paths in one step


def swap_folders(new: Path, target: Path) -> None:
    """Put folder `new` at `target`, the old `target` (if any) at `new`, in one atomic step where the kernel offers it
    (Linux's renameat2 RENAME_EXCHANGE). Elsewhere two renames: a crash between them leaves `target` missing (a re-run
    writes it), never half old and half new."""
    if not target.exists():
        os.rename(new, target)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_cwd = -100  # AT_FDCWD
    if renameat2 is not None and renameat2(at_cwd, os.fsencode(new), at_cwd, os.fsencode(target), RENAME_EXCHANGE) == 0:
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
    os.rename(target, aside / target.name)
    os.rename(new, target)
    os.rename(aside / target.name, new)
    aside.rmdir()


def prepare(task: str, source: str | Path, root: Path | None = None) -> dict[str, int]:
    """Write `task`'s split files from its download at `source`; returns the rows written per split."""
    out = task_dir(task, root)
    path = Path(source)
    if not path.is_dir():
        raise NotFound(f"{path} is not a folder; pass {PREPARERS[task].download}")
    splits = PREPARERS[task].read(path)
    write_splits(splits, out)
    return {split: len(frame) for split, frame in splits.items()}
