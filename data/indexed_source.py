"""source=indexed: a weighted blend of Megatron `.bin/.idx` datasets as packed samples.

Each prefix's documents are split by position into train (the first 1 - val_fraction) and
validation (the rest), as Megatron's split does. `launcher.preprocess` also writes
`<prefix>.json` (EOS id, vocabulary size); without it (files from Megatron's tools) the EOS id
comes from the tokenizer, or is unknown (None), and the vocabulary from the largest id.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data.blend import parse_blend
from data.hf_tokenizer import load_tokenizer_codec, tokenizer_eos_id
from data.indexed_dataset import IndexedDataset
from data.packing import BlendedSamples, PackedDocuments
from data.token_source import TokenSource, decode_bytes, encode_bytes

_SCAN_CHUNK = 1 << 24  # tokens per read when scanning for the largest id (read, not mapped)


def read_sidecar(prefix: str) -> dict:
    """The metadata `launcher.preprocess` wrote beside a prefix, or {} for other tools' files."""
    path = Path(prefix + ".json")
    return json.loads(path.read_text()) if path.is_file() else {}


def largest_id(dataset: IndexedDataset) -> int:
    """Largest token id in the `.bin`, read in chunks with plain reads so the memory map's pages
    never become resident (memory stays independent of corpus size)."""
    highest, item = 0, dataset.dtype.itemsize
    with open(dataset.prefix + ".bin", "rb") as f:
        while chunk := f.read(_SCAN_CHUNK * item):
            highest = max(highest, int(np.frombuffer(chunk, dtype=dataset.dtype).max()))
    return highest


def _split(dataset: IndexedDataset, val_fraction: float, prefix: str) -> int:
    n = dataset.n_documents
    n_val = max(1, int(round(n * val_fraction)))
    if n < 2 or n_val >= n:
        raise ValueError(
            f"{prefix} holds {n} documents, too few to hold out data.val_fraction={val_fraction} "
            "of them and train on the rest"
        )
    return n - n_val


def build_indexed_source(
    paths: list[object], tokenizer: str | None, val_fraction: float, seq_len: int, seed_key: int = 0
) -> TokenSource:
    """The blend of `paths` (Megatron's `[w, prefix, ...]` or `[prefix, ...]`) as packed samples."""
    weights, prefixes = parse_blend(paths)
    datasets = [IndexedDataset(p) for p in prefixes]
    sidecars = [read_sidecar(p) for p in prefixes]
    train, val = [], []
    for key, (prefix, ds) in enumerate(zip(prefixes, datasets)):
        cut = _split(ds, val_fraction, prefix)
        train.append(PackedDocuments(ds, 0, cut, seq_len, key + seed_key, shuffle=True))
        val.append(PackedDocuments(ds, cut, ds.n_documents, seq_len, key, shuffle=False))
        for split, packed in (("training", train[-1]), ("validation", val[-1])):
            if packed.n_samples == 0:
                raise ValueError(
                    f"{prefix}'s {split} split holds {packed.n_tokens} tokens, fewer than one "
                    f"sample of seq_len + 1 = {seq_len + 1}"
                )
    eos_ids = {s.get("eos_id") for s in sidecars if "eos_id" in s}
    if len(eos_ids) > 1:
        raise ValueError(f"the blended prefixes end documents with different EOS ids {eos_ids}")
    if tokenizer is not None:
        vocab_size, encode, decode = load_tokenizer_codec(tokenizer)
        eos = eos_ids.pop() if eos_ids else tokenizer_eos_id(tokenizer)
        return TokenSource(
            BlendedSamples(train, weights),
            BlendedSamples(val, weights),
            vocab_size,
            encode,
            decode,
            eos_id=eos,
        )
    eos = eos_ids.pop() if eos_ids else None
    if sidecars and all(s.get("tokenizer") == "bytes" for s in sidecars):
        return TokenSource(
            BlendedSamples(train, weights),
            BlendedSamples(val, weights),
            max(s["vocab_size"] for s in sidecars),
            encode_bytes,
            decode_bytes,
            eos_id=eos,
        )
    known = [s["vocab_size"] for s in sidecars if "vocab_size" in s]
    highest = max(known) - 1 if len(known) == len(sidecars) else max(map(largest_id, datasets))
    return TokenSource(
        BlendedSamples(train, weights),
        BlendedSamples(val, weights),
        (highest + 1 + 63) // 64 * 64,  # a multiple of 64: the embedding shards evenly
        lambda s: [int(t) for t in s.split()],
        lambda ids: " ".join(str(int(t)) for t in ids),
        has_text=False,
        eos_id=eos,
    )
