"""Loading a Hugging Face `tokenizers` tokenizer.json as (vocab_size, encode, decode)."""

from collections.abc import Callable
from pathlib import Path

Codec = tuple[int, Callable[[str], list[int]], Callable[[list[int]], str]]


def load_tokenizer_codec(path: str) -> Codec:
    """Load a tokenizer.json and return (vocab_size, encode, decode); ValueError if invalid."""
    # Imported here so the stdlib and byte-level paths work without `tokenizers` installed.
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the Rust binding raises a bare Exception for bad JSON
        raise ValueError(f"cannot load tokenizer from {path}: {e}") from e

    def encode(text: str) -> list[int]:
        # No special tokens: training data is one continuous stream, not separate documents.
        return tok.encode(text, add_special_tokens=False).ids

    def decode(ids: list[int]) -> str:
        return tok.decode([int(i) for i in ids])

    return tok.get_vocab_size(), encode, decode


EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


def tokenizer_eos_id(path: str) -> int | None:
    """The id of the tokenizer's end-of-document token (the first of EOS_CANDIDATES it has)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    for token in EOS_CANDIDATES:
        if (found := tok.token_to_id(token)) is not None:
            return int(found)
    return None
