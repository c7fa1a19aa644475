"""launcher.plot: curves for a run folder, one comparison for a multirun folder, titles from the
run's resolved config, legends outside the data, y-axes without isolated spikes, and a clear
refusal of any other folder."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure
from PIL import Image

from launcher.plot import (
    LABEL_WIDTH,
    job_dirs,
    job_label,
    main,
    robust_range,
    run_figures,
    sweep_figure,
)

CONFIG = """model:
  name: tiny
  dim: 256
  n_layers: 4
  n_heads: 8
  n_kv_heads: 4
  vocab_size: 256
  multiple_of: 64
parallel:
  dp: 2
  pp: 2
  tp: 1
  virtual_stages: 2
  schedule: interleaved_1f1b
"""


def _write_run(
    run_dir: Path,
    speed: float,
    overrides: list[str] | None = None,
    steps: range = range(10, 110, 10),
    config: str | None = None,
) -> list[dict[str, float]]:
    run_dir.mkdir(parents=True)
    records = [
        {"step": s, "loss": 5 * math.exp(-s / 20), "tokens_per_s": speed + s, "mfu": 0.01}
        for s in steps
    ]
    records[-1]["val_loss"] = 1.0
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / ".hydra").mkdir()
    if overrides is not None:
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if config is not None:
        (run_dir / ".hydra" / "config.yaml").write_text(config)
    return records


def _close(figures: dict[str, Figure]) -> None:
    for fig in figures.values():
        plt.close(fig)


def _png_shape(path: Path) -> tuple[int, ...]:
    return matplotlib.image.imread(path).shape


def test_run_folder_gets_loss_and_throughput(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_run(tmp_path / "run", 1000.0)
    main([str(tmp_path / "run")])
    printed = capsys.readouterr().out.split()
    for name in ("loss.png", "throughput.png"):
        height, width, _ = _png_shape(tmp_path / "run" / name)
        assert width > 400 and height > 200, name
        assert str(tmp_path / "run" / name) in printed


def test_multirun_folder_gets_one_comparison(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for job, pp in enumerate((1, 2, 4)):
        _write_run(sweep / str(job), 1000.0 * (job + 1), [f"parallel.pp={pp}", "train.steps=100"])
    (sweep / "multirun.yaml").write_text("{}\n")
    assert [d.name for d in job_dirs(sweep)] == ["0", "1", "2"]
    assert job_label(sweep / "1") == "parallel.pp=2 train.steps=100"
    main([str(sweep)])
    height, width, _ = _png_shape(sweep / "compare.png")
    assert width > 800 and height > 300
    assert not (sweep / "loss.png").exists()


def test_a_folder_without_metrics_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err


def test_titles_name_the_model_the_layout_and_the_time(tmp_path: Path) -> None:
    run = tmp_path / "outputs" / "2026-12-01" / "09-35-11"  # Hydra's outputs/<date>/<time>
    _write_run(run, 1000.0, config=CONFIG)
    figures = run_figures(run)
    for name, fig in figures.items():
        title = fig.axes[0].get_title()
        assert title.startswith(("loss: tiny (", "throughput: tiny (")), (name, title)
        assert "M parameters)" in title, title  # the family's parameter_count, 3.08M
        assert "dp=2 × pp=2 × tp=1 (interleaved_1f1b, v=2)" in title, title
        assert "started 2026-12-01 09:35:11" in title, title
    _close(figures)
    main([str(run)])  # the PNG carries the title too
    assert "dp=2 × pp=2 × tp=1" in Image.open(run / "loss.png").text["Title"]


def test_a_run_without_a_dated_folder_is_timed_by_its_config(tmp_path: Path) -> None:
    run = tmp_path / "outputs" / "2026-12-01" / "run-95870bc4"  # torchrun's: no time of day
    _write_run(run, 1000.0, config=CONFIG)
    figures = run_figures(run)
    title = figures["loss.png"].axes[0].get_title()
    assert re.search(r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(run-95870bc4\)", title), title
    _close(figures)


def test_legends_sit_outside_the_axes(tmp_path: Path) -> None:
    _write_run(tmp_path / "run", 1000.0, config=CONFIG)
    figures = run_figures(tmp_path / "run")
    for name, fig in figures.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes), name
        assert [t.get_text() for t in legend.get_texts()][:1] in (
            ["train loss"],
            ["tokens/s (all devices)"],
        )
    _close(figures)


def test_an_end_spike_is_left_off_the_y_axis_and_said_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    records = _write_run(run, 1000.0, steps=range(10, 410, 10))
    records[-1]["loss"] = 1e4  # diverged at the last logged step
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = run_figures(run)
    ax = figures["loss.png"].axes[0]
    assert ax.get_ylim()[1] < 10, ax.get_ylim()  # the curve's range, not the spike's
    assert "1 outlier point off the scale" in ax.get_ylabel(), ax.get_ylabel()
    speed = figures["throughput.png"].axes[0]
    assert "outlier" not in speed.get_ylabel()  # a smooth series keeps every point
    _close(figures)


def test_robust_range_leaves_out_only_isolated_spikes() -> None:
    smooth = [5 * math.exp(-s / 20) for s in range(10, 110, 10)]
    assert robust_range(smooth) == (min(smooth), max(smooth), 0)
    spiky = [2.0 + 0.01 * i for i in range(40)] + [500.0, 501.0]  # two points far above
    assert robust_range(spiky) == (2.0, 2.39, 2)
    slow_start = [150.0] + [2000.0 + i for i in range(30)]  # a first step that compiled
    assert robust_range(slow_start) == (2000.0, 2029.0, 1)
    assert robust_range([1.0, float("nan"), 2.0])[2] == 1
    assert robust_range([1.0, 100.0, 2.0]) == (1.0, 100.0, 0)  # too few points to judge


def test_a_sweep_of_one_point_jobs_still_draws_its_loss(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for job, pp in enumerate((1, 2)):
        _write_run(
            sweep / str(job), 1000.0, [f"parallel.pp={pp}"], steps=range(1, 2), config=CONFIG
        )
    fig = sweep_figure(sweep)
    loss_ax = fig.axes[0]
    lines = loss_ax.get_lines()
    assert len(lines) == 2 and all(len(line.get_xdata()) == 1 for line in lines)
    assert all(line.get_marker() == "o" for line in lines)  # a point, not an invisible line
    assert fig.get_suptitle().startswith("sweep sweep (2 jobs): tiny ("), fig.get_suptitle()
    plt.close(fig)


def test_long_sweep_labels_wrap_inside_the_picture(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    long = [f"parallel.option_{i}=value_{i}" for i in range(8)]
    for job in range(2):
        _write_run(sweep / str(job), 1000.0, long + [f"job={job}"])
    fig = sweep_figure(sweep)
    fig.canvas.draw()
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert all(len(line) <= LABEL_WIDTH for t in texts for line in t.splitlines()), texts
    box, width = legend.get_window_extent(), fig.bbox.width
    assert 0 <= box.x0 and box.x1 <= width, (box, width)
    plt.close(fig)


def test_a_folder_of_runs_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = tmp_path / "outputs"  # what `plot outputs/` sees: runs, not a sweep
    _write_run(outputs / "run-abc", 1000.0)
    (outputs / "2026-12-01").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(outputs)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{outputs}: not a run folder (no metrics.jsonl) nor a multirun"), err
    assert str(outputs / "run-abc") in err and not (outputs / "compare.png").exists()


def test_a_moe_runs_title_names_its_active_parameters_and_ep(tmp_path: Path) -> None:
    from launcher.plot import run_facts

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "model:\n  name: qwen3_moe_debug\n  family: qwen3_moe\n  dim: 64\n  n_layers: 4\n"
        "  n_heads: 4\n  n_kv_heads: 2\n  head_size: 32\n  n_experts: 8\n"
        "  experts_per_token: 2\n  moe_ffn_dim: 32\n"
        "parallel:\n  dp: 4\n  pp: 1\n  tp: 1\n  ep: 2\n  schedule: 1f1b\n"
    )
    model, layout = run_facts(tmp_path)
    assert model == "qwen3_moe_debug (331K parameters, 183K active)", model
    assert layout == "dp=4 × pp=1 × tp=1 (ep=2)", layout
