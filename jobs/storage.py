"""Where a job keeps its checkpoints, adapter and result: a folder, or an object store.

A job's `output_dir` is a folder (local disk; on a cluster one every node mounts: NFS, EFS, FSx) or a URI that
pyarrow's filesystems open: `s3://bucket/prefix` (credentials, region and endpoint from the usual AWS variables,
`AWS_ENDPOINT_URL` for MinIO and the like, or `?endpoint_override=HOST:PORT&scheme=http` on the URI), `gs://...`,
`hdfs://...`, `file:///...`. With a URI the job works in a local scratch folder and mirrors what it writes there:
a checkpoint is uploaded file by file with `state.json` last, so a remote checkpoint holding `state.json` is
complete and one cut off mid-upload is ignored (object stores have no rename). Started again, on any node, the
job first fetches its result (a finished job is not run again) or else its newest complete checkpoint.

The store is the truth: a scratch file the store lacks is deleted, never read as the job's (`pull_file`). The scratch
folder is `<tmp>/loraland-jobs-<uid>/<digest of output_dir>`, under a folder of this user only (0700, checked at each
use), so another user of the node can plant neither a result nor a checkpoint there. A key of the store that would land
outside the folder it is fetched into (`..`, a leading or doubled `/`) is refused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from core.errors import ConfigError, Conflict, Unreachable

COMPLETE_MARKER = "state.json"  # written last into a checkpoint, locally and remotely


def is_uri(location: str) -> bool:
    """True for `scheme://...` (an object store or a filesystem pyarrow opens), false for a plain path."""
    return "://" in location


def join(location: str, *parts: str) -> str:
    """`location/part/...` for a path or a URI (a URI's `?query` stays at the end)."""
    head, mark, query = location.partition("?") if is_uri(location) else (location, "", "")
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)]) + mark + query


def open_location(uri: str) -> tuple[Any, str]:
    """pyarrow's filesystem and path for `uri`; a URI it cannot open is a one-line ConfigError (a ValueError)."""
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError or ArrowNotImplementedError here
        raise ConfigError(f"storage {uri!r}",
                          [f"{first_line(exc)}; use a folder path or a URI such as s3://bucket/prefix"]) from None


def check_writable(location: str) -> None:
    """Write and delete a probe file at `location`, so a wrong bucket, credential or mount fails before any job runs:
    a URI pyarrow cannot open is a ConfigError, a location that refuses the write an Unreachable."""
    probe = ".loraland-write-probe"
    try:
        if not is_uri(location):
            Path(location).mkdir(parents=True, exist_ok=True)
            (Path(location) / probe).write_text("ok")
            (Path(location) / probe).unlink()
            return
        filesystem, root = open_location(location)
        with filesystem.open_output_stream(f"{root}/{probe}") as out:
            out.write(b"ok")
        filesystem.delete_file(f"{root}/{probe}")
    except ConfigError:
        raise
    except Exception as exc:
        raise Unreachable(f"storage path {location!r}: cannot write there ({first_line(exc)}); check the path, "
                          "bucket and credentials") from None


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def scratch_root() -> Path:
    """This user's folder for the scratch folders of jobs with a remote `output_dir`: `<tmp>/loraland-jobs-<uid>`,
    made 0700. One that is a link, another user's, or open to others is a one-line Conflict: another user of the node
    could have planted a result or a checkpoint in it."""
    root = Path(tempfile.gettempdir()) / f"loraland-jobs-{os.getuid()}"
    try:
        root.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise Conflict(f"scratch folder {root}: not a private folder of this user (a link, another user's, or open to "
                       "others); remove it, or set TMPDIR to a folder only this user can reach")
    return root


def key_inside(key: str, source: str) -> str:
    """The part of store key `key` below the folder `source`, refused (a one-line ConfigError) when it would land
    outside the folder it is fetched into: `..`, a leading or doubled `/`."""
    relative = key[len(source) + 1:]
    if not key.startswith(f"{source}/") or any(part in ("", ".", "..") for part in relative.split("/")):
        raise ConfigError(f"storage key {key!r}", [f"leads outside {source!r} (`..`, `.` or an empty part); remove "
                                                   "it from the store"])
    return relative


