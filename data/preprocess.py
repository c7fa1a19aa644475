"""Corpus files -> one Megatron `.bin/.idx` pair: read documents, tokenize them in worker
processes, append EOS per document, write in order (library code of `launcher.preprocess`).

Inputs: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (zstandard), `.parquet` (pyarrow), a folder of them,
or a folder written by Hugging Face `datasets`' `save_to_disk` (its Arrow files, read with
pyarrow). The main process reads raw records in batches; workers parse and tokenize them, so
JSON decoding scales with the workers too.
"""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.hf_tokenizer import tokenizer_eos_id
from data.indexed_dataset import IndexedWriter, optimal_dtype
from data.token_source import BYTE_EOS_ID, BYTE_VOCAB_SIZE

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
BATCH_DOCS = 512  # documents per batch sent to a worker


class PreprocessError(ValueError):
    """A bad input: `option` and `value` name it, the message says what to do."""

    def __init__(self, option: str, value: object, fix: str) -> None:
        super().__init__(option, value, fix)  # all three in args: it pickles back from a worker
        self.option, self.value, self.fix = option, value, fix

    def __str__(self) -> str:
        return self.fix


@dataclass(frozen=True)
class Encoder:
    """How a worker turns a batch of records into tokens (picklable, loaded once per worker)."""

    text_key: str
    tokenizer: str | None  # tokenizer.json, or None for byte-level
    eos_id: int
    dtype: str  # the .bin's token dtype, so batches travel back compact


_ENCODE: Callable[[str, list[Any]], tuple[np.ndarray, np.ndarray]] | None = None


def _start_worker(encoder: Encoder) -> None:
    global _ENCODE
    # the worker processes are the parallelism: a tokenizer thread pool in each would
    # oversubscribe the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _ENCODE = make_encode(encoder)


def _encode_in_worker(job: tuple[str, list[Any]]) -> tuple[np.ndarray, np.ndarray]:
    assert _ENCODE is not None
    return _ENCODE(*job)


