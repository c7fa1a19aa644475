"""Megatron-LM's indexed dataset (`prefix.bin` + `prefix.idx`), read and written byte-compatibly
with NumPy memory maps (no C++ build).

`.idx`: magic `MMIDIDX\\x00\\x00`, `<Q` version 1, `<B` dtype code, `<Q` sequence count,
`<Q` document count, then int32 sequence lengths, int64 byte pointers into `.bin`, int64
document indices (sequence numbers where documents start, beginning at 0 and ending at the
sequence count). `.bin`: the tokens of every sequence, back to back. DeepSpeed's copy of the
format uses other codes under the same magic (6 u16, 7 u32, 8 u64); such a file is refused,
recognised by its `.bin` size or by a float token dtype.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, two counts
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_DEEPSPEED_CODES: dict[int, type[np.generic]] = {6: np.uint16, 7: np.uint32, 8: np.uint64}
_CHECK_CHUNK = 1 << 20  # sequences per pointer check, so a huge index is never paged in at once


class IndexedFormatError(ValueError):
    """A `.bin/.idx` pair that is missing, corrupt, or in another tool's variant of the format."""


def optimal_dtype(vocab_size: int) -> type[np.generic]:
    """The token dtype Megatron's preprocessing picks: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dtype_code(dtype: type[np.generic] | np.dtype) -> int:
    """Megatron's code for a token dtype."""
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise ValueError(f"dtype {np.dtype(dtype)} has no Megatron indexed-dataset code")


def _deepspeed_hint(code: int, tokens: int, bin_bytes: int) -> str:
    ds = _DEEPSPEED_CODES.get(code)
    if ds is not None and tokens * np.dtype(ds).itemsize == bin_bytes:
        return (
            f" (it matches DeepSpeed's dtype code {code} = {np.dtype(ds).name}: rewrite it with "
            "`python -m launcher.preprocess` or Megatron's tools)"
        )
    return ""


