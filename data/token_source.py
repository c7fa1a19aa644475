"""The TokenSource record every source builds, plus the pieces all sources share."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from data.batch_sampler import SampleRows

BYTE_VOCAB_SIZE = 256
BYTE_EOS_ID = 0  # byte-level documents end with NUL (launcher.preprocess drops NULs from text)


@dataclass
class TokenSource:
    """A train/validation split of one token stream and the codec that produced it."""

    # a 1-D integer tensor, any dtype (the sampler widens to int64 per batch), or packed rows
    # of documents (source=indexed)
    train: torch.Tensor | SampleRows
    val: torch.Tensor | SampleRows  # the held-out tail of the same stream, or held-out documents
    vocab_size: int
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    has_text: bool = True  # False: bare token ids with no tokenizer (decode prints the ids)
    # the end-of-document id appended per document (None: a stream without documents); samples
    # keep it between documents, so boundaries can be derived from the input tokens
    eos_id: int | None = None


def encode_bytes(text: str) -> list[int]:
    """Encode text as its UTF-8 bytes (the byte-level tokenizer)."""
    return list(text.encode("utf-8"))


def decode_bytes(ids: list[int]) -> str:
    """Decode UTF-8 byte ids; bytes that form no valid UTF-8 sequence (a short run's model
    writes some) are dropped rather than shown as U+FFFD."""
    return bytes(ids).decode("utf-8", errors="ignore")


def split_holdout(tokens: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a stream into (train, val) views, val being the last `val_fraction` of it."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(len(tokens) * val_fraction)
    n_train = len(tokens) - n_val
    return tokens[:n_train], tokens[n_train:]
