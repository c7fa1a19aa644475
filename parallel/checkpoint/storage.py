"""Where checkpoints live: the one interface every file operation of a checkpoint goes through.

`backends.storage_for(location)` picks the implementation: a plain path is the local file
system (LocalStorage, here: what tridist always wrote, POSIX files, fsync, an atomic rename); a
URL (`memory://`, `file://`, `s3://`, `gs://`, ...) is fsspec (fsspec_storage.FsspecStorage).
A new backend is one subclass of Storage and one line in storage_for.

How a checkpoint is committed differs, because an object store has no atomic rename:
- local: shards and the manifest go into root/.tmp-step-N, which is renamed to step-N;
- fsspec: commit BY MANIFEST: shards go straight into root/step-N, the manifest last, and a
  folder is a checkpoint iff its manifest exists (a manifest is never seen half-written: it is
  written under a temporary name and moved into place, one PUT/copy on an object store).
Either way `latest` moves and old checkpoints are rotated out only after the commit, and readers
(format.complete_checkpoints) skip every folder without a manifest. What each promises is in
`Storage.staging` and `Storage.commit`.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO

from torch.distributed.checkpoint import HuggingFaceStorageReader, StorageReader

__all__ = ["Location", "LocalStorage", "Storage", "as_location", "is_url"]

Location = Path | str  # a local path, or a URL (kept as a string: Path would fold its "//")
TMP_NAME = ".tmp-"  # format.TMP_PREFIX: a temporary name beside the file being replaced


def is_url(location: Location) -> bool:
    """True for `protocol://...` (an fsspec location), False for a plain path."""
    return isinstance(location, str) and "://" in location


def as_location(location: Location) -> Location:
    """A URL as its string, anything else as a Path (what the rest of the code is handed)."""
    return location if is_url(location) else Path(location)


class Storage(ABC):
    """File operations a checkpoint needs, on locations of one kind (paths or URLs)."""

    @abstractmethod
    def join(self, base: Location, *names: str) -> Location:
        """`base` with `names` appended, one level each."""

    @abstractmethod
    def list(self, directory: Location) -> list[str]:
        """Names of what is directly inside `directory` (files and folders); [] if it is none."""

    @abstractmethod
    def size(self, path: Location) -> int | None:
        """Bytes of the file `path`, or None when there is no such file."""

    @abstractmethod
    def open_read(self, path: Location) -> AbstractContextManager[BinaryIO]:
        """A context manager: the file `path` open for reading bytes."""

    @abstractmethod
    def open_write(self, path: Location) -> AbstractContextManager[BinaryIO]:
        """A context manager: `path` created for writing bytes; when the block exits without an
        error, the bytes are durable (fsynced, or uploaded), else the error propagates."""

    @abstractmethod
    def write_text(self, path: Location, text: str) -> None:
        """Replace `path` by `text` so that readers see the old file or the new, whole."""

    @abstractmethod
    def makedirs(self, directory: Location) -> None:
        """Create `directory` and its parents (nothing if it exists)."""

    @abstractmethod
    def remove(self, path: Location) -> None:
        """Remove the file or folder tree `path` (nothing if it is not there)."""

    @abstractmethod
    def staging(self, root: Location, name: str) -> Location:
        """Where a save of checkpoint `name` under `root` writes its shards and manifest."""

    @abstractmethod
    def commit(self, staging: Location, final: Location) -> None:
        """Make the checkpoint written in `staging` (its manifest last) the one at `final`."""

    @abstractmethod
    def free_bytes(self, directory: Location) -> int | None:
        """Free space where `directory` is, or None where the store has no such limit to read."""

    @abstractmethod
    def inside(self, directory: Location, rel: str) -> bool:
        """Whether `directory`/`rel` (already checked lexically) stays inside `directory`."""

    @abstractmethod
    def dcp_reader(self, directory: Location) -> StorageReader:
        """A torch.distributed.checkpoint reader of the safetensors files in `directory`."""

    def read_text(self, path: Location) -> str:
        """The file `path` decoded as UTF-8."""
        with self.open_read(path) as f:
            return f.read().decode()

    def is_file(self, path: Location) -> bool:
        """True when `path` is a file."""
        return self.size(path) is not None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage(Storage):
    """The local (POSIX) file system: fsynced files, os.replace, rename-committed folders."""

    def join(self, base: Location, *names: str) -> Path:
        """`base` with `names` appended (a Path)."""
        return Path(base).joinpath(*names)

    def list(self, directory: Location) -> list[str]:
        """Names inside `directory`; [] if it is not a folder."""
        directory = Path(directory)
        return [p.name for p in directory.iterdir()] if directory.is_dir() else []

    def size(self, path: Location) -> int | None:
        """Bytes of the file `path`, or None."""
        path = Path(path)
        return path.stat().st_size if path.is_file() else None

    @contextmanager
    def open_read(self, path: Location) -> Iterator[BinaryIO]:
        """`path` open for reading."""
        with open(path, "rb") as f:
            yield f

    @contextmanager
    def open_write(self, path: Location) -> Iterator[BinaryIO]:
        """`path` open unbuffered (each write() reaches the file); fsynced at a clean exit."""
        with open(path, "wb", buffering=0) as raw:
            yield raw
            os.fsync(raw.fileno())  # on the disk before rank 0 commits the checkpoint

    def write_text(self, path: Location, text: str) -> None:
        """Write via a temporary name and os.replace, so readers see the old or the new file."""
        path = Path(path)
        tmp = path.with_name(f"{TMP_NAME}{path.name}")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def makedirs(self, directory: Location) -> None:
        """mkdir -p."""
        Path(directory).mkdir(parents=True, exist_ok=True)

    def remove(self, path: Location) -> None:
        """rm -r (nothing if missing)."""
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

    def staging(self, root: Location, name: str) -> Path:
        """root/.tmp-<name>: renamed into place by commit."""
        return Path(root) / f"{TMP_NAME}{name}"

    def commit(self, staging: Location, final: Location) -> None:
        """Rename staging to final, fsynced (a checkpoint of the same step is swapped out)."""
        staging, final = Path(staging), Path(final)
        root = final.parent
        _fsync_dir(staging)
        if final.exists():  # the same step saved again (e.g. after resuming): swap it out
            trash = root / f"{TMP_NAME}old-{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            final.rename(trash)
            try:
                staging.rename(final)
            except OSError:
                trash.rename(final)  # put the old one back: a failed save loses nothing
                raise
            shutil.rmtree(trash, ignore_errors=True)  # committed: a leftover goes next save
        else:
            staging.rename(final)
        _fsync_dir(root)

    def free_bytes(self, directory: Location) -> int:
        """shutil.disk_usage's free bytes."""
        return shutil.disk_usage(directory).free

    def inside(self, directory: Location, rel: str) -> bool:
        """After resolving symlinks."""
        inside = Path(directory).resolve()
        return (Path(directory) / rel).resolve().is_relative_to(inside)

    def dcp_reader(self, directory: Location) -> StorageReader:
        """DCP's own HuggingFaceStorageReader."""
        return HuggingFaceStorageReader(str(directory))
