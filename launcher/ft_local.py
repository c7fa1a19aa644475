"""`python -m launcher.ft_local [overrides]`: a fault-tolerant run on this machine, one torchrun
per replica group, all meeting at a lighthouse this process runs.

parallel.dp_replicate says how many groups; each gets dp/dp_replicate x pp x cp x tp ranks,
`fault_tolerance.replica_id=<i>` and `--max-restarts` (a crashed group is restarted by its
torchrun, heals from a live group and rejoins; the others keep training). The config is
checked (exit 2, one line) before any group starts. Exit code: the worst group's.
"""

from __future__ import annotations

import os
import subprocess
import sys

from launcher.config import ConfigError
from launcher.errors import exit_config_error
from launcher.run.compose import compose_config
from launcher.run.fault_tolerance import LIGHTHOUSE_ENV, quiet_torchft
from parallel.fault_tolerance import start_lighthouse

MAX_RESTARTS = 3


def group_command(overrides: list[str], replica_id: int, nproc: int) -> list[str]:
    """The torchrun command line of one replica group (an argument list: no shell)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={MAX_RESTARTS}",
        "-m",
        "launcher.train",
        *overrides,
        "fault_tolerance.enable=true",
        f"fault_tolerance.replica_id={replica_id}",
    ]


def main(overrides: list[str]) -> int:
    """Start the lighthouse, check the config against it, run every group; the worst exit code."""
    try:
        cfg = compose_config(overrides)
        par, ft = cfg.parallel, cfg.fault_tolerance
        groups = max(1, par.dp_replicate)
        quiet_torchft()  # before the lighthouse starts; the groups inherit it
        lighthouse = start_lighthouse("[::]:0", min_replicas=ft.min_replicas)
        address = lighthouse.address()
        os.environ[LIGHTHOUSE_ENV] = address
        nproc = par.world_size // groups
        compose_config([*overrides, "fault_tolerance.enable=true"], world_size=nproc)
    except ConfigError as err:
        exit_config_error(err)
    print(f"ft_local: lighthouse {address}; {groups} replica groups of {nproc} ranks", flush=True)
    # restarted torchrun worker groups hang in init_process_group without it (pytorch#135712)
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    procs = [subprocess.Popen(group_command(overrides, i, nproc), env=env) for i in range(groups)]
    try:
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        lighthouse.shutdown()
    return max(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
