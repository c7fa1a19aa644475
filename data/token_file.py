"""Pre-tokenized token files (nanoGPT/Megatron `.bin` convention) opened as memory maps.

Dtype comes from the file name: `*.u32.bin` holds uint32 ids, any other `*.bin` uint16.
A directory holding `train.bin` and `val.bin` (or their `.u32.bin` forms) is used as the split.
"""

from pathlib import Path

import numpy as np
import torch

from data.hf_tokenizer import load_tokenizer_codec
from data.token_source import TokenSource, split_holdout

_SCAN_CHUNK = 1 << 24  # tokens per max() pass, so a huge map is never paged in all at once


def token_dtype(path: Path) -> np.dtype:
    """The id dtype a token file's name declares: uint32 for `*.u32.bin`, else uint16."""
    if path.name.endswith(".u32.bin"):
        return np.dtype(np.uint32)
    if path.name.endswith(".bin"):
        return np.dtype(np.uint16)
    raise ValueError(f"token file must end in .bin (uint16) or .u32.bin (uint32): {path}")


def open_token_file(path: Path) -> torch.Tensor:
    """Memory-map a token file as a 1-D torch tensor without reading it."""
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    dtype = token_dtype(path)
    size = path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        raise ValueError(f"{path} has {size} bytes, not a positive multiple of {dtype} size")
    # mode="c" (copy-on-write) gives a writable view, which torch.from_numpy wants, while
    # guaranteeing the file on disk is never modified.
    return torch.from_numpy(np.memmap(path, dtype=dtype, mode="c"))


def max_token(tokens: torch.Tensor) -> int:
    """Largest id in a (possibly memory-mapped) stream, scanned in chunks."""
    array = tokens.numpy()
    return max(int(array[i : i + _SCAN_CHUNK].max()) for i in range(0, len(array), _SCAN_CHUNK))


def _split_paths(directory: Path) -> tuple[Path, Path]:
    """The (train, val) files of a pre-split directory, preferring the uint32 names."""
    picked = []
    for split in ("train", "val"):
        wide, narrow = directory / f"{split}.u32.bin", directory / f"{split}.bin"
        if not wide.is_file() and not narrow.is_file():
            raise FileNotFoundError(f"{directory} is a directory but has no {narrow.name}")
        picked.append(wide if wide.is_file() else narrow)
    return picked[0], picked[1]


def build_token_file_source(
    path: str | None, tokenizer: str | None, val_fraction: float
) -> TokenSource:
    """Token ids from a `.bin` file (tail held out) or a directory with train/val files."""
    if path is None:
        raise ValueError("source='tokens' needs a path to a .bin file or a directory")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"token data path not found: {path}")
    if root.is_dir():
        train_path, val_path = _split_paths(root)
        train, val = open_token_file(train_path), open_token_file(val_path)
    else:
        train, val = split_holdout(open_token_file(root), val_fraction)
    highest = max(max_token(t) for t in (train, val) if len(t))

    if tokenizer is None:
        # Round up to a multiple of 64 so the embedding's rows shard evenly and align well.
        vocab_size = (highest + 1 + 63) // 64 * 64
        return TokenSource(
            train,
            val,
            vocab_size,
            lambda s: [int(t) for t in s.split()],
            lambda ids: " ".join(str(int(t)) for t in ids),
            has_text=False,
        )

    vocab_size, encode, decode = load_tokenizer_codec(tokenizer)
    if highest >= vocab_size:
        # Caught here because on GPU an out-of-range id is an opaque device-side assert.
        raise ValueError(f"{path} holds id {highest}, beyond {tokenizer}'s {vocab_size} ids")
    return TokenSource(train, val, vocab_size, encode, decode)
