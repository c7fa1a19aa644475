"""Fixtures for the launch tests: a real two-node Slurm cluster, and the plain-torchrun run that
every launch path must reproduce loss for loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster, missing_programs

REPO = Path(__file__).resolve().parents[2]

# pp=2 x tp=2 = 4 ranks: on 2 nodes x 2 ranks, pp spans the nodes and tp stays inside one
TRAIN = [
    "model=debug",
    "device=cpu",
    "train.steps=8",
    "train.seq_len=32",
    "train.global_batch_size=8",
    "train.sample_tokens=0",
    "train.log_interval=1",
    "train.val_interval=1000",
    "parallel.pp=2",
    "parallel.tp=2",
    "parallel.microbatches=2",
    "checkpoint.interval=2",
]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Each step's loss from metrics.jsonl (a step logged twice, before and after a restart,
    keeps its last value)."""
    records = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line
    ]
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """TRAIN under plain torchrun on this machine (4 ranks): the losses to reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=4",
            "-m",
            "launcher.train",
            *TRAIN,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return losses_by_step(run_dir)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """munged + slurmctld + slurmd n1, n2 for the session; stopped (by PID) at the end."""
    missing = missing_programs()
    if missing or os.geteuid() != 0:
        reason = (
            f"Slurm tests need Debian's munge slurmctld slurmd slurm-client packages "
            f"(missing: {', '.join(missing)})"
            if missing
            else "Slurm tests run as root"
        )
        if os.environ.get("TRIDIST_REQUIRE_SLURM") == "1":
            pytest.fail(f"{reason}; TRIDIST_REQUIRE_SLURM=1 (CI) requires them")
        pytest.skip(reason)
    cluster = SlurmCluster()
    try:
        cluster.start()
    except Exception:
        logs = cluster.logs()
        cluster.stop()
        pytest.fail(f"the test Slurm cluster did not start:\n{logs}")
    yield cluster
    cluster.stop()
