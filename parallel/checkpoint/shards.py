"""Writing one DCP part (model or optim) and proving that every file of it reached the disk whole.

Written by hand because torch 2.13 does not: errors raised in DCP's extra writer threads
(`thread_count > 1`) are printed by the thread and lost, so `dcp.save` returns normally after a
failed write (a disk full, a file-size limit). Here every written file's stream records the bytes
it was meant to write, the bytes the file took and any error; `write_data` checks them once its
threads have joined and raises, and DCP's own all-reduce of the write results then fails the save
on every rank together.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.futures import Future

from parallel.checkpoint.state import CheckpointError

__all__ = ["FileRecord", "write_part"]

WRITER_THREADS = 2  # files written in parallel per rank: serializing a file is CPU-bound


@dataclass
class FileRecord:
    """What one writer stream saw of its file: the bytes meant and written, CRC32, any error."""

    path: Path
    meant: int = 0  # bytes handed to write()
    wrote: int = 0  # bytes the file object accepted
    crc: int = 0  # CRC32 of the bytes meant
    error: str | None = None  # the exception that stopped the write, if any


class _CountingStream(io.RawIOBase):
    """A write-only file that counts and checksums the bytes on their way to disk (no read-back)."""

    def __init__(self, raw: io.IOBase, record: FileRecord) -> None:
        super().__init__()
        self.raw, self.record = raw, record

    def write(self, data: Any) -> int:
        """Count and checksum, then write through."""
        view = memoryview(data)
        self.record.meant += view.nbytes
        self.record.crc = zlib.crc32(view, self.record.crc)  # releases the GIL for large buffers
        written = self.raw.write(view)
        self.record.wrote += view.nbytes if written is None else written
        return written if written is not None else view.nbytes

    def writable(self) -> bool:
        """Yes."""
        return True

    def tell(self) -> int:
        """Position in the underlying file."""
        return self.raw.tell()

    def fileno(self) -> int:
        """The underlying descriptor (DCP fsyncs it)."""
        return self.raw.fileno()

    def flush(self) -> None:
        """Flush the underlying file."""
        self.raw.flush()


class _RecordingFileSystem(FileSystem):
    """DCP's local file system, keeping a FileRecord of every file opened for writing.

    DCP's safetensors writer sends each file as one sequential stream (no seeks), so the CRC of
    what passed through equals the file's; loading re-checks it against the bytes on disk.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[FileRecord] = []  # appended from writer threads: GIL-atomic

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        """Wrap write streams; reads pass through."""
        if "w" not in mode:
            with super().create_stream(path, mode) as raw:
                yield raw
            return
        record = FileRecord(Path(path))
        self.records.append(record)
        try:
            with super().create_stream(path, mode) as raw:
                yield _CountingStream(raw, record)
                raw.flush()
        except Exception as err:
            # swallowed here, in whichever thread writes: a writer thread would only print it
            # (a traceback, then dcp.save returns normally); write_data raises it for all ranks
            record.error = str(err) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"


class _CheckedWriter(HuggingFaceStorageWriter):
    """HuggingFaceStorageWriter whose write_data fails unless every file it wrote is complete."""

    def __init__(self, directory: Path) -> None:
        super().__init__(str(directory), save_distributed=True, thread_count=WRITER_THREADS)
        self.fs: _RecordingFileSystem = _RecordingFileSystem()

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[Any]:
        """Write this rank's files (DCP's threads have joined on return), then check each."""
        done = super().write_data(plan, planner)
        done.wait()
        rank = dist.get_rank() if dist.is_initialized() else 0
        if problems := [p for r in self.fs.records if (p := incomplete(r)) is not None]:
            raise CheckpointError(f"rank {rank} could not write " + "; ".join(problems))
        if plan.items and not self.fs.records:  # e.g. a thread that failed before opening it
            raise CheckpointError(
                f"rank {rank} wrote no file for its {len(plan.items)} tensors into {self.path}"
            )
        return done


def incomplete(record: FileRecord) -> str | None:
    """Why a written file is not whole (its path first), or None when it is."""
    if record.error is not None:
        return f"{record.path}: {record.error}"
    if record.wrote != record.meant:
        return f"{record.path}: {record.wrote} of {record.meant} bytes written"
    try:
        size = record.path.stat().st_size
    except OSError as err:
        return f"{record.path}: {err.strerror}"
    if size != record.meant:
        return f"{record.path}: {size} bytes on disk, {record.meant} written"
    return None


def _message(err: CheckpointException) -> str:
    """DCP's per-rank failures as one line (CheckpointException's own text has tracebacks)."""
    lines = []
    for rank, (exc, _) in sorted(err.failures.items()):
        lines.append(
            str(exc)
            if isinstance(exc, CheckpointError)
            else f"rank {rank}: {type(exc).__name__}: {exc}"
        )
    return "; ".join(sorted(set(lines)))


def write_part(
    directory: Path, tensors: dict[str, torch.Tensor], group: dist.ProcessGroup | None = None
) -> dict[str, FileRecord]:
    """dcp.save `tensors` into `directory`; this rank's files by name, each checked complete.

    A collective over `group`; raises CheckpointError on every rank when any rank's write failed.
    """
    writer = _CheckedWriter(directory)
    try:
        dcp.save(tensors, storage_writer=writer, process_group=group)
    except CheckpointException as err:  # raised on every rank: DCP gathers the failures
        raise CheckpointError(_message(err)) from None
    return {r.path.name: r for r in writer.fs.records}
