"""Checkpoints on any fsspec file system (`s3://`, `gs://`, `file://`, `memory://`, ...).

Commit BY MANIFEST, because an object store has no atomic rename (a "rename" is a copy of every
object, then a delete). The guarantees, in the order a save runs:
1. shards are written straight into root/step-N/; each file is durable when its write returns
   (closed: uploaded, or fsynced where the file system is local), and every rank checks its
   files' sizes before rank 0 goes on (shards.py, as on local storage);
2. the manifest (each shard's size and CRC32) is written LAST, under a temporary name and then
   moved into place, so it is never seen half-written; from that moment, and only then, step-N
   is a checkpoint: readers (format.complete_checkpoints) skip any folder without a manifest;
3. `latest` moves and older checkpoints are rotated out only after that (each loses its
   manifest first, so a half-deleted one reads as incomplete, never as complete);
4. a save that fails before step 2 removes what it wrote; a killed one leaves a manifest-less
   folder, which readers skip and the next save removes.
One difference from local storage: a step that is already committed is never saved again
(save.write_snapshot keeps it, the same training state): rewriting it in place would first
un-commit it, and a failure then would lose it. Locally the old one is swapped out by renames.

Reading: DCP's HuggingFaceStorageReader opens files with safetensors' `safe_open`, local paths
only, so `SafetensorsReader` below is torch's FsspecReader (its fsspec FileSystem) with the
same safetensors layout read by hand: the header for the metadata, one ranged read per chunk.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import IO, Any, BinaryIO

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import _getdtype  # as torch's HuggingFaceStorageReader reads dtypes
from torch.distributed.checkpoint import StorageReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint._hf_utils import (
    CUSTOM_METADATA_KEY,
    DEFAULT_EXTRA_METADATA_KEY,
    SAVED_OFFSETS_KEY,
    SUFFIX,
    _HFStorageInfo,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.futures import Future

from parallel.checkpoint.storage import TMP_NAME, Location, Storage

__all__ = ["FsspecStorage", "SafetensorsReader", "fsspec_storage"]


class FsspecStorage(Storage):
    """An fsspec file system; locations are URLs (strings). Commits by manifest (above)."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.fs, _ = url_to_fs(f"{protocol}://")

    def _url(self, path: str) -> str:
        """A path fsspec returned (protocol stripped) as a URL again."""
        return path if "://" in path else f"{self.protocol}://{path}"

    def join(self, base: Location, *names: str) -> str:
        """`base`/`names` (a URL)."""
        return "/".join([str(base).rstrip("/"), *names])

    def list(self, directory: Location) -> list[str]:
        """Names inside `directory`; [] if it is not a folder."""
        # other ranks (processes) write here: a listing cached by this process (s3fs, gcsfs
        # cache them) would miss their files
        self.fs.invalidate_cache(str(directory))
        try:
            found = self.fs.ls(str(directory), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        mine = self.fs._strip_protocol(str(directory)).rstrip("/")
        return sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in found if p.rstrip("/") != mine})

    def size(self, path: Location) -> int | None:
        """Bytes of the file `path`, or None."""
        self.fs.invalidate_cache(str(path))  # as in list: another rank may have written it
        try:
            info = self.fs.info(str(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    @contextmanager
    def open_read(self, path: Location) -> Iterator[BinaryIO]:
        """`path` open for reading (ranged reads on an object store)."""
        with self.fs.open(str(path), "rb") as f:
            yield f

    @contextmanager
    def open_write(self, path: Location) -> Iterator[BinaryIO]:
        """`path` open for writing; durable when closed (uploaded; fsynced when local)."""
        with self.fs.open(str(path), "wb") as f:
            yield f
            if isinstance(self.fs, LocalFileSystem):
                f.flush()
                os.fsync(f.fileno())  # on the disk before rank 0 commits the checkpoint

    def write_text(self, path: Location, text: str) -> None:
        """Written under a temporary name, then moved: one rename locally, one copy (whose
        object appears whole) on an object store; never seen half-written."""
        directory, name = str(path).rsplit("/", 1)
        tmp = f"{directory}/{TMP_NAME}{name}"
        with self.open_write(tmp) as f:
            f.write(text.encode())
        self.fs.mv(tmp, str(path))

    def makedirs(self, directory: Location) -> None:
        """mkdir -p (a no-op on object stores, which have no folders)."""
        self.fs.makedirs(str(directory), exist_ok=True)

    def remove(self, path: Location) -> None:
        """rm -r (nothing if missing)."""
        if self.fs.exists(str(path)):
            self.fs.rm(str(path), recursive=True)

    def staging(self, root: Location, name: str) -> str:
        """root/<name> itself: the manifest, written last, commits it."""
        return self.join(root, name)

    def commit(self, staging: Location, final: Location) -> None:
        """Nothing to do: the manifest already in `staging` (== final) made it a checkpoint."""
        assert str(staging) == str(final), (staging, final)

    def free_bytes(self, directory: Location) -> int | None:
        """The disk's free bytes for a local file system; None (no limit known) otherwise."""
        if isinstance(self.fs, LocalFileSystem):
            stat = os.statvfs(self.fs._strip_protocol(str(directory)))
            return stat.f_bavail * stat.f_frsize
        return None

    def inside(self, directory: Location, rel: str) -> bool:
        """After resolving symlinks on a local file system; object stores have none."""
        if not isinstance(self.fs, LocalFileSystem):
            return True
        base = os.path.realpath(self.fs._strip_protocol(str(directory)))
        target = os.path.realpath(os.path.join(base, rel))
        return os.path.commonpath([base, target]) == base

    def dcp_reader(self, directory: Location) -> StorageReader:
        """SafetensorsReader over `directory`."""
        return SafetensorsReader(str(directory))


@cache
def fsspec_storage(url: str) -> FsspecStorage:
    """The FsspecStorage of `url`'s protocol (one per protocol)."""
    return FsspecStorage(url.split("://", 1)[0])


def _header(f: IO[bytes] | Any) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the offset its data starts at."""
    (length,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(length)), 8 + length


class SafetensorsReader(FsspecReader):
    """torch's FsspecReader for files in DCP's Hugging Face safetensors layout (what stream.py
    writes): metadata from each file's header, tensors by ranged reads of their chunks."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Every tensor's full size, dtype and chunks (as HuggingFaceStorageReader builds them)."""
        tensors: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, _HFStorageInfo] = {}
        for file in sorted(f for f in self.fs.ls(self.path) if f.endswith(SUFFIX)):
            with self.fs.create_stream(file, "rb") as f:
                header, _ = _header(f)
            extra = header.pop(DEFAULT_EXTRA_METADATA_KEY, {}) or {}
            sharding = json.loads(extra.get(CUSTOM_METADATA_KEY) or "{}")
            for key, info in header.items():
                shape = torch.Size(info["shape"])
                dtype = _getdtype(info["dtype"])
                offsets = sharding.get(key, {}).get(SAVED_OFFSETS_KEY, [0] * len(shape))
                end = torch.Size(o + s for o, s in zip(offsets, shape))
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=shape)
                if key not in tensors:
                    tensors[key] = TensorStorageMetadata(TensorProperties(dtype=dtype), end, [])
                meta = tensors[key]
                meta.chunks.append(chunk)
                meta.size = torch.Size(max(a, b) for a, b in zip(meta.size, end))
                storage[MetadataIndex(fqn=key, offset=offsets)] = _HFStorageInfo(
                    relative_path=file, shape=shape, dtype=dtype
                )
        metadata = Metadata(state_dict_metadata=tensors, storage_data=storage)  # type: ignore[arg-type]
        metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Each request's slice of its chunk, read from the chunk's bytes in its file."""
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            file = self.storage_data[item.storage_index].relative_path
            per_file.setdefault(file, []).append(item)
        for file, items in per_file.items():
            with self.fs.create_stream(file, "rb") as f:
                header, data_start = _header(f)
                for item in items:
                    info = header[item.storage_index.fqn]
                    start, end = info["data_offsets"]
                    f.seek(data_start + start)
                    dtype = _getdtype(info["dtype"])
                    raw = bytearray(f.read(end - start))
                    flat = (
                        torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                    )
                    chunk = flat.reshape(info["shape"])
                    index = tuple(
                        slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths)
                    )
                    target = planner.resolve_tensor(item).detach()
                    target.copy_(chunk[index])
                    planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done
