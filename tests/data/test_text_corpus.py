"""The stdlib and text sources: real files, byte-level and Hugging Face tokenizers."""

from pathlib import Path

import pytest
import torch

from data import build_token_source

SAMPLE = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # five\n"


def _train_bpe(path: Path) -> str:
    """Train a tiny byte-level BPE tokenizer on a few strings and save it as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([SAMPLE, "hello world", "the quick brown fox"] * 10, trainer)
    out = path / "tokenizer.json"
    tok.save(str(out))
    return str(out)


def test_stdlib_source_is_python_and_deterministic() -> None:
    first = build_token_source("stdlib", None, None, 0.1, 200_000)
    second = build_token_source("stdlib", None, None, 0.1, 200_000)
    assert first.vocab_size == 256 and first.train.dtype == torch.uint8
    assert len(first.train) > 0 and len(first.val) > 0
    assert len(first.train) + len(first.val) == 200_000
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert "def " in first.decode(first.train[:20_000].tolist())
    assert first.decode(first.encode(SAMPLE)) == SAMPLE


def test_stdlib_val_is_the_tail_not_the_train() -> None:
    whole = build_token_source("stdlib", None, None, 0.0, 100_000).train
    split = build_token_source("stdlib", None, None, 0.25, 100_000)
    assert len(split.val) == 25_000
    assert torch.equal(torch.cat([split.train, split.val]), whole)


def test_text_source_with_hf_tokenizer_round_trips(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.py").write_text(SAMPLE)
    (corpus / "sub" / "b.md").write_text("hello world\n")
    (corpus / "ignored.bin").write_bytes(b"\x00\x01")
    src = build_token_source("text", str(corpus), _train_bpe(tmp_path), 0.0, 1_000_000)
    assert src.vocab_size <= 300 and src.train.dtype == torch.int32
    assert src.decode(src.train.tolist()) == SAMPLE + "\n" + "hello world\n"
    assert src.decode(src.encode("the quick brown fox")) == "the quick brown fox"


def test_text_source_without_tokenizer_is_bytes_and_respects_max_bytes(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(SAMPLE)
    src = build_token_source("text", str(tmp_path / "a.txt"), None, 0.0, 10)
    assert src.vocab_size == 256 and src.decode(src.train.tolist()) == SAMPLE[:10]


def test_text_source_errors_name_the_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        build_token_source("text", missing, None, 0.1, 1000)
    (tmp_path / "a.txt").write_text(SAMPLE)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="garbage.json"):
        build_token_source("text", str(tmp_path / "a.txt"), str(garbage), 0.1, 1000)
    with pytest.raises(ValueError, match="source"):
        build_token_source("parquet", None, None, 0.1, 1000)
