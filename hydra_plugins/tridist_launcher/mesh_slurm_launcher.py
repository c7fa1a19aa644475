"""`hydra/launcher=submitit_slurm`: hydra-submitit-launcher's Slurm launcher, sized per job.

The stock launcher submits a sweep as one Slurm array whose jobs all get the same nodes and
tasks. A tridist job needs dp*pp*tp ranks, one per submitit task, and that can differ between
jobs of a sweep; so this launcher submits every job on its own with
`nodes = ranks / ranks per node` and `tasks_per_node = ranks per node`, where ranks per node is
`hydra.launcher.tasks_per_node` (set it to the GPUs per node). Every other option is the
plugin's (hydra_plugins/hydra_submitit_launcher/config.py). Inside the job each task becomes
one rank (launcher/slurm.py, export_rank_env_from_slurm); submitit and torchrun never wrap
each other. The class lives under hydra_plugins/ because Hydra instantiates launchers only
from there; `register_mesh_launcher` (called by launcher/train.py's main) gives it the name.

The dependency points launcher -> hydra_plugins, never back: registering the name must follow
Hydra's plugin scan (which re-runs hydra-submitit-launcher's own registration of it), and only
the entry point can order that; so this module imports nothing of tridist and is a leaf.
"""

# no `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in
# sys.modules, and @dataclass cannot resolve string annotations then
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

# what a non-zero rank adds to its overrides (a torchrun rank, launcher/train.py, or a Slurm task
# of a sweep job here): rank 0 alone writes Hydra's files and log
QUIET_RANK_OVERRIDES = [
    "hydra.output_subdir=null",
    "hydra/job_logging=disabled",
    "hydra/hydra_logging=disabled",
]


def job_allocation(dp: int, pp: int, tp: int, ranks_per_node: int, cp: int = 1) -> tuple[int, int]:
    """(nodes, tasks per node) for a dp*pp*cp*tp mesh; a job smaller than a node uses part of one.
    ValueError, worded as launcher/config.py's ConfigError, when the ranks do not fill nodes."""
    world = dp * pp * cp * tp
    if world <= ranks_per_node:
        return 1, world
    if world % ranks_per_node:
        raise ValueError(
            f"config error: parallel.dp={dp}: dp*pp*cp*tp = {world} ranks do not fill whole "
            f"nodes of hydra.launcher.tasks_per_node={ranks_per_node}; use a multiple of it"
        )
    return world // ranks_per_node, ranks_per_node


class MeshSlurmLauncher(SlurmLauncher):
    """One Slurm job per sweep job, with nodes and tasks matching that job's mesh."""

    def __call__(self, sweep_overrides: list[str], *args: Any) -> JobReturn:
        """Run one task of a job (on Slurm); only rank 0 writes Hydra's files and log."""
        import submitit

        if submitit.JobEnvironment().global_rank != 0:
            sweep_overrides = list(sweep_overrides) + QUIET_RANK_OVERRIDES
        return super().__call__(sweep_overrides, *args)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        """Submit every job with its own allocation, then wait for all of them."""
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            job_cfg = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
            par = job_cfg.parallel
            nodes, tasks = job_allocation(
                par.dp, par.pp, par.tp, self.params["tasks_per_node"], cp=par.get("cp", 1)
            )
            executor = self._executor(nodes, tasks)
            print(
                f"job {idx}: {' '.join(overrides)} -> {nodes} node(s) x {tasks} task(s)", flush=True
            )
            jobs.append(
                executor.submit(
                    self,
                    list(overrides),
                    "hydra.sweep.dir",
                    idx,
                    f"job_id_for_{idx}",
                    Singleton.get_state(),
                )
            )
        return [job.results()[0] for job in jobs]  # rank 0's return value

    def _executor(self, nodes: int, tasks_per_node: int) -> Any:
        """A submitit executor with the launcher's options (mapped as the plugin maps them)."""
        import submitit

        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster="slurm",
            folder=self.params["submitit_folder"],
            slurm_max_num_timeout=self.params["max_num_timeout"],
        )
        base = set(BaseQueueConf.__dataclass_fields__)
        params = {
            k if k in base else f"slurm_{k}": v
            for k, v in self.params.items()
            if k not in init_keys
        }
        params.update(nodes=nodes, tasks_per_node=tasks_per_node)
        if params.get("gpus_per_node"):
            params["gpus_per_node"] = tasks_per_node  # one GPU per rank
        executor.update_parameters(**params)
        return executor


@dataclass
class MeshSlurmQueueConf(SlurmQueueConf):
    """The plugin's Slurm options, with this launcher as the target."""

    _target_: str = "hydra_plugins.tridist_launcher.mesh_slurm_launcher.MeshSlurmLauncher"


def register_mesh_launcher() -> None:
    """Make `hydra/launcher=submitit_slurm` this launcher (call before Hydra composes)."""
    # Hydra's plugin scan re-runs the plugin's own registration of this name: scan first
    Plugins.instance()
    ConfigStore.instance().store(
        group="hydra/launcher", name="submitit_slurm", node=MeshSlurmQueueConf, provider="tridist"
    )