def make_encode(enc: Encoder) -> Callable[[str, list[Any]], tuple[np.ndarray, np.ndarray]]:
    """A function (kind, records) -> (all tokens with EOS per document, document lengths)."""
    if enc.tokenizer is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(enc.tokenizer)

        def ids(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    else:

        def ids(texts: list[str]) -> list[list[int]]:
            return [list(t.encode("utf-8").replace(b"\x00", b"")) for t in texts]

    def encode(kind: str, records: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        texts = [_text(json.loads(r), enc.text_key) for r in records] if kind == "json" else records
        flat: list[int] = []
        lengths: list[int] = []
        for doc in ids([t for t in texts if t]):  # empty documents are skipped
            flat.extend(doc)
            flat.append(enc.eos_id)
            lengths.append(len(doc) + 1)
        return np.array(flat, dtype=enc.dtype), np.array(lengths, dtype=np.int64)

    return encode


def _text(record: Any, key: str) -> str:
    if not isinstance(record, dict) or key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise PreprocessError("--text-key", key, f"a record has no key {key!r} (it has {keys})")
    return str(record[key] or "")


def list_inputs(path: str) -> list[Path]:
    """The corpus files under `path` (a file, a folder of them, or a saved HF dataset), sorted."""
    root = Path(path)
    if not root.exists():
        raise PreprocessError("--input", path, "not found: give a file or folder that exists")
    if root.is_file():
        files = [root]
    elif (root / "state.json").is_file():  # datasets' save_to_disk
        state = json.loads((root / "state.json").read_text())
        files = [root / f["filename"] for f in state.get("_data_files", [])]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
    unsupported = [f for f in files if not f.name.endswith((*SUFFIXES, ".arrow"))]
    if unsupported:
        raise PreprocessError("--input", str(unsupported[0]), f"use {', '.join(SUFFIXES)} files")
    if not files:
        raise PreprocessError("--input", path, f"holds no {', '.join(SUFFIXES)} files")
    return files


def _json_lines(path: Path) -> Iterator[bytes]:
    if path.name.endswith(".zst"):
        import zstandard

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as z:
            yield from io.BufferedReader(z)
    else:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
            yield from f


def read_batches(files: list[Path], text_key: str) -> Iterator[tuple[str, list[Any]]]:
    """(kind, records) batches: raw JSON lines ("json") or texts ("text"); the text key is
    checked on each file's first record so a wrong one fails before any work is done."""
    for path in files:
        if path.name.endswith((".parquet", ".arrow")):
            yield from _arrow_batches(path, text_key)
            continue
        batch: list[bytes] = []
        checked = False
        for line in _json_lines(path):
            if not line.strip():
                continue
            if not checked:  # each file's first record, here; the rest in the workers
                _text(json.loads(line), text_key)
                checked = True
            batch.append(line)
            if len(batch) == BATCH_DOCS:
                yield "json", batch
                batch = []
        if batch:
            yield "json", batch


def _arrow_batches(path: Path, text_key: str) -> Iterator[tuple[str, list[Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.name.endswith(".parquet"):
        source = pq.ParquetFile(path)
        names = source.schema_arrow.names
        batches = source.iter_batches(batch_size=BATCH_DOCS, columns=[text_key])
    else:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        names, batches = reader.schema.names, iter(reader)
    if text_key not in names:
        raise PreprocessError("--text-key", text_key, f"{path.name} has columns {names}")
    for b in batches:
        texts = [t or "" for t in b.column(b.schema.get_field_index(text_key)).to_pylist()]
        for i in range(0, len(texts), BATCH_DOCS):
            yield "text", texts[i : i + BATCH_DOCS]


def vocabulary(tokenizer: str | None, eos_id: int | None) -> tuple[int, int]:
    """(vocab_size, eos_id) of the tokenizer (or byte level: 256, NUL)."""
    if tokenizer is None:
        return BYTE_VOCAB_SIZE, BYTE_EOS_ID if eos_id is None else eos_id
    from tokenizers import Tokenizer

    if not Path(tokenizer).is_file():
        raise PreprocessError("--tokenizer", tokenizer, "not found: give a tokenizer.json")
    try:
        size = Tokenizer.from_file(tokenizer).get_vocab_size()
    except Exception as err:  # the Rust binding raises a bare Exception for bad JSON
        raise PreprocessError("--tokenizer", tokenizer, f"cannot load it: {err}") from None
    eos = tokenizer_eos_id(tokenizer) if eos_id is None else eos_id
    if eos is None or not 0 <= eos < size:
        raise PreprocessError(
            "--eos-id", eos, f"give the tokenizer's end-of-document id (< {size})"
        )
    return size, eos


def preprocess(
    inputs: str,
    output_prefix: str,
    text_key: str = "text",
    tokenizer: str | None = None,
    workers: int = 1,
    eos_id: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokenize every document under `inputs` into `output_prefix.bin/.idx` (+ `.json` metadata);
    returns the metadata (documents, tokens, seconds, EOS id, vocabulary)."""
    files = list_inputs(inputs)
    vocab_size, eos = vocabulary(tokenizer, eos_id)
    dtype = np.dtype(optimal_dtype(vocab_size))
    encoder = Encoder(text_key, tokenizer, eos, dtype.name)
    writer = IndexedWriter(output_prefix, dtype)
    docs = tokens = 0
    start = last = time.perf_counter()
    # fork where there is one (Megatron's preprocess does too): a spawned worker would import
    # torch again through the data package, seconds of CPU per worker; the parent has used no
    # tokenizer threads yet, so forking it is safe
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = mp.get_context(method).Pool(workers, _start_worker, (encoder,)) if workers > 1 else None
    try:
        batches = read_batches(files, text_key)
        if pool is not None:
            encoded: Iterator[tuple[np.ndarray, np.ndarray]] = pool.imap(
                _encode_in_worker, batches, 4
            )
        else:
            local = make_encode(encoder)
            encoded = (local(*job) for job in batches)
        for flat, lengths in encoded:
            writer.add_documents(flat, lengths)
            docs, tokens = docs + len(lengths), tokens + len(flat)
            if progress and time.perf_counter() - last > 1.0:
                last = time.perf_counter()
                progress(_rate_line(docs, tokens, last - start))
        if docs == 0:
            raise PreprocessError("--input", inputs, "holds no non-empty documents")
        seconds = time.perf_counter() - start
        meta = {
            "documents": docs,
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "eos_id": eos,
            "vocab_size": vocab_size,
            "tokenizer": "bytes" if tokenizer is None else os.path.abspath(tokenizer),
            "text_key": text_key,
        }
        sidecar = Path(output_prefix + ".json")
        sidecar.with_suffix(".json.tmp").write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(sidecar.with_suffix(".json.tmp"), sidecar)
        writer.finalize()  # the .idx appears last: only now does the pair look complete
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool:
            pool.terminate()
    if progress:
        progress(_rate_line(docs, tokens, seconds))
    return meta


def _rate_line(docs: int, tokens: int, seconds: float) -> str:
    s = max(seconds, 1e-9)
    return (
        f"{docs:,} documents ({docs / s:,.0f}/s), {tokens:,} tokens ({tokens / s:,.0f}/s), "
        f"{seconds:.1f} s"
    )