class JobStorage:
    """A job's output location. `local` is the folder the job reads and writes; with a remote `output_dir` it is a
    scratch folder and `pull_*` / `push_*` copy to and from the store, otherwise they do nothing."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.remote = open_location(output_dir) if is_uri(output_dir) else None
        if self.remote is None:
            self.local = Path(output_dir)
        else:
            digest = hashlib.sha256(output_dir.encode()).hexdigest()[:16]
            self.local = scratch_root() / digest

    def _remote_path(self, relative: str) -> str:
        assert self.remote is not None
        return f"{self.remote[1].rstrip('/')}/{relative}"

    def _exists(self, relative: str) -> bool:
        from pyarrow import fs

        assert self.remote is not None
        return self.remote[0].get_file_info(self._remote_path(relative)).type != fs.FileType.NotFound

    def pull_file(self, relative: str) -> bool:
        """Fetch `relative` from the store if it is there; returns whether it is now in `local`. With a store, a scratch
        copy the store lacks is deleted (the store is the truth)."""
        if self.remote is not None and not self._exists(relative):
            (self.local / relative).unlink(missing_ok=True)
        elif self.remote is not None:
            target = self.local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.with_name(f".{target.name}.part")
            with self.remote[0].open_input_stream(self._remote_path(relative)) as src, staging.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            staging.replace(target)
        return (self.local / relative).exists()

    def push(self, relative: str) -> None:
        """Upload the file or folder `relative` of `local`; a folder's `state.json`, if any, goes last."""
        if self.remote is None:
            return
        source = self.local / relative
        files = sorted((p for p in source.rglob("*") if p.is_file()),
                       key=lambda p: p.name == COMPLETE_MARKER) if source.is_dir() else [source]
        filesystem = self.remote[0]
        for path in files:
            target = self._remote_path(path.relative_to(self.local).as_posix())
            with path.open("rb") as src, filesystem.open_output_stream(target) as dst:
                shutil.copyfileobj(src, dst)

    def _remote_steps(self, folder: str) -> list[str]:
        """Names of the `step-*` folders under `folder` in the store, complete or not, oldest first."""
        from pyarrow import fs

        if self.remote is None or not self._exists(folder):
            return []
        entries = self.remote[0].get_file_info(fs.FileSelector(self._remote_path(folder), recursive=False))
        return sorted(e.base_name for e in entries
                      if e.type == fs.FileType.Directory and e.base_name.startswith("step-"))

    def remote_checkpoints(self, folder: str) -> list[str]:
        """Names of the complete checkpoints (`step-*` holding state.json) under `folder` in the store, oldest first."""
        return [name for name in self._remote_steps(folder) if self._exists(f"{folder}/{name}/{COMPLETE_MARKER}")]

    def pull_dir(self, relative: str) -> None:
        """Fetch the folder `relative` of the store into `local` (through a staging folder renamed into place)."""
        from pyarrow import fs

        if self.remote is None or not self._exists(relative):
            return
        filesystem, source = self.remote[0], self._remote_path(relative)
        target = self.local / relative
        staging = target.with_name(f".download-{target.name}")
        shutil.rmtree(staging, ignore_errors=True)
        for entry in filesystem.get_file_info(fs.FileSelector(source, recursive=True)):
            if entry.type == fs.FileType.File:
                path = staging / key_inside(entry.path, source)
                path.parent.mkdir(parents=True, exist_ok=True)
                with filesystem.open_input_stream(entry.path) as src, path.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)

    def pull_checkpoint(self, folder: str) -> None:
        """Fetch the newest complete checkpoint of the store into `local/folder`, unless `local` already has it or a
        newer one (a retry on the same node)."""
        remote = self.remote_checkpoints(folder)
        local_root = self.local / folder
        steps = local_root.glob("step-*") if local_root.is_dir() else []
        have = sorted(p.name for p in steps if (p / COMPLETE_MARKER).is_file())
        if remote and not (have and have[-1] >= remote[-1]):
            self.pull_dir(f"{folder}/{remote[-1]}")

    def drop_scratch(self, relative: str) -> None:
        """Delete `relative` from the scratch folder (never from a local `output_dir`, which is the job's storage)."""
        if self.remote is not None:
            shutil.rmtree(self.local / relative, ignore_errors=True)

    def push_checkpoint(self, folder: str, name: str) -> None:
        """Upload checkpoint `folder/name`, then delete the store's older checkpoints (and cut-off uploads) that `local`
        no longer keeps."""
        if self.remote is None:
            return
        self.push(f"{folder}/{name}")
        kept = {p.name for p in (self.local / folder).glob("step-*")}
        for old in self._remote_steps(folder):
            if old < name and old not in kept:
                self.remote[0].delete_dir(self._remote_path(f"{folder}/{old}"))
