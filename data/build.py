"""The one entry point that turns a data config into a TokenSource."""

from data.text_corpus import build_stdlib_source, build_text_source
from data.token_file import build_token_file_source
from data.token_source import TokenSource

SOURCES = ("stdlib", "tokens", "text")


def build_token_source(
    source: str, path: str | None, tokenizer: str | None, val_fraction: float, max_bytes: int
) -> TokenSource:
    """Build tokens from `source`: "stdlib" (offline default), "tokens" (.bin) or "text"."""
    if source == "stdlib":
        return build_stdlib_source(val_fraction, max_bytes)
    if source == "tokens":
        # max_bytes does not apply: a memory map costs nothing until pages are touched.
        return build_token_file_source(path, tokenizer, val_fraction)
    if source == "text":
        return build_text_source(path, tokenizer, val_fraction, max_bytes)
    raise ValueError(f"data source must be one of {SOURCES}, got {source!r}")
