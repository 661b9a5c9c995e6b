"""A job's storage against another user of the node and a hostile store (issue 23, M7 and a low finding): the scratch
folder of a remote `output_dir` is private, the store is the truth for a finished result, a checkpoint's trainer state
runs no code, and no store key writes outside the folder it is fetched into.

The remote `output_dir` is a `file://` URI (pyarrow's local filesystem: the same code path as S3, no service) except
where S3 keys that no filesystem can hold (`..`, an absolute part) are needed: the session's moto S3 server.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from pathlib import Path

import pytest

from core.errors import ConfigError, Conflict
from jobs.storage import JobStorage
from tests.helpers import tiny_job
from tests.object_store import S3Store


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh temporary folder as the process's tempdir (where scratch folders go)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.mark.unit
def test_the_scratch_folder_is_private_to_this_user(private_tmp: Path, tmp_path: Path) -> None:
    """M7: the scratch folder of a remote output_dir is under a folder of this user only (0700), not a predictable name
    every user of the node can create first; a root folder that is open to others, or a link, is refused in one
    line."""
    storage = JobStorage(f"file://{tmp_path}/store/job")
    root = private_tmp / f"loraland-jobs-{os.getuid()}"
    assert storage.local.parent == root
    assert root.stat().st_mode & 0o777 == 0o700 and root.stat().st_uid == os.getuid()
    root.chmod(0o777)  # planted open to everyone
    with pytest.raises(Conflict, match="not a private folder of this user") as refused:
        JobStorage(f"file://{tmp_path}/store/job")
    assert len(str(refused.value).splitlines()) == 1
    root.rmdir()
    root.symlink_to(tmp_path)  # planted as a link to a folder elsewhere
    with pytest.raises(Conflict, match="not a private folder"):
        JobStorage(f"file://{tmp_path}/store/job")


@pytest.mark.unit
def test_a_scratch_result_the_store_lacks_does_not_end_the_job(private_tmp: Path, tmp_path: Path) -> None:
    """M7: a result.json in the scratch folder that the store does not hold (planted, or left by something else) is
    not the job's result: it is deleted and the job runs; one the store holds is fetched."""
    from jobs.run import RESULT_FILE, finished_result

    config = tiny_job(tmp_path / "unused")
    config = config.model_copy(update={"output_dir": f"file://{tmp_path}/store/job"})
    (tmp_path / "store" / "job").mkdir(parents=True)  # a local filesystem, unlike a bucket, needs the folder
    storage = JobStorage(config.output_dir)
    storage.local.mkdir(parents=True, exist_ok=True)
    (storage.local / RESULT_FILE).write_text(json.dumps({"job_key": config.job_key, "score": 1.0}))
    assert finished_result(storage, config) is None
    assert not (storage.local / RESULT_FILE).exists()
    assert not storage.pull_file(RESULT_FILE)


@pytest.mark.unit
def test_a_checkpoints_trainer_state_runs_no_code(tmp_path: Path) -> None:
    """M7: `trainer_state.pt` is read with `weights_only=True`: a pickle that would run code when loaded (here: create
    a file) is refused in one line naming the checkpoint, and the code never runs."""
    import torch
    from transformers import get_scheduler

    from jobs.checkpoints import TrainState, load_trainer_state

    marker = tmp_path / "code-ran"

    class Planted:
        def __reduce__(self) -> tuple[object, tuple[Path]]:
            return pathlib.Path.touch, (marker,)

    checkpoint = tmp_path / "checkpoints" / "step-00000001"
    checkpoint.mkdir(parents=True)
    torch.save({"optimizer": Planted(), "scheduler": {}, "rng": {}}, checkpoint / "trainer_state.pt")
    (checkpoint / "state.json").write_text(json.dumps({"step": 1}))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=2)
    with pytest.raises(Conflict, match="step-00000001: trainer_state.pt holds more than tensors") as refused:
        load_trainer_state(checkpoint, optimizer, scheduler)
    assert not marker.exists() and len(str(refused.value).splitlines()) == 1
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"python": __import__("random").getstate(), "torch": torch.get_rng_state()}},
               checkpoint / "trainer_state.pt")
    state, rng = load_trainer_state(checkpoint, optimizer, scheduler)  # what save_checkpoint writes still loads
    assert state == TrainState(step=1) and set(rng) == {"python", "torch"}


@pytest.mark.integration  # the session's moto S3 server
@pytest.mark.parametrize("escape", ["../../../escaped.txt", "ABSOLUTE"])
def test_a_store_key_leading_outside_the_folder_is_refused(s3_store: S3Store, private_tmp: Path, tmp_path: Path,
                                                          escape: str) -> None:
    """Low (jobs/storage.py): a store key under a job's adapter with `..` parts, or an absolute path after the folder,
    is refused in one line when the folder is fetched; nothing is written outside it and the adapter fetched before
    stays as it was."""
    outside = tmp_path / "outside" / "escaped.txt"
    name = str(outside) if escape == "ABSOLUTE" else escape  # "/tmp/.../escaped.txt": a doubled slash in the key
    prefix = f"escape-{escape[:2].strip('.')}-{os.getpid()}"
    s3_store.put(f"{prefix}/job/adapter/adapter_config.json", b"{}")
    storage = JobStorage(s3_store.uri(prefix, "job"))
    storage.pull_dir("adapter")
    assert (storage.local / "adapter" / "adapter_config.json").read_bytes() == b"{}"
    s3_store.put(f"{prefix}/job/adapter/{name}", b"planted")
    with pytest.raises(ConfigError, match="leads outside") as refused:
        storage.pull_dir("adapter")
    assert len(str(refused.value).splitlines()) == 1
    assert not outside.exists() and not (storage.local.parent / "escaped.txt").exists()
    assert not list(storage.local.parent.parent.rglob("escaped.txt"))
    assert (storage.local / "adapter" / "adapter_config.json").read_bytes() == b"{}"
