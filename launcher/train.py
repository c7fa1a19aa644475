"""`python -m launcher.train [overrides]`: the Hydra entry point, alone or under torchrun.

Config is validated (exit code 2, one line) before any process group starts. Under torchrun
every rank runs this; all agree on one run directory and only rank 0 writes shared files.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from data import DistributedBatchSampler, TokenSource, build_token_source, validation_batches
from launcher.checkpointing import RunCheckpoints
from launcher.config import Config, ConfigError, load_config, validate
from launcher.generate import generate
from launcher.monitor import RunMonitor
from launcher.multirun import run_worker_group
from launcher.preemption import StopSignal
from launcher.slurm import export_rank_env_from_slurm, is_submitit_task, requeue_if_slurm
from launcher.trainer import Trainer
from models.llama import ModelArgs
from parallel.checkpoint import CheckpointError
from parallel.init import InitialValues
from parallel.mesh import build_mesh, resolve_device
from parallel.parallelize import parallelize

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CONFIG_GROUPS = ("model", "data", "parallel")


@dataclass
class TrainSummary:
    """Per-step losses (every rank knows them) and the final validation loss."""

    losses: list[float] = field(default_factory=list)
    val_loss: float | None = None
    sample: str | None = None
    trainer: Trainer | None = None
    preempted: bool = False  # stopped early by SIGUSR1/SIGTERM, after saving a checkpoint


def model_args(cfg: Config) -> ModelArgs:
    """The architecture part of the model config."""
    return ModelArgs(**{f.name: getattr(cfg.model, f.name) for f in fields(ModelArgs)})


def load_data(cfg: Config) -> TokenSource:
    """Build the token source; a missing or unreadable file is a config error."""
    d = cfg.data
    try:
        source = build_token_source(d.source, d.path, d.tokenizer, d.val_fraction, d.max_bytes)
    except (FileNotFoundError, ValueError) as err:
        field_name = "data.tokenizer" if d.tokenizer and d.tokenizer in str(err) else "data.path"
        raise ConfigError(field_name, getattr(d, field_name.split(".")[1]), str(err)) from None
    if source.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"the data has {source.vocab_size} token ids; set model.vocab_size >= that")
    return source


def build_trainer(cfg: Config, tokens: TokenSource, initial_values: InitialValues | None = None) -> Trainer:
    """Start the process group and mesh, build this rank's model, sampler and optimizer.

    initial_values: where the weights come from (default: drawn from train.seed)."""
    par = cfg.parallel
    device = resolve_device(cfg.device)
    mesh = build_mesh(device, par.dp, par.pp, par.tp)
    torch.manual_seed(cfg.train.seed)
    model = parallelize(
        model_args(cfg), mesh, device, cfg.train.seed,
        virtual_stages=par.virtual_stages, schedule=par.schedule, microbatches=par.microbatches,
        layers=par.layers_per_stage, dp_shard=par.dp_shard,
        activation_checkpointing=cfg.model.activation_checkpointing, sequence_parallel=par.sequence_parallel,
        initial_values=initial_values,
    )
    sampler = DistributedBatchSampler(tokens.train, cfg.train.seq_len, cfg.train.global_batch_size,
                                      mesh["dp"].get_local_rank(), par.dp, cfg.train.seed)
    return Trainer(cfg, model, sampler, device)


def train(cfg: Config, tokens: TokenSource, run_dir: Path | None = None) -> TrainSummary:
    """Train on an already started (or startable) process group; returns the losses."""
    par = cfg.parallel
    checkpoints = RunCheckpoints(cfg, run_dir)
    resume = checkpoints.resume_from()
    try:
        trainer = build_trainer(cfg, tokens, checkpoints.initial_values(resuming=resume is not None))
    except CheckpointError as err:  # a bad model.init_from, found while filling the weights
        raise ConfigError("model.init_from", cfg.model.init_from, str(err)) from None
    if resume is not None:
        checkpoints.load(resume, trainer)
        if dist.get_rank() == 0:
            print(f"resumed from {resume} at step {trainer.step}", flush=True)
    model, dp = trainer.model, par.dp
    val = validation_batches(tokens.val, cfg.train.seq_len, cfg.train.global_batch_size,
                             cfg.train.val_batches, model.mesh["dp"].get_local_rank(), dp)
    is_rank0 = dist.get_rank() == 0
    monitor = RunMonitor(cfg, trainer, run_dir)  # progress, metrics sinks, pipeline timeline
    summary = TrainSummary(trainer=trainer)
    t = cfg.train
    step_losses: list[torch.Tensor] = []
    stop = StopSignal()
    while trainer.step < t.steps and not summary.preempted:
        result = monitor.train_step(trainer)
        step_losses.append(trainer.global_mean(result.loss))  # a collective, no host sync
        done = trainer.step == t.steps
        if monitor.active and (trainer.step % t.log_interval == 0 or done):
            record = {"step": trainer.step, "loss": step_losses[-1].item(), "lr": trainer.lr_scheduler.get_last_lr()[0],
                      "grad_norm": result.grad_norm.item(), **monitor.throughput(trainer.step)}
            if trainer.step % t.val_interval == 0 or done:
                record["val_loss"] = summary.val_loss = trainer.global_mean(trainer.evaluate(val)).item()
            monitor.log(record)
        summary.preempted = stop.agreed()  # any rank signalled: all save and stop after this step
        if checkpoints.due(trainer.step, done) or summary.preempted:
            checkpoints.save(trainer)
    monitor.close()
    stop.restore()
    checkpoints.close()
    if summary.preempted and is_rank0:
        print(f"stopped by a signal after step {trainer.step}; checkpoint saved in {checkpoints.root}",
              flush=True)
    summary.losses = torch.stack(step_losses).tolist() if step_losses else []
    if t.sample_tokens > 0 and par.pp == 1:
        prompt = tokens.encode("def ")
        pad_to = par.tp if par.sequence_parallel else 1
        out = generate(model.chunks[0], prompt, t.sample_tokens, cfg.model.max_seq_len, seed=t.seed,
                       pad_to=pad_to)
        summary.sample = tokens.decode(prompt + out)
        if is_rank0:
            print(f"\n--- sample from the trained model ---\n{summary.sample}\n---", flush=True)
    return summary


def _run_dir_name() -> str:
    """One name all ranks of a job agree on: the rendezvous id under torchrun, else the time."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return f"run-{run_id[:16]}"
    return datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


