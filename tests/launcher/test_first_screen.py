"""What a new user sees, through the real entry point: the banner, a token-file run that ends
well without a tokenizer, one line for a typo'd key or a too-small split, and --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launcher.config import ConfigError
from launcher.run.build import load_data
from launcher.run.compose import compose_config


def _train(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.train", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_token_file_run_without_tokenizer_shows_the_banner_and_ends_with_a_sample(
    tmp_path: Path,
) -> None:
    tokens = np.random.default_rng(0).integers(0, 200, 40_000, dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    run = tmp_path / "run"
    result = _train(
        "model=debug",
        "data=tokens",
        f"data.path={tmp_path / 'train.bin'}",
        "train.steps=2",
        "train.seq_len=32",
        "train.sample_tokens=8",
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    banner = result.stdout.splitlines()[:6]
    for needle in (
        "model debug",
        "M parameters",
        "cpu, fp32",
        "mesh dp=1 x pp=1 x tp=1",
        "data tokens",
        "tokens per step",
        f"run folder {run}",
        f"checkpoints {run / 'checkpoints'}",
        "resume: no",
    ):
        assert any(needle in line for line in banner), (needle, banner)
    assert "sample from the trained model (token ids" in result.stdout
    assert (
        "saved " in result.stdout and "MiB" in result.stdout
    )  # where the checkpoint went, how big
    assert "model debug" in (run / "train.log").read_text()


def test_a_typo_names_the_key_it_meant(tmp_path: Path) -> None:
    for arg in ("train.step=5", "+train.step=5"):
        result = _train(arg)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "train.step=" in lines[0] and "did you mean train.steps?" in lines[0]
    assert not (tmp_path / "outputs").exists()  # refused runs leave no folder


def test_a_validation_split_too_small_for_one_batch_names_a_real_key() -> None:
    with pytest.raises(
        ConfigError, match=r"data.val_fraction=0.05: the validation split holds 1,000 tokens"
    ):
        load_data(compose_config(["data.max_bytes=20000"], 1))


def test_help_says_what_tridist_is_and_lists_its_groups() -> None:
    out = _train("--help").stdout
    assert out.startswith("tridist: train Llama-style language models") and "model: debug" in out
    assert "cluster" not in out  # the planner's section, not training's


def test_the_banner_says_when_the_cost_model_chose_the_pipeline_split() -> None:
    from launcher.run.banner import split_line
    from launcher.run.build import pipeline_split

    head_heavy = ["model=debug", "model.dim=128", "model.vocab_size=32000", "parallel.pp=4"]
    lines = {}
    for setting in ("null", "even", "[1,3,4,0]"):
        cfg = compose_config(
            head_heavy + ["parallel.microbatches=8", f"parallel.layers_per_stage={setting}"], 4
        )
        split = pipeline_split(cfg)
        assert split is not None
        lines[setting] = split_line(split, cfg.model.n_layers)
    assert "auto, the default here" in lines["null"], lines["null"]
    assert "the even split [2, 2, 2, 2] is estimated 1.1" in lines["null"], lines["null"]
    assert "parallel.layers_per_stage=even keeps" in lines["null"]
    assert lines["even"].startswith("  pipeline split [2, 2, 2, 2] blocks per stage (even")
    assert lines["[1,3,4,0]"].endswith("[1, 3, 4, 0] blocks per stage (parallel.layers_per_stage)")


def test_bf16_on_a_cpu_without_bf16_instructions_is_flagged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from launcher.run import banner

    cfg = compose_config(["model=debug", "device=cpu", "precision=bf16"])
    for has_bf16, flagged in ((True, False), (False, True)):
        monkeypatch.setattr(banner, "cpu_has_bf16", lambda has=has_bf16: has)
        line = banner.compute_dtype(cfg)
        assert line.startswith("cpu, bf16 autocast (fp32 weights)"), line
        assert ("runs emulated" in line) == flagged, line
    fp32 = compose_config(["model=debug", "device=cpu", "precision=fp32"])
    assert banner.compute_dtype(fp32) == "cpu, fp32"


def test_the_banner_says_a_moe_models_active_parameters_and_ep() -> None:
    import torch

    from data import TokenSource
    from launcher.run.banner import banner_lines

    cfg = compose_config(
        ["model=qwen3_moe_debug", "device=cpu", "parallel.dp=4", "parallel.ep=2"], 4
    )
    tokens = TokenSource(torch.zeros(100), torch.zeros(10), 256, list, str)
    first, mesh = banner_lines(cfg, tokens, None, None, None)[:2]
    # 330,560 parameters; a token goes through 2 of the 8 experts (3 x 64 x 32) of 4 layers
    assert "0.3M parameters (0.2M active)" in first, first
    assert "ep=2 over dp x cp (4 of 8 experts per rank)" in mesh, mesh
    dense = compose_config(["model=debug", "device=cpu"])
    line = banner_lines(dense, tokens, None, None, None)[0]
    assert "active" not in line, line
