"""`python -m launcher.plot RUN_DIR`: loss and throughput curves from metrics.jsonl as PNGs.

A run folder (holding metrics.jsonl) gets loss.png and throughput.png; a multirun folder
(job folders 0/, 1/, ... each with metrics.jsonl and .hydra/overrides.yaml) gets compare.png,
one curve per job labelled by its overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from omegaconf import OmegaConf


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of run_dir/metrics.jsonl, in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def job_label(job_dir: Path) -> str:
    """A job's command-line overrides (`parallel.pp=2 parallel.schedule=gpipe`), or its folder name."""
    overrides = job_dir / ".hydra" / "overrides.yaml"
    listed = list(OmegaConf.load(overrides)) if overrides.is_file() else []
    return " ".join(str(o) for o in listed) or job_dir.name


def _curve(ax: Axes, records: list[dict[str, Any]], key: str, **style: Any) -> None:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if points:
        ax.plot(*zip(*points), **style)


def plot_run(run_dir: Path) -> list[Path]:
    """loss.png (train and validation loss) and throughput.png (tokens/s, MFU) in run_dir."""
    records = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    _curve(ax, records, "loss", label="train loss")
    _curve(ax, records, "val_loss", label="validation loss", marker="o", linestyle="--")
    ax.set(xlabel="step", ylabel="loss", title=f"loss: {run_dir.name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    _curve(ax, records, "tokens_per_s", label="tokens/s (all devices)", color="C0")
    ax.set(xlabel="step", ylabel="tokens/s", title=f"throughput: {run_dir.name}")
    if any("mfu" in r for r in records):
        mfu = ax.twinx()
        _curve(
            mfu,
            [{**r, "mfu": r["mfu"] * 100} for r in records if "mfu" in r],
            "mfu",
            label="MFU (%)",
            color="C1",
            linestyle="--",
        )
        mfu.set_ylabel("MFU (%)")
        mfu.legend(loc="lower right")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(run_dir / "throughput.png", dpi=110)
    plt.close(fig)
    return [run_dir / "loss.png", run_dir / "throughput.png"]


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders holding metrics.jsonl, by job number (2 before 10)."""
    jobs = [d for d in sweep_dir.iterdir() if (d / "metrics.jsonl").is_file()]
    return sorted(jobs, key=lambda d: (len(d.name), d.name))


def plot_multirun(sweep_dir: Path) -> Path:
    """compare.png in sweep_dir: loss and tokens/s against step, one curve per job."""
    fig, (loss_ax, speed_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    for job in job_dirs(sweep_dir):
        records, label = read_metrics(job), f"{job.name}: {job_label(job)}"
        _curve(loss_ax, records, "loss", label=label)
        _curve(speed_ax, records, "tokens_per_s", label=label, marker=".")
    loss_ax.set(xlabel="step", ylabel="train loss", title="loss")
    speed_ax.set(xlabel="step", ylabel="tokens/s (all devices)", title="throughput")
    handles, labels = loss_ax.get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=min(2, len(labels)), fontsize=8, frameon=False
    )
    fig.suptitle(f"sweep {sweep_dir}")
    fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 1) // 2), 1, 1))
    fig.savefig(sweep_dir / "compare.png", dpi=110)
    plt.close(fig)
    return sweep_dir / "compare.png"


def main(argv: list[str] | None = None) -> None:
    """Plot a run folder or a multirun folder; exit code 2 if it is neither."""
    parser = argparse.ArgumentParser(prog="python -m launcher.plot", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run folder or a multirun (sweep) folder")
    run_dir = parser.parse_args(argv).run_dir
    if (run_dir / "metrics.jsonl").is_file():
        written = plot_run(run_dir)
    elif run_dir.is_dir() and job_dirs(run_dir):
        written = [plot_multirun(run_dir)]
    else:
        print(
            f"{run_dir}: no metrics.jsonl here nor in job folders below it; pass a run folder "
            "(outputs/...) or a multirun folder (multirun/...)",
            file=sys.stderr,
        )
        sys.exit(2)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
