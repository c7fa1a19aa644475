"""What training does differently under Slurm: fit the mesh to the allocation, find the head
node, make one rank of each submitit task, and requeue the job after a preemption checkpoint.

`python -m launcher.slurm --nodes N --ranks-per-node R [overrides]` is the check
slurm/train.sbatch runs before any node starts torchrun (exit code 2 and one line if the mesh
does not fit).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from launcher.config import Config, ConfigError
from launcher.errors import exit_config_error
from launcher.run.compose import compose_config
from launcher.validate import validate


def check_fits_allocation(cfg: Config, nodes: int, ranks_per_node: int) -> None:
    """dp*pp*cp*tp must equal nodes x ranks per node, and a TP group must stay inside one node."""
    par = cfg.parallel
    # fault tolerance: the allocation checked is one replica group's (each its own job step)
    layout = par.world_size // (par.dp_replicate if cfg.fault_tolerance.enable else 1)
    allocated = nodes * ranks_per_node
    if layout != allocated:
        other = allocated // (par.pp * par.cp * par.tp)
        fix = (
            f"set parallel.dp={other}"
            if other >= 1 and other * par.pp * par.cp * par.tp == allocated
            else "change parallel.dp/pp/tp"
        )
        if layout % ranks_per_node == 0:
            fix += f" or submit with --nodes={layout // ranks_per_node}"
        raise ConfigError(
            "parallel.dp",
            par.dp,
            f"{par.layout_product()} ranks, but the allocation has "
            f"{nodes} nodes x {ranks_per_node} ranks per node = {allocated}; {fix}",
        )
    validate(cfg, allocated, ranks_per_node)  # everything else, tp inside a node included


def head_node_address(job_nodelist: str) -> str:
    """The address of the job's first node: its NodeAddr in Slurm (the name if Slurm has none)."""
    names = subprocess.run(
        ["scontrol", "show", "hostnames", job_nodelist], capture_output=True, text=True, check=True
    ).stdout.split()
    node = subprocess.run(["scontrol", "show", "node", names[0]], capture_output=True, text=True)
    match = re.search(r"NodeAddr=(\S+)", node.stdout)
    return match.group(1) if match else names[0]


def is_submitit_task() -> bool:
    """True in a task that submitit started on Slurm (each such task is one rank)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "RANK" not in os.environ


def export_rank_env_from_slurm() -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT for init_process_group
    from the Slurm task this process is (submitit's own helper; the head node by its NodeAddr)."""
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    env.master_addr = head_node_address(os.environ["SLURM_JOB_NODELIST"])
    env.export(set_cuda_visible_devices=False)  # resolve_device picks the GPU by LOCAL_RANK


def requeue_if_slurm() -> bool:
    """After a stop-signal checkpoint: rank 0 of a running Slurm job asks Slurm to requeue it.

    Returns True when requeued (Slurm then ends every process of the job and starts it again
    later; it resumes with train.resume=auto). A job Slurm is already ending (scancel, time
    limit, Slurm's own preemption requeue) is left alone: a requeue would undo a scancel."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None or int(os.environ.get("RANK", "0")) != 0:
        return False
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True
    )
    state = m.group(1) if (m := re.search(r"JobState=(\S+)", shown.stdout)) else "unknown"
    if state != "RUNNING":
        print(f"Slurm job {job_id} is {state}: not requeued", flush=True)
        return False
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        print(
            f"scontrol requeue {job_id} failed: {result.stderr.strip()}; resubmit the job with "
            "train.resume=auto to continue",
            file=sys.stderr,
            flush=True,
        )
        return False
    print(
        f"requeued Slurm job {job_id}; it resumes from the checkpoint when it starts again",
        flush=True,
    )
    return True


def main(argv: list[str] | None = None) -> int:
    """Check the mesh the overrides ask for against the allocation; 0 if it fits, 2 if not."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--ranks-per-node", type=int, required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        check_fits_allocation(compose_config(args.overrides), args.nodes, args.ranks_per_node)
    except ConfigError as err:
        exit_config_error(err)
    except Exception as err:  # an unknown config group or key: Hydra's own message, one line
        print(f"config error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
