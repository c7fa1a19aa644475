"""One safetensors file written as a stream: the header, then each tensor's bytes straight from
the tensor's memory, the CRC32 computed on the way, fsynced, and a record of what reached it.

Written by hand because `safetensors.torch.save` (what DCP's HuggingFaceStorageWriter calls)
builds the whole file as one bytes object before writing it: a copy of every tensor, and the
file's size again in memory. The header holds what that writer puts there (`__metadata__` with
DCP_SHARDING_INFO, each tensor's offsets in the full tensor; DCP_VERSION; format), so DCP's
HuggingFaceStorageReader reads and reshards these files as it read DCP's own. Tensors are laid out
in safetensors' order (widest dtype first, then by name), which keeps each one aligned.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint._hf_utils import (
    CUSTOM_METADATA_KEY,
    DCP_VERSION_KEY,
    DEFAULT_EXTRA_METADATA_KEY,
    FORMAT_KEY,
    FORMAT_VALUE,
    HF_DCP_VERSION,
    SAVED_OFFSETS_KEY,
)

from parallel.checkpoint.backends import storage_for
from parallel.checkpoint.storage import Location

__all__ = ["Entry", "FileRecord", "incomplete", "safetensors_header", "write_safetensors"]

BLOCK = 64 << 20  # bytes per write() and CRC update: large enough that syscalls cost nothing

# safetensors' dtype names (those a training state holds)
DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: its name, this rank's chunk of it, where that chunk starts."""

    name: str
    tensor: torch.Tensor  # the chunk's values (any device, any strides)
    offsets: tuple[int, ...]  # of the chunk in the full tensor (zeros for a whole tensor)


@dataclass
class FileRecord:
    """What one written file saw: the bytes meant and written, their CRC32, any error."""

    path: Location
    meant: int = 0  # bytes handed to write()
    wrote: int = 0  # bytes the file accepted
    crc: int = 0  # CRC32 of the bytes meant
    error: str | None = None  # the exception that stopped the write, if any


class _CountingStream:
    """A file being written, counting and checksumming the bytes on their way (no read-back)."""

    def __init__(self, raw: BinaryIO, record: FileRecord) -> None:
        self.raw, self.record = raw, record

    def write(self, data: Any) -> int:
        """Checksum and write all of `data` (a raw file may take less per call); its size."""
        view = memoryview(data)
        size = view.nbytes
        self.record.meant += size
        self.record.crc = zlib.crc32(view, self.record.crc)  # releases the GIL for large buffers
        while view.nbytes:
            written = self.raw.write(view)
            if not written:  # a raw file in blocking mode takes some bytes or raises
                raise OSError(f"the file took 0 of {view.nbytes} bytes")
            self.record.wrote += written
            view = view[written:]
        return size


def _ordered(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (-e.tensor.element_size(), e.name))


def safetensors_header(entries: list[Entry]) -> bytes:
    """The 8-byte length and the JSON header (padded to 8 bytes) of a file of `entries`, whose
    data follows in this order."""
    sharding = {e.name: {SAVED_OFFSETS_KEY: list(e.offsets)} for e in entries}
    header: dict[str, Any] = {
        DEFAULT_EXTRA_METADATA_KEY: {
            CUSTOM_METADATA_KEY: json.dumps(sharding),
            DCP_VERSION_KEY: str(HF_DCP_VERSION),
            FORMAT_KEY: FORMAT_VALUE,
        }
    }
    start = 0
    for e in entries:
        end = start + e.tensor.numel() * e.tensor.element_size()
        header[e.name] = {
            "dtype": DTYPES[e.tensor.dtype],
            "shape": list(e.tensor.shape),
            "data_offsets": [start, end],
        }
        start = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads: the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def _bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in its own memory (copied first only when not contiguous on CPU)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def write_safetensors(path: Location, entries: list[Entry]) -> FileRecord:
    """Write `entries` as the safetensors file `path`, durable (fsynced or uploaded) before it
    returns; what was written, and any error (recorded, never raised: the ranks agree on the
    outcome after every rank has written)."""
    record = FileRecord(path)
    entries = _ordered(entries)
    try:
        # durable when the block exits: on the disk (or in the store) before rank 0 commits
        with storage_for(path).open_write(path) as raw:
            stream = _CountingStream(raw, record)
            stream.write(safetensors_header(entries))
            for e in entries:
                data = _bytes(e.tensor)
                for start in range(0, data.nbytes, BLOCK):
                    stream.write(data[start : start + BLOCK])
    except Exception as err:
        record.error = str(err) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
    return record


def incomplete(record: FileRecord) -> str | None:
    """Why a written file is not whole (its path first), or None when it is."""
    if record.error is not None:
        return f"{record.path}: {record.error}"
    if record.wrote != record.meant:
        return f"{record.path}: {record.wrote} of {record.meant} bytes written"
    try:
        size = storage_for(record.path).size(record.path)
    except OSError as err:
        return f"{record.path}: {err.strerror}"
    if size is None:
        return f"{record.path}: not there after it was written"
    if size != record.meant:
        return f"{record.path}: {size} bytes on disk, {record.meant} written"
    return None
