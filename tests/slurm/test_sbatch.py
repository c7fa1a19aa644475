"""slurm/train.sbatch on a real two-node Slurm: the losses of plain torchrun, ranks placed with
tp inside a node, a mesh that does not fit refused, preemption that requeues and resumes, and a
killed worker that torchrun restarts and that resumes."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster
from tests.slurm.conftest import REPO, TRAIN, losses_by_step

# one Slurm cluster per test session: under pytest -n, every Slurm test runs on the same worker
pytestmark = [pytest.mark.xdist_group("slurm"), pytest.mark.long(60)]

TRAIN_STEPS = int(next(o for o in TRAIN if o.startswith("train.steps=")).split("=")[1])


def sbatch(slurm: SlurmCluster, tmp: Path, overrides: list[str], env: str = "") -> str:
    """Submit slurm/train.sbatch on 2 nodes x 2 CPU ranks (output in tmp/slurm-<job>.out); the
    job id. (Not `sbatch --wait`: it polls at growing intervals, up to many seconds late.)"""
    submitted = slurm.run(
        "sbatch",
        "--parsable",
        "--nodes=2",
        f"--output={tmp}/slurm-%j.out",
        f"--export=ALL,RANKS_PER_NODE=2,PYTHON={sys.executable}{env}",
        str(REPO / "slurm" / "train.sbatch"),
        *overrides,
        f"hydra.run.dir={tmp}/run",
        check=False,
    )
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def job_log(tmp: Path) -> str:
    """The job's output (all incarnations: the script appends)."""
    return "\n".join(f.read_text() for f in tmp.glob("slurm-*.out"))


def job_field(slurm: SlurmCluster, job_id: str, name: str) -> str:
    """One field of `scontrol show job`, e.g. JobState."""
    shown = slurm.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
    match = re.search(rf"\b{name}=(\S+)", shown)
    return match.group(1) if match else ""


def wait_for_step(slurm: SlurmCluster, job_id: str, tmp: Path, step: int, deadline: float) -> None:
    """Until rank 0 has logged `step` (the job must still be pending or running)."""
    while not ((tmp / "run" / "metrics.jsonl").is_file() and step in losses_by_step(tmp / "run")):
        assert time.monotonic() < deadline and job_field(slurm, job_id, "JobState") in (
            "PENDING",
            "RUNNING",
        ), job_log(tmp)[-4000:]
        time.sleep(0.2)


def wait_until_done(slurm: SlurmCluster, job_id: str, tmp: Path, deadline: float) -> str:
    """The job's final state, once it has one."""
    while (state := job_field(slurm, job_id, "JobState")) not in (
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
    ):
        assert time.monotonic() < deadline, job_log(tmp)[-4000:]
        time.sleep(0.5)
    return state


def worker_pid(job_id: str, rank: int) -> int:
    """The training process of `rank` in this Slurm job (all nodes run on this host)."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone
            continue
        if {f"SLURM_JOB_ID={job_id}".encode(), f"RANK={rank}".encode()} <= set(environ) and any(
            v.startswith(b"TORCHELASTIC_RUN_ID=") for v in environ
        ):
            return int(proc.name)
    raise AssertionError(f"no rank {rank} of job {job_id} running")


def test_two_nodes_equal_plain_torchrun(
    slurm: SlurmCluster, reference: dict[int, float], tmp_path: Path
) -> None:
    # LOGLEVEL=INFO: torchrun logs which global ranks each node's agent got
    job_id = sbatch(slurm, tmp_path, TRAIN, env=",LOGLEVEL=INFO")
    state = wait_until_done(slurm, job_id, tmp_path, time.monotonic() + 300)
    log = job_log(tmp_path)
    assert state == "COMPLETED", log[-4000:]
    assert losses_by_step(tmp_path / "run") == reference  # bitwise: same layout, same arithmetic
    # srun --label prefixes each line with its task, one task per node
    placed = {
        task: set(map(int, ranks.split(", ")))
        for task, ranks in re.findall(r"^(\d+): .*global_ranks=\[([\d, ]+)\]", log, re.M)
    }
    assert sorted(map(sorted, placed.values())) == [[0, 1], [2, 3]], placed
    # mesh (dp, pp, tp) = (1, 2, 2): tp pairs {0,1}, {2,3} inside a node; pp pairs {0,2}, {1,3} across
    for node_ranks in placed.values():
        assert {0, 2} - node_ranks and {1, 3} - node_ranks


def test_mesh_that_does_not_fit_is_refused_before_start(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    job_id = sbatch(slurm, tmp_path, TRAIN + ["parallel.tp=1"])  # 2 ranks on 4
    state = wait_until_done(slurm, job_id, tmp_path, time.monotonic() + 120)
    log = job_log(tmp_path)
    assert state == "FAILED" and job_field(slurm, job_id, "ExitCode") == "2:0", log
    assert (
        "config error: parallel.dp=1: dp*pp*tp = 1*2*1 = 2 ranks, but the allocation has 2 nodes x 2 "
        "ranks per node = 4; set parallel.dp=2 or submit with --nodes=1"
    ) in log, log
    assert "rendezvous" not in log  # no node started torchrun


def test_preempted_job_checkpoints_requeues_and_resumes(
    slurm: SlurmCluster, reference: dict[int, float], tmp_path: Path
) -> None:
    job_id = sbatch(slurm, tmp_path, TRAIN)
    deadline = time.monotonic() + 300
    wait_for_step(slurm, job_id, tmp_path, 3, deadline)
    # what --signal=USR1@120 does before the time limit: USR1 to every process of the job step
    slurm.run("scancel", "--signal=USR1", job_id)
    state = wait_until_done(slurm, job_id, tmp_path, deadline)
    log = job_log(tmp_path)
    assert state == "COMPLETED" and job_field(slurm, job_id, "Restarts") == "1", log[-4000:]
    stopped = re.search(r"stopped by a signal after step (\d+)", log)
    assert stopped and f"requeued Slurm job {job_id}" in log, log[-4000:]
    step = int(stopped.group(1))
    assert step < TRAIN_STEPS and f"at step {step}" in log and "resumed from" in log, log[-4000:]
    assert losses_by_step(tmp_path / "run") == reference  # every step, the final one included


def test_killed_worker_restarts_and_resumes(
    slurm: SlurmCluster, reference: dict[int, float], tmp_path: Path
) -> None:
    job_id = sbatch(slurm, tmp_path, TRAIN, env=",MAX_RESTARTS=1")
    deadline = time.monotonic() + 300
    wait_for_step(slurm, job_id, tmp_path, 3, deadline)  # the step-2 checkpoint is committed
    os.kill(worker_pid(job_id, rank=3), signal.SIGKILL)  # a crash on the second node
    state = wait_until_done(slurm, job_id, tmp_path, deadline)
    log = job_log(tmp_path)
    # torchrun restarted both nodes' groups inside the allocation: no Slurm requeue
    assert state == "COMPLETED" and job_field(slurm, job_id, "Restarts") == "0", log[-4000:]
    assert "resumed from" in log, log[-4000:]  # only a restarted group finds a checkpoint
    assert losses_by_step(tmp_path / "run") == reference
