"""The training loop of one run: resume, step, log, validate, checkpoint, stop on a signal,
sample. Every rank runs it; rank 0 alone prints and writes shared files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from data import TokenSource, validation_batches
from launcher.config import Config, ConfigError
from launcher.run.banner import banner_lines
from launcher.run.build import build_trainer
from launcher.run.checkpointing import RunCheckpoints
from launcher.run.console import Console
from launcher.run.generate import generate
from launcher.run.monitor import RunMonitor
from launcher.run.observe import RunObserver, prepare_environment
from launcher.run.preemption import StopSignal
from launcher.run.resume import resume_changes
from launcher.run.trainer import StepResult, Trainer
from launcher.run.tuning import searched_order_step, tune
from models.hf import HFFormatError
from parallel.checkpoint.format import read_manifest
from parallel.checkpoint.state import CheckpointError
from parallel.expert_load import expert_load
from parallel.fault_tolerance import LighthouseLost


class NonFiniteError(RuntimeError):
    """A step whose loss or gradient norm was NaN/inf: its update was not applied."""


@dataclass
class TrainSummary:
    """Per-step losses (every rank knows them) and the final validation loss."""

    losses: list[float] = field(default_factory=list)
    val_loss: float | None = None
    sample: str | None = None
    trainer: Trainer | None = None
    preempted: bool = False  # stopped early by SIGUSR1/SIGTERM, after saving a checkpoint


def train(cfg: Config, tokens: TokenSource, run_dir: Path | None = None) -> TrainSummary:
    """Train on an already started (or startable) process group; returns the losses.

    With run_dir None (training called as a library) nothing is shown, logged or validated
    during the run, and no collective runs per step: the per-step losses are reduced once at
    the end."""
    t = cfg.train
    console = Console(run_dir)
    checkpoints = RunCheckpoints(cfg, run_dir)
    resume = checkpoints.resume_from()
    if run_dir is not None:
        for line in banner_lines(cfg, tokens, run_dir, checkpoints.root, resume):
            console.say(line)
    prepare_environment(cfg, run_dir)  # before the process group starts: NCCL's flight recorder
    trainer = _start(cfg, tokens, checkpoints, resume, console)
    val = validation_batches(
        tokens.val,
        t.seq_len,
        t.global_batch_size,
        t.val_batches,
        trainer.model.mesh["dp"].get_local_rank(),
        cfg.parallel.dp,
    )
    monitor = RunMonitor(cfg, trainer, run_dir, record=console.record)  # progress, sinks, timeline
    observer = RunObserver(
        cfg, trainer, run_dir, monitor.data_wait, monitor.add_fields, monitor.say
    )
    summary = TrainSummary(trainer=trainer)
    local_losses: list[torch.Tensor] = []  # this rank's, as tensors: no host sync per step
    stop = StopSignal()
    skipped = 0  # non-finite steps in a row
    tune_step = searched_order_step(cfg, trainer)
    try:
        while trainer.step < t.steps and not summary.preempted:
            observer.before_step(trainer.step + 1)  # phase times, profiler
            if tune_step == trainer.step + 1:
                # zbv, zb_1p, zb_2p: searched at measured costs
                result = tune(cfg, trainer, monitor)
            elif monitor.timeline_step == trainer.step + 1:
                result = monitor.record_timeline(trainer)  # the same step, every action timed
            else:
                try:
                    result = trainer.train_step()
                except LighthouseLost as err:  # fault tolerance: no quorum, so no step, any more
                    _stop_without_lighthouse(err, trainer, checkpoints, console)
                if not result.committed:  # a replica group failed mid-step: torchft runs it again
                    continue
            observer.after_step(trainer.step)  # every observe.interval: stragglers (a collective)
            monitor.progress.update(trainer.step)
            checkpoints.raise_if_failed()  # a background save that failed stops the run now
            local_losses.append(result.loss)
            skipped = 0 if result.applied else skipped + 1
            if skipped:
                _on_nonfinite(cfg, trainer, result.loss, result.grad_norm, skipped, checkpoints)
            done = trainer.step == t.steps
            if monitor.active and (trainer.step % t.log_interval == 0 or done):
                _log_step(
                    trainer,
                    monitor,
                    result,
                    val,
                    summary,
                    validate=trainer.step % t.val_interval == 0 or done,
                )
            # any rank signalled: all save and stop after this step
            summary.preempted = stop.agreed()
            if checkpoints.due(trainer.step, done) or summary.preempted:
                with console.phase(f"saving checkpoint step {trainer.step}"), observer.checkpoint():
                    console.say(f"  {checkpoints.save(trainer)}")
    finally:
        # the watchdog stops before the steps-free end (losses, sample), and on every way out of
        # the loop, an error too: a watchdog thread still inside a torch call when the
        # interpreter exits aborts the process
        observer.close()
    monitor.close()
    stop.restore()
    checkpoints.close()
    if summary.preempted:
        console.say(
            f"stopped by a signal after step {trainer.step}; checkpoint saved in {checkpoints.root}"
        )
    if local_losses:  # one collective for the whole run: averaged over dp, from the last stage
        summary.losses = trainer.global_mean(torch.stack(local_losses)).tolist()
    if t.sample_tokens > 0 and cfg.parallel.pp == 1 and cfg.parallel.cp == 1:
        with console.phase(f"writing a sample of {t.sample_tokens} tokens"):
            summary.sample = sample(cfg, trainer, tokens)
        what = "" if tokens.has_text else " (token ids: set data.tokenizer to read them as text)"
        console.say(f"\n--- sample from the trained model{what} ---\n{summary.sample}\n---")
    elif t.sample_tokens > 0 and cfg.parallel.cp > 1:
        # CP attention needs full-length sequences cut into 2*cp chunks; a growing prompt is not
        console.say("no sample at parallel.cp > 1 (train.sample_tokens ignored)")
    return summary


def _start(
    cfg: Config,
    tokens: TokenSource,
    checkpoints: RunCheckpoints,
    resume: Path | str | None,  # a checkpoint path or fsspec URL
    console: Console,
) -> Trainer:
    """Check a resume's changes (before any process group), build the trainer, load or start."""
    if resume is not None:  # refused before any process group starts if it changes the run
        changed = resume_changes(read_manifest(resume)["config"], cfg)
        if changed:
            console.say(f"resuming with {len(changed)} changed settings (new values win):")
            for line in changed:
                console.say(line)
    init_from = cfg.model.init_from if resume is None else None
    what = "building the model" + (
        f" from Hugging Face weights in {init_from}" if init_from else ""
    )
    try:
        with console.phase(what):
            trainer = build_trainer(
                cfg, tokens, checkpoints.initial_values(resuming=resume is not None)
            )
    except (
        CheckpointError,
        HFFormatError,
    ) as err:  # a bad model.init_from, found while filling weights
        raise ConfigError("model.init_from", cfg.model.init_from, str(err)) from None
    checkpoints.preflight(trainer)  # writable from every rank, room for the checkpoints kept
    if resume is not None:
        with console.phase(f"loading {resume}"):
            checkpoints.load(resume, trainer)
        trainer.apply_optim_config()  # the optimizer follows this run's optim.*, not the saved one
        console.say(f"resumed from {resume} at step {trainer.step}")
    if trainer.replicas is not None:  # the quorum compares steps: a resumed group reports its own
        trainer.replicas.sync_step(trainer.step)
    return trainer


