"""A NaN/inf never reaches the weights or a checkpoint: a real diverging run through the entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

DIVERGING = [
    "model=debug",
    "train.steps=6",
    "train.global_batch_size=4",
    "train.seq_len=32",
    "train.sample_tokens=0",
    "optim.lr=1e6",
    "optim.warmup_steps=0",
    "train.log_interval=1",
    "checkpoint.interval=1",
    "checkpoint.keep=2",
]


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.train",
            *DIVERGING,
            f"checkpoint.dir={tmp_path / 'ck'}",
            f"hydra.run.dir={tmp_path / 'run'}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _all_finite(checkpoint: Path) -> bool:
    files = list(checkpoint.rglob("*.safetensors"))
    assert files, checkpoint
    for f in files:
        with safe_open(f, "pt") as st:
            if not all(torch.isfinite(st.get_tensor(k)).all() for k in st.keys()):
                return False
    return True


def test_stops_at_the_first_nonfinite_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path,
) -> None:
    result = _train(tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("training stopped: non-finite step "), (
        result.stderr
    )
    bad_step = int(lines[0].split("non-finite step ")[1].split(":")[0])
    saved = sorted((tmp_path / "ck").glob("step-*"))
    assert saved and int(saved[-1].name.split("-")[1]) == bad_step - 1  # nothing of the bad step
    assert all(_all_finite(c) for c in saved)


def test_skip_mode_skips_then_stops_after_n_in_a_row(tmp_path: Path) -> None:
    result = _train(tmp_path, "train.nonfinite=skip", "train.nonfinite_max_skips=2")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "update skipped (1 in a row" in result.stdout
    assert "2 non-finite steps in a row" in result.stderr
    assert all(_all_finite(c) for c in (tmp_path / "ck").glob("step-*"))
