"""`python -m launcher.plot RUN_DIR`: loss and throughput curves from metrics.jsonl as PNGs.

A run folder (holding metrics.jsonl) gets loss.png and throughput.png; a multirun folder
(numbered job folders 0/, 1/, ... each with metrics.jsonl and .hydra/overrides.yaml) gets
compare.png, one curve per job labelled by its overrides. Any other folder is refused (exit 2).
Titles name the run from its resolved config (.hydra/config.yaml): the model and its parameter
count, the layout dp x pp x tp (schedule, v) and when it ran. Legends sit outside the axes; an
isolated spike is left off a y-axis (see `robust_range`), and the axis label says so.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from models.args import ModelArgs
from models.registry import parameter_count
from parallel.plan.params import active_parameters

LABEL_WIDTH = 70  # characters per line of a legend label before it wraps
MAX_LEFT_OUT = 0.05  # share of an axis' points robust_range may leave out
FOLDER_TIME = re.compile(r"(\d{4}-\d{2}-\d{2})/(\d{2})-(\d{2})-(\d{2})")  # outputs/<date>/<time>


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of run_dir/metrics.jsonl, in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def job_label(job_dir: Path) -> str:
    """A job's command-line overrides (`parallel.pp=2 parallel.schedule=gpipe`), or its folder name."""
    overrides = job_dir / ".hydra" / "overrides.yaml"
    listed = list(OmegaConf.load(overrides)) if overrides.is_file() else []
    return " ".join(str(o) for o in listed) or job_dir.name


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def run_time(run_dir: Path) -> str:
    """When the run started: from Hydra's outputs/<date>/<time> folder, else the time Hydra
    wrote .hydra/config.yaml, else the last write of metrics.jsonl."""
    found = FOLDER_TIME.search(run_dir.resolve().as_posix())
    if found:
        return f"started {found.group(1)} {':'.join(found.groups()[1:])}"
    config = run_dir / ".hydra" / "config.yaml"
    source, word = (
        (config, "started") if config.is_file() else (run_dir / "metrics.jsonl", "last logged")
    )
    return f"{word} {datetime.fromtimestamp(source.stat().st_mtime):%Y-%m-%d %H:%M:%S}"


def run_facts(run_dir: Path) -> list[str]:
    """What tells runs apart in a title: the model and its parameters, and the layout."""
    facts, config = [], run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=False)
        assert isinstance(cfg, dict)
        model, p = cfg.get("model", {}), cfg.get("parallel", {})
        known = {f.name for f in fields(ModelArgs)}
        try:
            args = ModelArgs(**{k: v for k, v in model.items() if k in known})
            total, active = parameter_count(args), active_parameters(args)
            count = f"{_count(total)} parameters" + (
                f", {_count(active)} active" if active != total else ""
            )
            facts.append(f"{model.get('name', 'model')} ({count})")
        except (TypeError, ValueError):  # a config from another version: the name alone
            facts.append(str(model.get("name", "model")))
        if p:
            extra = [p["schedule"]] if p["pp"] > 1 else []
            extra += [f"v={p['virtual_stages']}"] if p.get("virtual_stages", 1) > 1 else []
            layout = f"dp={p['dp']} × pp={p['pp']} × tp={p['tp']}"
            extra += [f"ep={p['ep']}"] if p.get("ep", 1) > 1 else []
            facts.append(layout + (f" ({', '.join(extra)})" if extra else ""))
    return facts


def run_title(run_dir: Path) -> str:
    """Two title lines: the model and layout, then when the run started and its folder."""
    named = "" if FOLDER_TIME.search(run_dir.resolve().as_posix()) else f" ({run_dir.name})"
    return f"{', '.join(run_facts(run_dir)) or run_dir.name}\n{run_time(run_dir)}{named}"


def robust_range(values: list[float]) -> tuple[float, float, int]:
    """(low, high, points left out) of `values` without isolated spikes.

    A point is left out (non-finite ones always) when it lies farther beyond the other points
    than they span, i.e. when showing it would more than double the axis; at most
    MAX_LEFT_OUT of the points (at least one) go, and series of fewer than 5 keep all.
    """
    finite = sorted(x for x in values if math.isfinite(x))
    lo, hi, most = 0, len(finite), max(1, int(MAX_LEFT_OUT * len(finite)))
    if len(finite) >= 5:
        for k in range(most, 0, -1):  # spikes above: the top k sit far from the rest
            rest = finite[lo : hi - k]
            if finite[hi - k] - rest[-1] > rest[-1] - rest[0]:
                hi -= k
                break
        for k in range(most, 0, -1):  # dips below
            rest = finite[lo + k : hi]
            if rest[0] - finite[lo + k - 1] > rest[-1] - rest[0]:
                lo += k
                break
    if not finite:
        return 0.0, 1.0, len(values)
    return finite[lo], finite[hi - 1], len(values) - (hi - lo)


