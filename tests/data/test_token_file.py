"""Memory-mapped .bin token files: dtype from the name, tail or directory split, vocab size."""

from pathlib import Path

import numpy as np
import pytest
import torch

from data import build_token_source


def test_uint16_file_reads_back_with_tail_split(tmp_path: Path) -> None:
    ids = np.arange(1000, dtype=np.uint16) % 700
    ids.tofile(tmp_path / "toks.bin")
    src = build_token_source("tokens", str(tmp_path / "toks.bin"), None, 0.1, 0)
    assert src.train.dtype == torch.uint16
    assert torch.equal(torch.cat([src.train, src.val]).long(), torch.from_numpy(ids).long())
    assert len(src.val) == 100
    assert src.vocab_size == 704  # max id 699, +1, rounded up to a multiple of 64
    assert src.decode([3, 4]) == "3 4" and src.encode("3 4") == [3, 4]


def test_uint32_file_and_presplit_directory(tmp_path: Path) -> None:
    train = np.array([0, 70_000, 5, 6], dtype=np.uint32)
    val = np.array([1, 2], dtype=np.uint32)
    train.tofile(tmp_path / "train.u32.bin")
    val.tofile(tmp_path / "val.u32.bin")
    src = build_token_source("tokens", str(tmp_path), None, 0.5, 0)
    assert src.train.tolist() == train.tolist() and src.val.tolist() == val.tolist()
    assert src.vocab_size == 70_016
    single = build_token_source("tokens", str(tmp_path / "train.u32.bin"), None, 0.0, 0)
    assert single.train.tolist() == train.tolist()


def test_token_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        build_token_source("tokens", str(tmp_path / "missing.bin"), None, 0.1, 0)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="odd.bin"):
        build_token_source("tokens", str(tmp_path / "odd.bin"), None, 0.1, 0)
    with pytest.raises(FileNotFoundError, match="train.bin"):
        build_token_source("tokens", str(tmp_path), None, 0.1, 0)
