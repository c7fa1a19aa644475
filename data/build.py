"""The one entry point that turns a data config into a TokenSource."""

from data.indexed_source import build_indexed_source
from data.text_corpus import build_stdlib_source, build_text_source
from data.token_file import build_token_file_source
from data.token_source import TokenSource

SOURCES = ("stdlib", "tokens", "text", "indexed")


def build_token_source(
    source: str,
    path: str | None,
    tokenizer: str | None,
    val_fraction: float,
    max_bytes: int,
    paths: list[object] | None = None,
    seq_len: int = 0,
) -> TokenSource:
    """Build tokens from `source`: "stdlib" (offline default), "tokens" (.bin), "text", or
    "indexed" (a blend of Megatron .bin/.idx `paths`, packed into seq_len + 1 token samples)."""
    if source == "stdlib":
        return build_stdlib_source(val_fraction, max_bytes)
    if source == "tokens":
        # max_bytes does not apply: a memory map costs nothing until pages are touched.
        return build_token_file_source(path, tokenizer, val_fraction)
    if source == "text":
        return build_text_source(path, tokenizer, val_fraction, max_bytes)
    if source == "indexed":
        return build_indexed_source(paths or [], tokenizer, val_fraction, seq_len)
    raise ValueError(f"data source must be one of {SOURCES}, got {source!r}")
