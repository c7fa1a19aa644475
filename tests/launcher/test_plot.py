"""launcher.plot: curves for a run folder, one comparison for a multirun folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from launcher.plot import job_dirs, job_label, main


def _write_run(run_dir: Path, speed: float, overrides: list[str] | None = None) -> None:
    run_dir.mkdir(parents=True)
    records = [
        {"step": s, "loss": 5 * math.exp(-s / 20), "tokens_per_s": speed + s, "mfu": 0.01}
        for s in range(10, 110, 10)
    ]
    records[-1]["val_loss"] = 1.0
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if overrides is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


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
