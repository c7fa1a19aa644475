"""Every command in the README's fenced bash blocks runs as written, sizes shrunk, in README order
in one fresh folder (so the checkpoint, export and plot commands find what earlier ones wrote).

Not run here: the set-up and test commands (`.ci/run` runs exactly those), and the Slurm ones
(`sbatch`, `hydra/launcher=submitit_slurm`), which tests/slurm runs on a real two-node cluster.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.sweep_summary import summarize_sweep

REPO = Path(__file__).resolve().parents[1]
# as written, only shorter and smaller (a quarter of the tokens per step, one eval batch)
SHRINK = {
    "train.steps": "2",
    "train.sample_tokens": "8",
    "train.seq_len": "64",
    "train.global_batch_size": "8",
    "train.val_batches": "1",
}
ELSEWHERE = ("pip install", "python -m pytest", "sbatch ", "submitit_slurm")
# the lines of a failed command's stderr that say why, and how many lines after each to keep:
# faulthandler's dump of every thread's stack follows "Fatal Python error" (PYTHONFAULTHANDLER)
WHY = {"Fatal Python error": 40, "terminate called": 3, "Traceback": 3, "Error": 3}
WHY_MAX_LINES = 200


def readme_commands() -> list[str]:
    """The README's bash commands, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _shrunk(argv: list[str]) -> list[str]:
    if "launcher.train" not in argv and "launcher.ft_local" not in argv:
        return argv
    kept = [a for a in argv if a.split("=")[0] not in SHRINK]
    return kept + [f"{k}={v}" for k, v in SHRINK.items()]


def why_it_failed(stderr: str) -> str:
    """The lines of a whole stderr that say why a command failed (an abort's message, errors,
    tracebacks' starts) with the few after each, in order, gaps marked `...`; empty if none."""
    lines = stderr.splitlines()
    keep: set[int] = set()
    for i, line in enumerate(lines):
        after = max((n for word, n in WHY.items() if word in line), default=-1)
        keep.update(range(i, min(len(lines), i + after + 1)))
    out: list[str] = []
    for i in sorted(keep)[:WHY_MAX_LINES]:
        if out and i - 1 not in keep:
            out.append("...")
        out.append(lines[i])
    return "\n".join(out)


def test_why_a_command_failed_keeps_the_abort_and_the_errors_not_the_noise() -> None:
    stderr = "\n".join(
        ["W1202 warning", "terminate called without an active exception", "a", "b", "c", "d"]
        + [f"noise {i}" for i in range(50)]
        + ["Traceback (most recent call last):", '  File "x.py"', "ValueError: bad"]
    )
    why = why_it_failed(stderr).splitlines()
    assert why[:4] == ["terminate called without an active exception", "a", "b", "c"]
    assert why[4] == "..." and why[5].startswith("Traceback") and why[-1] == "ValueError: bad"
    assert not any(line.startswith(("noise", "W1202")) for line in why)
    assert why_it_failed("all went well") == ""


def _placeholders(command: str, folder: Path) -> str:
    """The README's example folders, as this run made them."""
    runs = sorted(p.parent for p in (folder / "outputs").glob("*/*/metrics.jsonl"))
    sweeps = sorted(p for p in (folder / "multirun").glob("*/*") if p.is_dir())
    if runs:
        command = command.replace("outputs/2026-11-22/14-14-20", str(runs[0]))
    if sweeps:
        command = command.replace("multirun/2026-11-22/15-00-00", str(sweeps[-1]))
    return command.replace("step-00000100", f"step-{int(SHRINK['train.steps']):08d}")


def test_readme_lists_the_commands_this_test_runs() -> None:
    commands = readme_commands()
    assert any(c.startswith("torchrun") for c in commands) and any(
        "launcher.plan" in c for c in commands
    )
    assert sum(not c.startswith(ELSEWHERE) and "submitit_slurm" not in c for c in commands) >= 15


@pytest.mark.long(480)
def test_every_readme_command_runs_as_written(tmp_path: Path) -> None:
    failures = []
    for command in readme_commands():
        if any(c in command for c in ELSEWHERE):
            continue
        argv = _shrunk(shlex.split(_placeholders(command, tmp_path)))
        if argv[0] == "python":
            argv[0] = sys.executable
        elif argv[0] == "torchrun":
            argv[:1] = [sys.executable, "-m", "torch.distributed.run"]
        start = time.perf_counter()
        result = subprocess.run(
            argv,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # a crash dumps every thread's stack
        )
        print(f"{time.perf_counter() - start:6.1f} s  {command}")  # pytest -s: where CI time goes
        ok = result.returncode == 0 or (
            "launcher.plan" in command and "does not fit" in result.stdout
        )
        if not ok:
            failures.append(
                f"{command}\n  -> exit {result.returncode}; why, from the whole stderr:\n"
                f"{why_it_failed(result.stderr)}\n  -> its end:\n{result.stderr.strip()[-800:]}"
            )
    assert not failures, "\n".join(failures)
    # the sweep ran each of its 4 jobs as its own worker group and summarized them
    (sweep,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    rows = summarize_sweep(sweep)
    assert [r.job for r in rows] == ["0", "1", "2", "3"] and all(r.steps == 2 for r in rows), rows
    assert len({round(r.loss, 4) for r in rows}) == 1, rows  # schedule and m reorder work only
    assert (
        "| 3 | parallel.schedule=interleaved_1f1b parallel.microbatches=8 | 2 |"
        in (sweep / "summary.md").read_text()
    )
