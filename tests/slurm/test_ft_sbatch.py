"""slurm/ft.sbatch on a real two-node Slurm: a lighthouse job step on the head node and one job
step per replica group (one node each), training together to the end."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster
from tests.slurm.conftest import REPO
from tests.slurm.test_sbatch import job_field, job_log, wait_until_done

pytest.importorskip("torchft")
pytestmark = [pytest.mark.xdist_group("slurm"), pytest.mark.long(40)]

FT_TRAIN = [
    "model=debug",
    "device=cpu",
    "train.steps=6",
    "train.seq_len=32",
    "train.global_batch_size=8",
    "train.sample_tokens=0",
    "train.log_interval=1",
    "train.val_interval=1000",
    "parallel.dp=2",
    "parallel.dp_replicate=2",
    "fault_tolerance.min_replicas=2",
]


def test_one_job_step_per_replica_group(slurm: SlurmCluster, tmp_path: Path) -> None:
    submitted = slurm.run(
        "sbatch",
        "--parsable",
        "--nodes=2",
        f"--output={tmp_path}/slurm-%j.out",
        # the job runs in tmp_path (its outputs/ land there); tridist is installed, not found by cwd
        f"--export=ALL,RANKS_PER_NODE=1,PYTHON={sys.executable},TRIDIST_DIR={tmp_path}",
        str(REPO / "slurm" / "ft.sbatch"),
        *FT_TRAIN,
        check=False,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    state = wait_until_done(slurm, job_id, tmp_path, time.monotonic() + 300)
    assert state == "COMPLETED", (job_field(slurm, job_id, "ExitCode"), job_log(tmp_path)[-4000:])
    runs = sorted(tmp_path.glob("outputs/*/run-g*"))
    assert [r.name[:6] for r in runs] == ["run-g0", "run-g1"], runs
    norms = []
    for run in runs:
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, 7)), records
        norms.append([r["grad_norm"] for r in records])
        assert (run / "checkpoints" / f"replica-{run.name[5]}").is_dir()
    assert norms[0] == norms[1]  # one averaged gradient: the groups trained as one run
