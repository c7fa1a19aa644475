"""Megatron's .bin/.idx: golden bytes, round trips with megatron-core 0.16.1 both ways, refusals."""

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from data.indexed_dataset import IndexedDataset, IndexedFormatError, IndexedWriter

# Megatron's IndexedDatasetBuilder(uint16) with documents [1, 2, 3] and [4, 5], captured from
# megatron-core 0.16.1: header, lengths [3, 2], pointers [0, 6], document indices [0, 1, 2]
GOLDEN_IDX = bytes.fromhex(
    "4d4d49444944580000"  # MMIDIDX\0\0
    "0100000000000000"  # version 1
    "08"  # dtype code 8: uint16
    "0200000000000000"  # 2 sequences
    "0300000000000000"  # 3 document indices
    "0300000002000000"  # int32 lengths
    "00000000000000000600000000000000"  # int64 byte pointers
    "000000000000000001000000000000000200000000000000"  # int64 document indices
)
GOLDEN_BIN = np.array([1, 2, 3, 4, 5], dtype="<u2").tobytes()


def _megatron() -> tuple[type, type]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Apex / Transformer Engine are absent on CPU
        from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    return IndexedDataset, IndexedDatasetBuilder


def _write(prefix: Path, docs: list[list[int]], dtype: type = np.uint16) -> None:
    writer = IndexedWriter(prefix, dtype)
    for doc in docs:
        writer.add_document(np.array(doc))
    writer.finalize()


def test_golden_bytes(tmp_path: Path) -> None:
    _write(tmp_path / "g", [[1, 2, 3], [4, 5]])
    assert (tmp_path / "g.idx").read_bytes() == GOLDEN_IDX
    assert (tmp_path / "g.bin").read_bytes() == GOLDEN_BIN
    assert not list(tmp_path.glob("*.tmp"))


def test_tridist_writes_megatron_reads(tmp_path: Path) -> None:
    docs = [[7, 8, 9, 10], [1], [65000, 2, 3]]
    _write(tmp_path / "t", docs)
    megatron_dataset, _ = _megatron()
    theirs = megatron_dataset(str(tmp_path / "t"), mmap=True)
    assert len(theirs) == 3 and [theirs[i].tolist() for i in range(3)] == docs
    assert theirs.index.dtype == np.uint16
    assert theirs.document_indices.tolist() == [0, 1, 2, 3]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # megatron-core on numpy 2
def test_megatron_writes_tridist_reads(tmp_path: Path) -> None:
    _, builder_class = _megatron()
    builder = builder_class(str(tmp_path / "m.bin"), dtype=np.int32)
    builder.add_document(torch.tensor([5, 6, 7, 8, 9]), [2, 3])  # one document, two sequences
    builder.add_document(torch.tensor([100_000]), [1])
    builder.finalize(str(tmp_path / "m.idx"))
    ours = IndexedDataset(tmp_path / "m")
    assert ours.dtype == np.int32 and len(ours) == 3 and ours.n_documents == 2
    assert [ours[i].tolist() for i in range(3)] == [[5, 6], [7, 8, 9], [100_000]]
    starts, lengths = ours.document_token_ranges()
    assert starts.tolist() == [0, 5] and lengths.tolist() == [5, 1]


def _recode(prefix: Path, code: int) -> None:
    idx = bytearray((prefix.parent / (prefix.name + ".idx")).read_bytes())
    idx[17] = code  # the dtype byte after magic (9) and version (8)
    (prefix.parent / (prefix.name + ".idx")).write_bytes(bytes(idx))


@pytest.mark.parametrize(
    "damage,words",
    [
        ("deepspeed_u16", "DeepSpeed's dtype code 6"),  # DeepSpeed u16 read as Megatron f64
        ("deepspeed_u32", "DeepSpeed"),  # code 7: u32 there, float32 here (same size)
        ("truncated_idx", "corrupt"),
        ("bad_pointer", "pointers"),
        ("short_bin", "bytes"),
        ("no_magic", "MMIDIDX"),
    ],
)
def test_refuses_other_variants_and_corruption(tmp_path: Path, damage: str, words: str) -> None:
    prefix = tmp_path / "x"
    _write(prefix, [[1, 2, 3], [4, 5]], np.int32 if damage == "deepspeed_u32" else np.uint16)
    idx, bin_ = tmp_path / "x.idx", tmp_path / "x.bin"
    if damage == "deepspeed_u16":
        _recode(prefix, 6)
    elif damage == "deepspeed_u32":
        _recode(prefix, 7)
    elif damage == "truncated_idx":
        idx.write_bytes(idx.read_bytes()[:-3])
    elif damage == "bad_pointer":
        raw = bytearray(idx.read_bytes())
        raw[34 + 8 + 8 : 34 + 8 + 16] = struct.pack("<q", 4)  # pointer 1: 4 instead of 6
        idx.write_bytes(bytes(raw))
    elif damage == "short_bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    else:
        idx.write_bytes(b"NOTMEGA" + idx.read_bytes()[7:])
    with pytest.raises(IndexedFormatError, match=words) as err:
        IndexedDataset(prefix)
    assert "\n" not in str(err.value)


def test_rewrite_removes_the_old_index_before_replacing_the_bin(tmp_path: Path) -> None:
    _write(tmp_path / "r", [[1, 2]])
    writer = IndexedWriter(tmp_path / "r", np.uint16)
    writer.add_document(np.array([3, 4, 5]))
    # mid-write (as if killed here): the old pair no longer looks complete
    assert not (tmp_path / "r.idx").exists()
    writer.abort()
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(IndexedFormatError, match="not found"):
        IndexedDataset(tmp_path / "r")