class IndexedDataset:
    """A read-only `.bin/.idx` pair: per-sequence token arrays and the document boundaries."""

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        """Open `prefix.idx` and `prefix.bin` as memory maps; IndexedFormatError if they
        are missing, inconsistent or not Megatron's format."""
        self.prefix = str(prefix)
        idx_path, bin_path = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise IndexedFormatError(f"{path} not found (give the prefix without .bin/.idx)")
        idx_bytes = idx_path.stat().st_size
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[: len(MAGIC)] != MAGIC:
            raise IndexedFormatError(f"{idx_path} is not a Megatron index (no MMIDIDX header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[len(MAGIC) :])
        if version != VERSION or code not in DTYPE_CODES:
            raise IndexedFormatError(f"{idx_path}: version {version}, dtype code {code} unknown")
        expected = HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
        if idx_bytes != expected or n_doc < 1:
            raise IndexedFormatError(
                f"{idx_path} is corrupt: {idx_bytes} bytes where its counts ({n_seq} sequences, "
                f"{n_doc} document indices) need {expected}"
            )
        self.lengths = np.memmap(idx_path, np.int32, "r", HEADER_BYTES, (n_seq,))
        self.pointers = np.memmap(idx_path, np.int64, "r", HEADER_BYTES + 4 * n_seq, (n_seq,))
        self.document_indices = np.memmap(
            idx_path, np.int64, "r", HEADER_BYTES + 12 * n_seq, (n_doc,)
        )
        self.dtype = np.dtype(DTYPE_CODES[code])
        bin_bytes = bin_path.stat().st_size
        self._check(code, bin_bytes, idx_path)
        self.bin = (
            np.memmap(bin_path, self.dtype, "r") if bin_bytes else np.zeros(0, dtype=self.dtype)
        )
        self._bin_file = open(bin_path, "rb")  # for read(): closed when the dataset is collected

    def _array(self, dtype: type[np.generic], offset: int, count: int) -> np.ndarray:
        """Part of the index read (not mapped), so scanning it leaves no pages resident."""
        return np.fromfile(self.prefix + ".idx", dtype=dtype, count=count, offset=offset)

    def _check(self, code: int, bin_bytes: int, idx_path: Path) -> None:
        """Pointers, lengths, documents and `.bin` size agree; refuse float (or DeepSpeed) codes."""
        n_seq, item = len(self.lengths), self.dtype.itemsize
        chunks = range(0, n_seq, _CHECK_CHUNK)
        lengths = (
            self._array(np.int32, HEADER_BYTES + 4 * s, min(_CHECK_CHUNK, n_seq - s))
            for s in chunks
        )
        total = sum(int(c.sum(dtype=np.int64)) for c in lengths)
        if total * item != bin_bytes:
            raise IndexedFormatError(
                f"{self.prefix}.bin has {bin_bytes} bytes but {idx_path.name} describes {total} "
                f"{self.dtype.name} tokens ({total * item} bytes)"
                + _deepspeed_hint(code, total, bin_bytes)
            )
        if self.dtype.kind == "f":
            raise IndexedFormatError(
                f"{idx_path} declares {self.dtype.name} tokens (code {code}); token ids must be "
                f"integers{_deepspeed_hint(code, total, bin_bytes) or ' (DeepSpeed writes uint32 as code 7)'}"
            )
        offset = 0
        for start in chunks:
            count = min(_CHECK_CHUNK, n_seq - start)
            chunk = self._array(np.int32, HEADER_BYTES + 4 * start, count).astype(np.int64)
            pointers = self._array(np.int64, HEADER_BYTES + 4 * n_seq + 8 * start, count)
            want = offset + np.concatenate(([0], np.cumsum(chunk)[:-1])) * item
            if (chunk < 0).any() or not np.array_equal(pointers, want):
                raise IndexedFormatError(
                    f"{idx_path} is corrupt: byte pointers disagree with lengths"
                )
            offset = int(want[-1] + chunk[-1] * item)
        docs = self._documents()
        if docs[0] != 0 or docs[-1] != n_seq or (np.diff(docs) < 0).any():
            raise IndexedFormatError(
                f"{idx_path} is corrupt: document indices must rise from 0 to the sequence count"
            )

    def _documents(self) -> np.ndarray:
        n_seq = len(self.lengths)
        return self._array(np.int64, HEADER_BYTES + 12 * n_seq, len(self.document_indices))

    def __len__(self) -> int:
        """Number of sequences."""
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        """Sequence i's tokens (a view into the `.bin` memory map)."""
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.bin[start : start + int(self.lengths[i])]

    def read(self, start: int, count: int) -> np.ndarray:
        """`count` tokens from token offset `start`, read rather than mapped: training reads
        scattered documents, and mapped pages (with the kernel's read-around) would stay
        resident in this process, growing its memory with the corpus."""
        item = self.dtype.itemsize
        raw = os.pread(self._bin_file.fileno(), count * item, start * item)
        return np.frombuffer(raw, dtype=self.dtype)

    @property
    def n_documents(self) -> int:
        """Number of documents (the document index holds one more entry)."""
        return len(self.document_indices) - 1

    def document_token_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) in tokens of every document's span in `.bin`, int64 arrays."""
        # sequences lie back to back (checked on open): a document is one contiguous span
        n_seq = len(self.lengths)
        pointers = self._array(np.int64, HEADER_BYTES + 4 * n_seq, n_seq)
        seq_starts = np.append(pointers // self.dtype.itemsize, len(self.bin))
        del pointers
        docs = self._documents()
        starts = seq_starts[docs[:-1]]
        return starts, seq_starts[docs[1:]] - starts


class IndexedWriter:
    """Writes a `.bin/.idx` pair Megatron reads: temp names, `.bin` renamed first, `.idx` last,
    so an interrupted write never leaves a pair that looks complete."""

    def __init__(self, prefix: str | os.PathLike[str], dtype: type[np.generic] | np.dtype) -> None:
        """Start writing `prefix.bin`/`prefix.idx`; an old `.idx` there is removed first."""
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self.code = dtype_code(self.dtype)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        # the old pair stops looking complete before its .bin is replaced
        Path(self.prefix + ".idx").unlink(missing_ok=True)
        self._bin_tmp = self.prefix + ".bin.tmp"
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[int] = []
        self._documents = [0]

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document as one sequence."""
        array = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(array.tobytes(order="C"))
        self._lengths.append(len(array))
        self._documents.append(len(self._lengths))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents at once: their tokens back to back and each one's length."""
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        first = len(self._lengths)
        self._lengths.extend(int(n) for n in lengths)
        self._documents.extend(range(first + 1, len(self._lengths) + 1))

    def finalize(self) -> None:
        """Write the index and rename both files into place (`.idx` last)."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.array(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            pointers[1:] = np.cumsum(lengths[:-1], dtype=np.int64) * self.dtype.itemsize
        idx_tmp = self.prefix + ".idx.tmp"
        with open(idx_tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<QB", VERSION, self.code))
            f.write(struct.pack("<QQ", len(lengths), len(self._documents)))
            f.write(lengths.tobytes() + pointers.tobytes())
            f.write(np.array(self._documents, dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(idx_tmp, self.prefix + ".idx")

    def abort(self) -> None:
        """Drop what was written (the temp `.bin`)."""
        self._bin.close()
        Path(self._bin_tmp).unlink(missing_ok=True)
