"""`loraland data prepare` for jigsaw and customer_support (jobs/prepare.py) on small downloads in the originals'
formats (tests/fixtures/jigsaw_toxic: Kaggle's three CSVs; tests/fixtures/harper_valley: the GitHub release's per-call
JSON), and the catalogue reading what it wrote. legal and covid are tested in tests/test_study_fidelity.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from core.catalog import load_catalog
from core.errors import NotFound
from core.prompts import completion_for, prompt_for
from jobs import prepare
from jobs.data import eval_rows, load_rows, train_rows
from orchestrator import cli

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parent / "fixtures"
JIGSAW = FIXTURES / "jigsaw_toxic"
HARPER_VALLEY = FIXTURES / "harper_valley"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh LORALAND_HOME, so prepared files land in the test's folder."""
    monkeypatch.setenv("LORALAND_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def written(task: str) -> dict[str, pd.DataFrame]:
    """The split files `prepare` wrote for `task`, by split name."""
    return {path.stem: pd.read_csv(path) for path in sorted(prepare.task_dir(task).glob("*.csv"))}


# --------------------------------------------------------------------------- jigsaw


def test_prepare_jigsaw_writes_what_the_catalogue_reads(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "prepare", "jigsaw", "--from", str(JIGSAW)]) == 0
    assert "jigsaw: wrote train 5 rows, test 3 rows" in capsys.readouterr().out
    files = written("jigsaw")
    assert set(files) == {"train", "test"}
    assert list(files["train"]["is_toxic"]) == [0, 1, 0, 1, 0], "toxic when any of the six labels is 1"
    # The test row Kaggle left unlabelled (-1) has no gold answer and is left out; the others keep the file's order.
    assert list(files["test"]["id"]) == ["00a1b2c3d4e5f602", "00a1b2c3d4e5f603", "00a1b2c3d4e5f604"]
    assert list(files["test"]["is_toxic"]) == [1, 0, 0]

    task = load_catalog().task("jigsaw")
    train, test = train_rows(task), eval_rows(task)
    assert train[2]["comment_text"] == 'I moved the section on the café\nto the history article, see the "talk" page.'
    assert test[2]["comment_text"] == "Nice photo of the naïve-art museum."
    assert [completion_for(task, row) for row in test] == ["yes", "no", "no"]
    assert "Stop." in prompt_for(task, test[0]), "a multi-line comment reaches the prompt whole"


def test_prepare_jigsaw_reads_the_competitions_zipped_files(tmp_path: Path) -> None:
    download = tmp_path / "download"
    download.mkdir()
    for name in ("train.csv", "test.csv", "test_labels.csv"):
        with zipfile.ZipFile(download / f"{name}.zip", "w") as archive:
            archive.write(JIGSAW / name, arcname=name)
    assert prepare.prepare("jigsaw", download) == {"train": 5, "test": 3}
    assert written("jigsaw")["test"].equals(prepare.prepare_jigsaw(JIGSAW)["test"])


# --------------------------------------------------------------------------- customer_support


def test_prepare_customer_support_writes_what_the_catalogue_reads(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "prepare", "customer_support", "--from", str(HARPER_VALLEY)]) == 0
    # 8 calls with a task (the ninth has none) in the study's 1,245 : 245 : 391 proportions.
    assert "customer_support: wrote train 5 rows, validation 1 rows, test 2 rows" in capsys.readouterr().out
    files = written("customer_support")
    rows = pd.concat(files.values())
    assert sorted(rows["sid"]) == [f"1a2b3c4d5e6f700{i}" for i in range(1, 9)]
    task = load_catalog().task("customer_support")
    assert set(rows["task"]) <= set(task.labels or []), "labels spelled as the catalogue's, with spaces"
    branch_hours = rows.set_index("sid").loc["1a2b3c4d5e6f7008"]
    # Segments in index order (the file lists them reversed), one line per turn, the human transcript, [noise] kept.
    assert branch_hours["text"] == ("agent: hello\ncaller: when does the branch open on saturday\n"
                                    "agent: [noise] eight thirty")
    assert branch_hours["task"] == "get branch hours"

    test = eval_rows(task)
    assert [row["text"] for row in test] == list(files["test"]["text"])
    assert [completion_for(task, row) for row in test] == list(files["test"]["task"])
    assert len(train_rows(task)) == 5
    # The repository's data folder works as well as the repository, and the split is seeded.
    assert prepare.prepare_customer_support(HARPER_VALLEY / "data")["test"].equals(files["test"])


def test_split_sizes_of_a_small_harper_valley_release() -> None:
    assert prepare.split_sizes(1446, prepare.CUSTOMER_SUPPORT_SPLITS) == {"train": 957, "validation": 188, "test": 301}
    assert prepare.split_sizes(2000, prepare.CUSTOMER_SUPPORT_SPLITS) == prepare.CUSTOMER_SUPPORT_SPLITS


# --------------------------------------------------------------------------- errors and earlier files


