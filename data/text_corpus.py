"""Sources read from text files on disk: the Python stdlib's own sources, or a user's corpus."""

import os
import sysconfig
from pathlib import Path

import torch

from data.hf_tokenizer import load_tokenizer_codec
from data.token_source import (
    BYTE_EOS_ID,
    BYTE_VOCAB_SIZE,
    TokenSource,
    decode_bytes,
    encode_bytes,
    split_holdout,
)

# Tests are skipped because they hold deliberately odd files (bad encodings, huge literals)
# and would make the corpus depend on whether the distro ships them.
STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
TEXT_SUFFIXES = (".txt", ".py", ".md")


def list_corpus_files(
    root: Path, suffixes: tuple[str, ...], skip_dirs: frozenset[str]
) -> list[Path]:
    """Files under `root` with one of `suffixes`, sorted by relative POSIX path."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]  # prune in place
        for name in filenames:
            if name.endswith(suffixes):
                full = Path(dirpath, name)
                found.append((full.relative_to(root).as_posix(), full))
    # Sorting the full relative paths (not per-directory) makes the order platform-independent.
    return [full for _, full in sorted(found)]


def read_corpus(files: list[Path], max_bytes: int, separator: bytes = b"\n") -> bytes:
    """Concatenate readable files with `separator` between them, truncated to `max_bytes`."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    parts: list[bytes] = []
    total = 0
    for path in files:
        try:
            content = path.read_bytes()
        except OSError:
            continue  # unreadable files (permissions, broken links) are skipped, not fatal
        parts.append(content)
        total += len(content) + 1
        if total >= max_bytes:
            break  # stop reading early: the stdlib alone is far larger than a default budget
    return separator.join(parts)[:max_bytes]


def _byte_level_source(raw: bytes, val_fraction: float) -> TokenSource:
    """Wrap raw bytes (files joined by BYTE_EOS_ID) as a byte-level TokenSource stored as uint8
    (8x smaller than int64)."""
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    train, val = split_holdout(tokens, val_fraction)
    return TokenSource(train, val, BYTE_VOCAB_SIZE, encode_bytes, decode_bytes, eos_id=BYTE_EOS_ID)


def build_stdlib_source(val_fraction: float, max_bytes: int) -> TokenSource:
    """Byte-level tokens over this interpreter's standard-library .py files (always offline)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = list_corpus_files(root, (".py",), STDLIB_SKIP_DIRS)
    raw = read_corpus(files, max_bytes, bytes([BYTE_EOS_ID]))  # each file one document
    if not raw:
        raise FileNotFoundError(f"no readable .py files in the standard library at {root}")
    return _byte_level_source(raw, val_fraction)


def build_text_source(
    path: str | None, tokenizer: str | None, val_fraction: float, max_bytes: int
) -> TokenSource:
    """Tokens from a text file or folder of .txt/.py/.md files, with a tokenizer.json or bytes."""
    if path is None:
        raise ValueError("source='text' needs a path to a text file or folder")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"text data path not found: {path}")
    files = [root] if root.is_file() else list_corpus_files(root, TEXT_SUFFIXES, frozenset())
    # byte-level: each file one document, ended by BYTE_EOS_ID; tokenized: one stream with no
    # documents (a tokenizer's EOS is not inserted here)
    separator = bytes([BYTE_EOS_ID]) if tokenizer is None else b"\n"
    raw = read_corpus(files, max_bytes, separator)
    if not raw:
        raise FileNotFoundError(f"no readable {'/'.join(TEXT_SUFFIXES)} text under {path}")
    if tokenizer is None:
        return _byte_level_source(raw, val_fraction)

    vocab_size, encode, decode = load_tokenizer_codec(tokenizer)
    tokens = torch.tensor(encode(raw.decode("utf-8", errors="replace")), dtype=torch.int32)
    train, val = split_holdout(tokens, val_fraction)
    return TokenSource(train, val, vocab_size, encode, decode)
