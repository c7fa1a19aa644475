"""Through the real entry point: a run stopped by a signal, then resumed, equals an uninterrupted one.

`python -m launcher.train` is started as users start it; SIGUSR1 (Slurm's preemption warning)
or SIGTERM arrives mid-run; the trainer finishes the step, saves, exits; `train.resume=auto`
continues. Losses are compared bitwise (JSON keeps every bit of a float).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
STEPS = 10
BASE = [
    "model=debug",
    f"train.steps={STEPS}",
    "train.seq_len=32",
    "train.global_batch_size=8",
    "train.log_interval=1",
    "train.val_interval=1000",
    "train.sample_tokens=0",
    "device=cpu",
]


def _train(
    tmp: Path,
    name: str,
    overrides: list[str],
    stop: signal.Signals | None = None,
    stop_after_step: int = 2,
) -> tuple[int, str, list[dict]]:
    """Run one training process; optionally signal it once it has logged `stop_after_step`."""
    run_dir = tmp / name
    cmd = [sys.executable, "-m", "launcher.train", *BASE, *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = []
    for line in proc.stdout:
        out.append(line)
        if stop is not None and line.startswith(f"step={stop_after_step} "):
            proc.send_signal(stop)
            stop = None
    code = proc.wait(timeout=300)
    log = run_dir / "metrics.jsonl"
    metrics = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    return code, "".join(out), metrics


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    tmp = tmp_path_factory.mktemp("straight")
    code, out, metrics = _train(tmp, "run", [f"checkpoint.dir={tmp / 'ckpt'}"])
    assert code == 0, out
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    return [m["loss"] for m in metrics]


@pytest.mark.parametrize(
    ("stop", "extra"),
    [
        (signal.SIGUSR1, []),
        (
            signal.SIGTERM,
            ["checkpoint.async_save=true", "checkpoint.interval=1", "checkpoint.keep=2"],
        ),
    ],
    ids=["usr1-sync", "term-async"],
)
def test_stopped_then_resumed_equals_uninterrupted(
    tmp_path: Path, uninterrupted: list[float], stop: signal.Signals, extra: list[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    overrides = [f"checkpoint.dir={ckpt}", *extra]
    code, out, first = _train(tmp_path, "first", overrides, stop=stop)
    assert code == 0, out
    stopped_at = first[-1]["step"]
    assert f"stopped by a signal after step {stopped_at}" in out, out
    assert stopped_at < STEPS, "the signal came too late to test anything"
    assert (ckpt / "latest").read_text().strip() == f"step-{stopped_at:08d}"

    code, out, second = _train(tmp_path, "second", [*overrides, "train.resume=auto"])
    assert code == 0, out
    assert f"at step {stopped_at}" in out and "resumed from" in out, out
    assert [m["step"] for m in second] == list(range(stopped_at + 1, STEPS + 1))
    assert [m["loss"] for m in first + second] == uninterrupted  # bitwise
    kept = sorted(p.name for p in ckpt.glob("step-*"))
    if "checkpoint.keep=2" in extra:
        assert kept == [f"step-{STEPS - 1:08d}", f"step-{STEPS:08d}"]
    else:
        assert kept == [f"step-{stopped_at:08d}", f"step-{STEPS:08d}"]


def test_corrupt_resume_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    code, out, _ = _train(tmp_path, "first", [f"checkpoint.dir={ckpt}", "train.steps=2"])
    assert code == 0, out
    shard = next((ckpt / "step-00000002" / "model").glob("*.safetensors"))
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        f.write(b"\x00" * 32)
    code, out, _ = _train(tmp_path, "second", [f"checkpoint.dir={ckpt}", "train.resume=auto"])
    assert code == 1 and "checkpoint error" in out and shard.name in out and "corrupt" in out, out