def _fit_y(ax: Axes, label: str) -> None:
    """Set the y-axis to the drawn data without isolated spikes: each left out is marked by a
    triangle on the axis' edge, and the label says how many there are."""
    drawn = [
        (line, np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
        for line in ax.get_lines()
    ]
    low, high, left_out = robust_range([y for _, _, ys in drawn for y in ys.tolist()])
    if left_out:
        pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
        ax.set_ylim(low - pad, high + pad)
        for line, xs, ys in drawn:
            off = ~((ys >= low) & (ys <= high))  # NaN too, marked at the top
            for x, below in zip(xs[off].tolist(), (ys[off] < low).tolist()):
                edge, marker = (low - pad, "v") if below else (high + pad, "^")
                ax.plot([x], [edge], marker, color=line.get_color(), clip_on=False)
        points = "point" if left_out == 1 else "points"
        label += f"\n({left_out} outlier {points} off the scale, marked ▲▼)"
    ax.set_ylabel(label)


def _curve(ax: Axes, records: list[dict[str, Any]], key: str, **style: Any) -> None:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if len(points) == 1:  # a line through one point draws nothing
        style["marker"] = "o"
    if points:
        ax.plot(*zip(*points), **style)


def _legend_below(fig: Figure, axes: list[Axes], ncol: int = 3) -> None:
    """One legend for all `axes`, below them and outside, so it covers no data."""
    found = [ax.get_legend_handles_labels() for ax in axes]
    handles = [h for hs, _ in found for h in hs]
    labels = [textwrap.fill(lb, LABEL_WIDTH) for _, lbs in found for lb in lbs]
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(ncol, len(labels)))


def run_figures(run_dir: Path) -> dict[str, Figure]:
    """loss.png (train and validation loss) and throughput.png (tokens/s, MFU) of a run, by file."""
    records = read_metrics(run_dir)
    name = run_title(run_dir)
    loss_fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    _curve(ax, records, "loss", label="train loss")
    _curve(ax, records, "val_loss", label="validation loss", marker="o", linestyle="--")
    ax.set(xlabel="step", title=f"loss: {name}")
    _fit_y(ax, "loss")
    _legend_below(loss_fig, [ax])
    speed_fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    _curve(ax, records, "tokens_per_s", label="tokens/s (all devices)", color="C0")
    ax.set(xlabel="step", title=f"throughput: {name}")
    _fit_y(ax, "tokens/s")
    axes = [ax]
    if any("mfu" in r for r in records):
        mfu = ax.twinx()
        percent = [{**r, "mfu": r["mfu"] * 100} for r in records if "mfu" in r]
        _curve(mfu, percent, "mfu", label="MFU (%)", color="C1", linestyle="--")
        _fit_y(mfu, "MFU (%)")
        axes.append(mfu)
    _legend_below(speed_fig, axes)
    return {"loss.png": loss_fig, "throughput.png": speed_fig}


def _save(fig: Figure, path: Path) -> Path:
    # tight: nothing drawn outside the axes (legend, wrapped labels) is cut at the edge
    title = "\n".join(
        t.get_text() for t in [*fig.texts, *(a.title for a in fig.axes)] if t.get_text()
    )
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Title": title})
    plt.close(fig)
    return path


def plot_run(run_dir: Path) -> list[Path]:
    """loss.png and throughput.png in run_dir."""
    return [_save(fig, run_dir / name) for name, fig in run_figures(run_dir).items()]


def job_dirs(sweep_dir: Path) -> list[Path]:
    """A multirun folder's job folders holding metrics.jsonl, by job number (2 before 10): the
    numbered ones, or any when Hydra's multirun.yaml says the folder is a sweep."""
    sweep = (sweep_dir / "multirun.yaml").is_file()
    jobs = [
        d
        for d in sweep_dir.iterdir()
        if (d / "metrics.jsonl").is_file() and (sweep or d.name.isdigit())
    ]
    return sorted(jobs, key=lambda d: (len(d.name), d.name))


def sweep_figure(sweep_dir: Path) -> Figure:
    """compare.png's figure: loss and tokens/s against step, one curve per job."""
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise ValueError(refusal(sweep_dir))
    fig, (loss_ax, speed_ax) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    for job in jobs:
        records, label = read_metrics(job), f"{job.name}: {job_label(job)}"
        _curve(loss_ax, records, "loss", label=label)
        _curve(speed_ax, records, "tokens_per_s", label=label, marker=".")
    loss_ax.set(xlabel="step", title="loss")
    speed_ax.set(xlabel="step", title="throughput")
    _fit_y(loss_ax, "train loss")
    _fit_y(speed_ax, "tokens/s (all devices)")
    _legend_below(fig, [loss_ax], ncol=2)
    per_job = [run_facts(job) for job in jobs]
    shared = [f for f in per_job[0] if all(f in facts for facts in per_job)]
    fig.suptitle(
        f"sweep {sweep_dir.name} ({len(jobs)} jobs): {', '.join(shared) or 'see the labels'}\n"
        f"{run_time(jobs[0])}"
    )
    return fig


def plot_multirun(sweep_dir: Path) -> Path:
    """compare.png in sweep_dir."""
    return _save(sweep_figure(sweep_dir), sweep_dir / "compare.png")


def refusal(folder: Path) -> str:
    """Why `folder` is neither a run nor a multirun folder, in one line."""
    if not folder.is_dir():
        return f"{folder}: no such folder"
    runs = sorted(d for d in folder.iterdir() if (d / "metrics.jsonl").is_file())
    hint = (
        f"; it holds {len(runs)} run folder(s), e.g. {runs[0]}: plot one of those" if runs else ""
    )
    return (
        f"{folder}: not a run folder (no metrics.jsonl) nor a multirun folder (no multirun.yaml "
        f"and no numbered job folders 0/, 1/, ... with metrics.jsonl){hint}"
    )


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
        print(refusal(run_dir), file=sys.stderr)
        sys.exit(2)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