def _stop_without_lighthouse(
    err: LighthouseLost, trainer: Trainer, checkpoints: RunCheckpoints, console: Console
) -> NoReturn:
    """Save the last committed step (nothing of the failed one was applied) and stop."""
    saved = "no checkpoint.dir to save in"
    if checkpoints.root is not None:
        with console.phase(f"saving checkpoint step {trainer.step}"):
            saved = f"checkpoint saved: {checkpoints.save(trainer)}"
    checkpoints.close()
    raise LighthouseLost(f"{err}; stopped after step {trainer.step}, {saved}")


def _log_step(
    trainer: Trainer,
    monitor: RunMonitor,
    result: StepResult,
    val: list[tuple[torch.Tensor, torch.Tensor]],
    summary: TrainSummary,
    validate: bool,
) -> None:
    """The logged step's record (the loss's all-reduce and the one .item() happen here only)."""
    record = {
        "step": trainer.step,
        "loss": trainer.global_mean(result.loss).item(),
        "lr": trainer.lr_scheduler.get_last_lr()[0],
        "grad_norm": result.grad_norm.item(),
        **monitor.throughput(trainer.step),
    }
    args = trainer.cfg.model
    if args.n_experts:  # before validation, whose forwards would count too
        record.update(expert_load(trainer.model.chunks, args.n_layers, args.n_experts))
    if validate:
        record["val_loss"] = summary.val_loss = trainer.global_mean(trainer.evaluate(val)).item()
    monitor.log(record)


def _on_nonfinite(
    cfg: Config,
    trainer: Trainer,
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    skipped: int,
    checkpoints: RunCheckpoints,
) -> None:
    """Warn about a skipped update, or stop: nothing of this step reaches a checkpoint."""
    value = trainer.global_mean(loss).item()  # every rank is here: the norm they agree on said so
    what = f"step {trainer.step}: loss {value:.4g}, gradient norm {grad_norm.item():.4g}"
    t = cfg.train
    if t.nonfinite == "skip" and skipped < t.nonfinite_max_skips:
        if dist.get_rank() == 0:
            print(
                f"warning: non-finite {what}; update skipped ({skipped} in a row, the run stops "
                f"at train.nonfinite_max_skips={t.nonfinite_max_skips})",
                flush=True,
            )
        return
    checkpoints.close()  # a save of an earlier, good step still in flight is committed first
    why = (
        f"{skipped} non-finite steps in a row (train.nonfinite_max_skips={t.nonfinite_max_skips})"
        if t.nonfinite == "skip"
        else "its update was not applied"
    )
    raise NonFiniteError(
        f"non-finite {what}: {why}; the run stopped and the checkpoints in "
        f"{checkpoints.root} are untouched (the newest is the last good one); "
        "lower optim.lr or raise optim.warmup_steps, or set train.nonfinite=skip"
    )


def sample(cfg: Config, trainer: Trainer, tokens: TokenSource) -> str:
    """Text the trained model writes after the prompt `def ` (seeded top-k sampling); without a
    tokenizer, token ids after the validation stream's first token."""
    prompt = tokens.encode("def ") if tokens.has_text else tokens.val[:1].tolist()
    pad_to = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    out = generate(
        trainer.model.chunks[0],
        prompt,
        cfg.train.sample_tokens,
        cfg.model.max_seq_len,
        seed=cfg.train.seed,
        pad_to=pad_to,
    )
    return tokens.decode(prompt + out)