def _one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert cli.main(["data", "prepare", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_missing_inputs_are_one_line_naming_what_to_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(JIGSAW, partial)
    (partial / "test_labels.csv").unlink()
    err = _one_line_error(capsys, "jigsaw", "--from", str(partial))
    assert "test_labels.csv not found" in err and "jigsaw-toxic-comment-classification-challenge" in err
    calls = tmp_path / "calls"
    shutil.copytree(HARPER_VALLEY, calls)
    (calls / "data" / "transcript" / "1a2b3c4d5e6f7003.json").unlink()
    assert "1a2b3c4d5e6f7003.json not found" in _one_line_error(capsys, "customer_support", "--from", str(calls))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no call metadata" in _one_line_error(capsys, "customer_support", "--from", str(empty))
    assert "is not a folder" in _one_line_error(capsys, "jigsaw", "--from", str(tmp_path / "nowhere"))
    assert "no preparer for task 'boolq'" in _one_line_error(capsys, "boolq", "--from", str(JIGSAW))
    task = load_catalog().task("customer_support")
    with pytest.raises(NotFound, match="run `loraland data prepare customer_support --from"):
        load_rows(task.dataset, "test", None, task.columns)


def test_a_failed_run_keeps_the_files_prepared_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepare.prepare("jigsaw", JIGSAW)
    before = {path.name: path.read_bytes() for path in prepare.task_dir("jigsaw").iterdir()}
    partial = tmp_path / "partial"
    shutil.copytree(JIGSAW, partial)
    (partial / "test.csv").unlink()
    with pytest.raises(NotFound):
        prepare.prepare("jigsaw", partial)
    # A failure while writing (here the second file) leaves the earlier files too, and no staging folder behind.
    real_to_csv, calls = pd.DataFrame.to_csv, []

    def failing_to_csv(frame: pd.DataFrame, path: Path, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_to_csv(frame, path, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", failing_to_csv)
    with pytest.raises(OSError, match="disk full"):
        prepare.prepare("jigsaw", JIGSAW)
    folder = prepare.task_dir("jigsaw")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert [path.name for path in folder.parent.iterdir()] == ["jigsaw"]


def test_a_malformed_download_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "jigsaw"
    shutil.copytree(JIGSAW, broken)
    (broken / "train.csv").write_bytes(b"")  # empty: not a CSV at all
    err = _one_line_error(capsys, "jigsaw", "--from", str(broken))
    assert "train.csv" in err and "not a readable utf-8 CSV" in err
    calls = tmp_path / "calls"
    shutil.copytree(HARPER_VALLEY, calls)
    (calls / "data" / "metadata" / "1a2b3c4d5e6f7002.json").write_text("{not json")
    err = _one_line_error(capsys, "customer_support", "--from", str(calls))
    assert "1a2b3c4d5e6f7002.json" in err and "not a Harper Valley call" in err


def test_a_truncated_zip_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 23, low (jobs/prepare.py): a download zip cut off mid-transfer, or corrupt inside, is one line naming the
    file, not a traceback."""
    download = tmp_path / "zipped"
    shutil.copytree(JIGSAW, download)
    with zipfile.ZipFile(download / "train.csv.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.write(JIGSAW / "train.csv", "train.csv")
    (download / "train.csv").unlink()
    whole = (download / "train.csv.zip").read_bytes()
    (download / "train.csv.zip").write_bytes(whole[: len(whole) // 2])
    err = _one_line_error(capsys, "jigsaw", "--from", str(download))
    assert "train.csv.zip" in err and "not a readable utf-8 CSV" in err
    corrupt = bytearray(whole)
    corrupt[60:90] = bytes(30)  # inside the compressed stream
    (download / "train.csv.zip").write_bytes(bytes(corrupt))
    assert "train.csv.zip" in _one_line_error(capsys, "jigsaw", "--from", str(download))


def test_a_run_cut_off_mid_swap_never_leaves_old_and_new_split_files_mixed(tmp_path: Path) -> None:
    """Issue 23, low (jobs/prepare.py): the new split files replace the old ones in one step. A run that dies after its
    first rename (every rename after it fails) leaves the folder wholly old, or wholly new, never a mix; a finished
    run leaves only the split files it wrote."""
    prepare.prepare("jigsaw", JIGSAW)
    folder = prepare.task_dir("jigsaw")
    (folder / "validation.csv").write_text("id\n")  # a split an earlier run wrote, that this download has not
    old = {path.name: path.read_bytes() for path in folder.iterdir()}
    changed = tmp_path / "changed"
    shutil.copytree(JIGSAW, changed)
    train = (changed / "train.csv").read_text().splitlines()
    (changed / "train.csv").write_text("\n".join(train[:-1]) + "\n")  # one row fewer
    prepare.prepare("jigsaw", changed, root=tmp_path / "elsewhere")
    new = {path.name: path.read_bytes() for path in prepare.task_dir("jigsaw", tmp_path / "elsewhere").iterdir()}
    renames = {"count": 0}

    def dies_after_one(real: Callable[..., None]) -> Callable[..., None]:
        def rename(*args: object, **kwargs: object) -> None:
            renames["count"] += 1
            if renames["count"] > 1:
                raise OSError("killed")
            real(*args, **kwargs)
        return rename

    with pytest.MonkeyPatch.context() as patch, contextlib.suppress(OSError):
        patch.setattr(os, "replace", dies_after_one(os.replace))
        patch.setattr(os, "rename", dies_after_one(os.rename))
        prepare.prepare("jigsaw", changed)
    now = {path.name: path.read_bytes() for path in folder.iterdir()} if folder.is_dir() else {}
    assert now in (old, new, {}), sorted(now)
    prepare.prepare("jigsaw", changed)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == new
    assert [path.name for path in folder.parent.iterdir()] == ["jigsaw"]
