"""A sweep's summary: one row per job with its overrides, final loss and tokens/s.

`SweepSummary` is a Hydra callback (conf/hydra/callbacks/sweep_summary.yaml): when a multirun
ends, locally or on Slurm, it reads every job folder's `.hydra/overrides.yaml` and
`metrics.jsonl`, prints the table and writes it to `<sweep dir>/summary.md`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


@dataclass
class JobRow:
    """What one sweep job ran and reached."""

    job: str
    overrides: list[str]
    steps: int | None
    loss: float | None
    val_loss: float | None
    tokens_per_s: float | None


def read_job(job_dir: Path) -> JobRow:
    """The row for one job folder; loss fields are None when it logged nothing."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    metrics = job_dir / "metrics.jsonl"
    records = (
        [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if metrics.is_file()
        else []
    )
    last = records[-1] if records else {}
    val = [r["val_loss"] for r in records if "val_loss" in r]
    # the first interval includes start-up (graph capture, first allocations): leave it out
    speeds = [r["tokens_per_s"] for r in records[1:] or records if "tokens_per_s" in r]
    return JobRow(
        job=job_dir.name,
        overrides=[str(o) for o in overrides],
        steps=last.get("step"),
        loss=last.get("loss"),
        val_loss=val[-1] if val else None,
        tokens_per_s=statistics.median(speeds) if speeds else None,
    )


def summarize_sweep(sweep_dir: Path) -> list[JobRow]:
    """Rows for every job folder (one holding `.hydra/`) under the sweep folder, by job number."""
    jobs = [d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()]
    return [read_job(d) for d in sorted(jobs, key=lambda d: (len(d.name), d.name))]  # 2 before 10


def format_table(rows: list[JobRow]) -> str:
    """A Markdown table of what differs between jobs (shared overrides above it); a job that
    logged nothing shows `failed`."""

    def num(value: float | int | None, spec: str) -> str:
        return "failed" if value is None else format(value, spec)

    shared = [o for o in rows[0].overrides if all(o in r.overrides for r in rows)] if rows else []
    lines = [
        f"all jobs: {' '.join(shared) or '(no shared overrides)'}",
        "",
        "| job | overrides | steps | final loss | final val loss | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        val = "" if r.val_loss is None else f"{r.val_loss:.4f}"
        own = " ".join(o for o in r.overrides if o not in shared) or "(none)"
        lines.append(
            f"| {r.job} | {own} | {num(r.steps, 'd')} | {num(r.loss, '.4f')} "
            f"| {val} | {num(r.tokens_per_s, ',.0f')} |"
        )
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Hydra callback: write `<sweep dir>/summary.md` when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Summarize the finished sweep."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        table = format_table(summarize_sweep(sweep_dir))
        (sweep_dir / "summary.md").write_text(f"# Sweep {sweep_dir}\n\n{table}")
        print(f"\nsweep summary ({sweep_dir / 'summary.md'}):\n{table}", flush=True)
