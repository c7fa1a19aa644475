"""The streamed safetensors writer: files safetensors and DCP's HF reader read as they read
`safetensors.torch.save`'s, a CRC32 equal to the bytes on disk, and failures recorded, not raised.
In one process, no ranks: a few milliseconds."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save
from torch.distributed.checkpoint import HuggingFaceStorageReader

from parallel.checkpoint.stream import (
    Entry,
    FileRecord,
    _CountingStream,
    incomplete,
    write_safetensors,
)


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "w": torch.randn(6, 4).t(),  # not contiguous: written from a contiguous copy
        "h": torch.randn(5).to(torch.bfloat16),
        "i": torch.arange(3),
        "s": torch.tensor(2.5),
        "e": torch.zeros(0, 4),
    }


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def test_file_reads_as_safetensors_save_wrote_it_and_its_crc_is_the_files(tmp_path: Path) -> None:
    tensors = _tensors()
    offsets = {name: (0,) * t.dim() for name, t in tensors.items()}
    path = tmp_path / "shard.safetensors"
    record = write_safetensors(path, [Entry(n, t, offsets[n]) for n, t in tensors.items()])
    data = path.read_bytes()
    assert incomplete(record) is None and record.meant == record.wrote == len(data)
    assert record.crc == zlib.crc32(data)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name
        sharding = json.loads(f.metadata()["DCP_SHARDING_INFO"])
    assert sharding == {n: {"saved_offsets": list(o)} for n, o in offsets.items()}
    # what DCP's writer would have written: the same header (as JSON) and the same data bytes
    expected = save(
        {n: t.contiguous() for n, t in tensors.items()},
        metadata={"DCP_SHARDING_INFO": json.dumps(sharding), "DCP_VERSION": "1.0", "format": "pt"},
    )
    assert _split(data) == _split(expected)


def test_dcp_reader_assembles_a_tensor_from_chunks_in_two_files(tmp_path: Path) -> None:
    full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    for rank, rows in enumerate((slice(0, 2), slice(2, 6))):
        chunk = Entry("m.weight", full[rows], (rows.start, 0))
        name = f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors"
        assert incomplete(write_safetensors(tmp_path / name, [chunk])) is None
    meta = HuggingFaceStorageReader(str(tmp_path)).read_metadata().state_dict_metadata
    assert list(meta["m.weight"].size) == [6, 4] and len(meta["m.weight"].chunks) == 2
    out = {"m.weight": torch.zeros(6, 4)}
    dcp.load(out, storage_reader=HuggingFaceStorageReader(str(tmp_path)), no_dist=True)
    assert torch.equal(out["m.weight"], full)


class _Trickle:
    """A raw file that takes at most 3 bytes per write, then fails after `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.taken, self.limit = bytearray(), limit

    def write(self, view: memoryview) -> int:
        if len(self.taken) >= self.limit:
            raise OSError(27, "File too large")
        part = bytes(view[: min(3, self.limit - len(self.taken))])
        self.taken += part
        return len(part)


def test_short_writes_are_retried_and_a_failure_is_recorded(tmp_path: Path) -> None:
    raw = _Trickle(limit=100)
    stream = _CountingStream(raw, FileRecord(tmp_path / "f"))  # type: ignore[arg-type]
    assert stream.write(b"0123456789") == 10 and bytes(raw.taken) == b"0123456789"
    try:
        stream.write(bytes(200))
    except OSError:
        pass
    assert stream.record.meant == 210 and stream.record.wrote == 100
    missing = write_safetensors(tmp_path / "no-such-folder" / "f.safetensors", [])
    assert missing.error is not None and "No such file" in (incomplete(missing) or "")
