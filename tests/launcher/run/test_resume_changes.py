"""Resume tells what changed: steering keys take the new value, keys defining the run are refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.run.resume import config_changes, defines_the_run

BASE = [
    "model=debug",
    "train.seq_len=32",
    "train.global_batch_size=4",
    "train.log_interval=1",
    "train.sample_tokens=0",
    "optim.warmup_steps=0",
]


def _train(tmp: Path, name: str, *overrides: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    run = tmp / name
    result = subprocess.run(
        [sys.executable, "-m", "launcher.train", *BASE, f"hydra.run.dir={run}", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = run / "metrics.jsonl"
    return result, [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("resume")
    result, _ = _train(tmp, "first", "train.steps=2", f"checkpoint.dir={tmp / 'ck'}")
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp / "ck"


def _resume(
    saved: Path, tmp: Path, *overrides: str
) -> tuple[subprocess.CompletedProcess, list[dict]]:
    ck = tmp / "ck"
    shutil.copytree(saved, ck)
    return _train(
        tmp, "resumed", "train.steps=4", f"checkpoint.dir={ck}", "train.resume=auto", *overrides
    )


def test_classification() -> None:
    changes = config_changes(
        {"optim": {"lr": 1.0}, "model": {"dim": 8, "name": "a"}, "train": {"seed": 0}},
        {"optim": {"lr": 2.0}, "model": {"dim": 16, "name": "b"}, "train": {"seed": 1}},
    )
    assert [(k, defines_the_run(k)) for k, _, _ in changes] == [
        ("model.dim", True),
        ("model.name", False),
        ("optim.lr", False),
        ("train.seed", True),
    ]


def test_a_new_learning_rate_really_trains(saved: Path, tmp_path: Path) -> None:
    same, same_metrics = _resume(saved, tmp_path / "a")
    changed, changed_metrics = _resume(saved, tmp_path / "b", "optim.lr=0.1")
    assert same.returncode == 0 and changed.returncode == 0, changed.stderr[-2000:]
    assert "optim.lr: 0.003 -> 0.1" in changed.stdout and "optim.lr" not in same.stdout
    # step 3 runs at the new rate (cosine decay from 0.1), and so trains differently
    assert changed_metrics[0]["lr"] > 10 * same_metrics[0]["lr"]
    assert changed_metrics[-1]["loss"] != same_metrics[-1]["loss"]


def test_changing_what_was_trained_is_refused_unless_allowed(saved: Path, tmp_path: Path) -> None:
    refused, _ = _resume(saved, tmp_path / "a", "train.seed=7")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "train.seed=7" in lines[0], (
        refused.stderr
    )
    assert "train.resume_allow_changes=[train.seed]" in lines[0]
    allowed, metrics = _resume(
        saved, tmp_path / "b", "train.seed=7", "train.resume_allow_changes=[train.seed]"
    )
    assert allowed.returncode == 0 and [m["step"] for m in metrics] == [3, 4], allowed.stderr[
        -2000:
    ]
