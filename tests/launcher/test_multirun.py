"""The sweep summary: one row per job. A real local sweep, each job its own worker group in its
own folder, is the README's sweep command (tests/test_readme_commands.py checks its summary)."""

from __future__ import annotations

from pathlib import Path

from launcher.sweep_summary import format_table, summarize_sweep

REPO = Path(__file__).resolve().parents[2]


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
