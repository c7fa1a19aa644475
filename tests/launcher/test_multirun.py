"""A local sweep (`python -m launcher.train -m ...`): every job its own worker group in its own
folder, and a summary with one row per job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from launcher.sweep_summary import format_table, summarize_sweep

REPO = Path(__file__).resolve().parents[2]


def test_sweep_runs_each_job_as_its_own_worker_group(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.train",
            "-m",
            "parallel.schedule=1f1b,gpipe",
            "parallel.pp=2",
            "parallel.microbatches=2",
            "model=debug",
            "device=cpu",
            "train.steps=3",
            "train.seq_len=32",
            "train.global_batch_size=8",
            "train.sample_tokens=0",
            "train.log_interval=1",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = summarize_sweep(sweep)
    assert [r.job for r in rows] == ["0", "1"] and all(r.steps == 3 for r in rows), rows
    assert (
        rows[0].loss == rows[1].loss
    )  # the schedule changes the order of work, not the arithmetic
    summary = (sweep / "summary.md").read_text()
    assert (
        "| 0 | parallel.schedule=1f1b | 3 |" in summary
        and "| 1 | parallel.schedule=gpipe | 3 |" in summary
    )
    assert "sweep summary" in result.stdout


def test_summary_marks_a_job_without_metrics_failed(tmp_path: Path) -> None:
    for job, overrides in (("0", "- optim.lr=0.001\n"), ("1", "- optim.lr=0.1\n")):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(overrides)
    (tmp_path / "0" / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 5.0, "tokens_per_s": 10.0}\n{"step": 2, "loss": 4.5, "tokens_per_s": 20.0}\n'
    )
    table = format_table(summarize_sweep(tmp_path))
    assert "| 0 | optim.lr=0.001 | 2 | 4.5000 |  | 20 |" in table
    assert "| 1 | optim.lr=0.1 | failed | failed |  | failed |" in table
