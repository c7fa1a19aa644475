"""A Hydra multirun through hydra/launcher=submitit_slurm on a real two-node Slurm: every job is
its own Slurm job sized to its mesh, each task one rank, and the sweep summary lists them all."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydra_plugins.tridist_launcher.mesh_slurm_launcher import job_allocation
from launcher.sweep_summary import summarize_sweep
from tests.slurm.cluster import SlurmCluster
from tests.slurm.conftest import REPO

# one Slurm cluster per test session: under pytest -n, every Slurm test runs on the same worker
pytestmark = [pytest.mark.xdist_group("slurm"), pytest.mark.long(60)]


def test_each_job_gets_the_nodes_its_mesh_needs() -> None:
    assert job_allocation(dp=1, pp=1, tp=1, ranks_per_node=8) == (1, 1)  # part of one node
    assert job_allocation(dp=2, pp=2, tp=2, ranks_per_node=8) == (1, 8)
    assert job_allocation(dp=4, pp=2, tp=2, ranks_per_node=8) == (2, 8)
    with pytest.raises(ValueError, match="config error: parallel.dp=3: .*tasks_per_node=8"):
        job_allocation(dp=3, pp=2, tp=2, ranks_per_node=8)  # 12 ranks: not whole nodes


def test_sweep_through_submitit_completes_every_job(slurm: SlurmCluster, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # one rank per node: the dp=2 job spans both nodes (2 nodes x 1 task)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.train",
            "-m",
            "hydra/launcher=submitit_slurm",
            "hydra.launcher.tasks_per_node=1",
            "hydra.launcher.timeout_min=10",
            "parallel.dp=1,2",
            "model=debug",
            "device=cpu",
            "train.steps=4",
            "train.seq_len=32",
            "train.global_batch_size=8",
            "train.sample_tokens=0",
            "train.log_interval=1",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        env=slurm.env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = summarize_sweep(sweep)
    assert [[o for o in r.overrides if o.startswith("parallel.dp=")] for r in rows] == [
        ["parallel.dp=1"],
        ["parallel.dp=2"],
    ]
    assert all(r.steps == 4 and r.loss is not None and r.tokens_per_s for r in rows), rows
    torch.testing.assert_close(
        rows[1].loss, rows[0].loss, rtol=1e-5, atol=0
    )  # dp=2 means one group
    assert "| parallel.dp=2 | 4 |" in (sweep / "summary.md").read_text()
    shapes = {}
    for folder in (
        f for f in (sweep / ".submitit").iterdir() if f.name.isdigit()
    ):  # one per Slurm job
        shown = slurm.run("scontrol", "show", "job", "-o", folder.name).stdout
        shapes[folder.name] = tuple(
            re.search(rf"\b{k}=(\d+)", shown).group(1) for k in ("NumNodes", "NumTasks")
        )
    assert sorted(shapes.values()) == [("1", "1"), ("2", "2")], shapes
