"""`python -m launcher.train [overrides]`: the Hydra entry point, alone or under torchrun.

Config is validated (exit code 2, one line) before any process group starts. Under torchrun
every rank runs this; all agree on one run directory and only rank 0 writes shared files.
The run itself is the library in launcher/run/; nothing imports this module.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import hydra
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from launcher.config import ConfigError, load_config, register_schema
from launcher.errors import exit_config_error
from launcher.preflight import check_fits_machine
from launcher.run.build import load_data
from launcher.run.compose import CONF_DIR, check_group_choices, check_keys
from launcher.run.loop import NonFiniteError, train
from launcher.run.multirun import run_worker_group
from launcher.slurm import export_rank_env_from_slurm, is_submitit_task, requeue_if_slurm
from launcher.validate import validate
from parallel.checkpoint.state import CheckpointError
from parallel.fault_tolerance import LighthouseLost

__all__ = ["CONF_DIR", "main"]


def _run_dir_name() -> str:
    """One name all ranks of a job agree on: the rendezvous id under torchrun, else the time."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":  # ranks start seconds apart: the day, not the time, is shared
        return f"{datetime.now():%Y-%m-%d}/run-{run_id[:8]}"
    return datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


# Registered at import, not in main(): a submitit sweep job unpickles _hydra_main in a fresh
# process and resolves hydra.run.dir there. Cached: Hydra copies the cache into every sweep
# job's config, so all jobs of a multirun resolve the same multirun/<time> folder.
OmegaConf.register_new_resolver("run_dir_name", _run_dir_name, replace=True, use_cache=True)
register_schema()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(raw: DictConfig) -> None:
    if is_submitit_task():  # hydra/launcher=submitit_slurm: this Slurm task is one rank
        export_rank_env_from_slurm()
    # a local sweep job (`-m`, not under torchrun) starts its own ranks: launcher/run/multirun.py
    own_group = HydraConfig.get().mode == RunMode.MULTIRUN and "RANK" not in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in os.environ else None
    try:
        cfg = load_config(raw)
        if own_group:
            world_size = per_node = cfg.parallel.world_size
        validate(cfg, world_size, per_node)
        check_fits_machine(cfg, per_node or world_size)
        tokens = load_data(cfg)
    except ConfigError as err:
        _remove_unstarted(Path(HydraConfig.get().runtime.output_dir))
        exit_config_error(err)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if own_group and world_size > 1:
        run_worker_group(cfg, run_dir)
        return
    try:
        summary = train(cfg, tokens, run_dir)
    except ConfigError as err:  # found after start-up, e.g. a model.init_from that does not fit
        _remove_unstarted(run_dir)
        exit_config_error(err)
    except CheckpointError as err:  # a checkpoint to resume from that cannot be loaded
        _exit_run_error("checkpoint error", err)
    except (NonFiniteError, LighthouseLost) as err:  # NaN/inf never applied; no more quorum
        _exit_run_error("training stopped", err)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary.preempted:
        # exit code 0: a requested stop with its checkpoint saved, which torchrun must not restart
        requeue_if_slurm()


def _remove_unstarted(run_dir: Path) -> None:
    """Delete the folder Hydra made for a run refused before its first step, so failed attempts
    leave no outputs: only when it holds nothing but Hydra's .hydra/ and logs (rank 0 alone)."""
    if int(os.environ.get("RANK", "0")) != 0 or not run_dir.is_dir():
        return
    if all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
        cwd = Path.cwd().resolve()
        for parent in (run_dir.parent, run_dir.parent.parent):  # outputs/<date>/, outputs/
            inside = parent.resolve() != cwd and parent.resolve().is_relative_to(cwd)
            with contextlib.suppress(OSError):  # not empty: other runs live there
                if inside:
                    parent.rmdir()


def _exit_run_error(kind: str, err: Exception) -> NoReturn:
    """A run that started but cannot go on: one line on rank 0, exit code 1."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{kind}: {err}", file=sys.stderr, flush=True)
    sys.exit(1)


def main() -> None:
    """Entry point: check group names, keep non-zero ranks from writing Hydra's files, run."""
    # launcher -> hydra_plugins, never back (the plugin is a leaf: see its docstring)
    from hydra_plugins.tridist_launcher.mesh_slurm_launcher import (
        QUIET_RANK_OVERRIDES,
        register_mesh_launcher,
    )

    try:
        check_group_choices(sys.argv[1:])
        check_keys(sys.argv[1:])
    except ConfigError as err:
        exit_config_error(err)
    if int(os.environ.get("RANK", "0")) != 0:
        sys.argv += QUIET_RANK_OVERRIDES
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        register_mesh_launcher()  # hydra/launcher=submitit_slurm: each job sized to its mesh
        if not any(a.startswith("hydra/callbacks=") for a in sys.argv):
            sys.argv.append("hydra/callbacks=sweep_summary")  # <sweep dir>/summary.md at the end
    # A cycle holding the trainer keeps its process groups and their gloo worker threads until the
    # collector runs, at the latest in the interpreter's finalization, after Python stopped
    # letting threads take the GIL: a worker then freeing a tensor aborts the process (SIGABRT).
    # Collected at exit, before finalizing, the groups are destroyed while their threads still can.
    atexit.register(gc.collect)
    _hydra_main()


if __name__ == "__main__":
    main()
