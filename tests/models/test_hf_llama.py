"""A malformed Hugging Face directory is one HFFormatError naming the file and the problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.hf import INDEX, SINGLE_FILE, HFFormatError, HFWeights
from models.llama import ModelArgs
from models.llama.hf import LLAMA_HF

ARGS = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16)


def _hf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_HF.config(ARGS, torch.float32)))
    return d


def test_invalid_config_json(tmp_path: Path) -> None:
    d = _hf_dir(tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(HFFormatError, match=r"config.json: not valid JSON"):
        HFWeights(d, ARGS, LLAMA_HF)


def test_index_without_weight_map(tmp_path: Path) -> None:
    d = _hf_dir(tmp_path)
    (d / INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(HFFormatError, match=r"index.json: no 'weight_map'"):
        HFWeights(d, ARGS, LLAMA_HF)


def test_index_pointing_outside_the_directory(tmp_path: Path) -> None:
    d = _hf_dir(tmp_path)
    save_file({"x": torch.zeros(1)}, tmp_path / "outside.safetensors")
    (d / INDEX).write_text(json.dumps({"weight_map": {"lm_head.weight": "../outside.safetensors"}}))
    with pytest.raises(HFFormatError, match=r"lies outside"):
        HFWeights(d, ARGS, LLAMA_HF)


def test_a_file_named_model_safetensors_that_is_not_one(tmp_path: Path) -> None:
    d = _hf_dir(tmp_path)
    (d / SINGLE_FILE).write_bytes(b"PK\x03\x04 a zip, say")
    with pytest.raises(HFFormatError, match=r"model.safetensors: not a safetensors file"):
        HFWeights(d, ARGS, LLAMA_HF)


def test_through_the_entry_point_one_line_exit_2(tmp_path: Path) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("[1, 2]")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.train",
            "train.steps=1",
            "train.sample_tokens=0",
            f"model.init_from={d}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "model.init_from" in lines[0], (
        result.stderr
    )