# cached: Hydra copies the cache into every sweep job's config, so all jobs of a multirun (and
# the summary at its end) resolve the same multirun/<time> folder, seconds apart or not
OmegaConf.register_new_resolver("run_dir_name", _run_dir_name, replace=True, use_cache=True)


def _fail(err: ConfigError) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(str(err).replace("\n", " "), file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(raw: DictConfig) -> None:
    if is_submitit_task():  # hydra/launcher=submitit_slurm: this Slurm task is one rank
        export_rank_env_from_slurm()
    # a local sweep job (`-m`, not under torchrun) starts its own ranks: launcher/multirun.py
    own_group = HydraConfig.get().mode == RunMode.MULTIRUN and "RANK" not in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(raw)
        if own_group:
            world_size = cfg.parallel.dp * cfg.parallel.pp * cfg.parallel.tp
        validate(cfg, world_size)
        tokens = load_data(cfg)
    except ConfigError as err:
        _fail(err)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if own_group and world_size > 1:
        run_worker_group(cfg, run_dir)
        return
    try:
        summary = train(cfg, tokens, run_dir)
    except ConfigError as err:  # found after start-up, e.g. a model.init_from that does not fit
        _fail(err)
    except CheckpointError as err:  # a checkpoint to resume from that cannot be loaded
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"checkpoint error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary.preempted:
        # exit code 0: a requested stop with its checkpoint saved, which torchrun must not restart
        requeue_if_slurm()


def check_group_choices(argv: list[str]) -> None:
    """An unknown flavor (`model=llama3_9b`) is refused with the list of known ones."""
    for arg in argv:
        group, _, choice = arg.partition("=")
        if group not in CONFIG_GROUPS or not choice:
            continue
        unknown = [c for c in choice.split(",") if not (CONF_DIR / group / f"{c}.yaml").is_file()]  # -m a,b
        if unknown:
            known = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
            _fail(ConfigError(group, unknown[0], f"unknown {group}; choose one of {', '.join(known)}"))


def main() -> None:
    """Entry point: check group names, keep non-zero ranks from writing Hydra's files, run."""
    from hydra_plugins.tridist_launcher.mesh_slurm_launcher import register_mesh_launcher

    check_group_choices(sys.argv[1:])
    if int(os.environ.get("RANK", "0")) != 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        register_mesh_launcher()  # hydra/launcher=submitit_slurm: each job sized to its mesh
        if not any(a.startswith("hydra/callbacks=") for a in sys.argv):
            sys.argv.append("hydra/callbacks=sweep_summary")  # <sweep dir>/summary.md at the end
    _hydra_main()


if __name__ == "__main__":
    main()
