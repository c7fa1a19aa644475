"""A run's checkpoints: where they live, resuming at start, and when to save during the loop.

The one place that knows both the Trainer and parallel/checkpoint: it hands the checkpoint code
the trainer's parts (model, optimizer, named states, the manifest's facts) and sets the
trainer's step after a load.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from launcher.config import Config, ConfigError
from launcher.run.build import model_args
from launcher.run.fault_tolerance import replica_root
from launcher.run.trainer import Trainer
from models.hf import HFWeights
from models.registry import model_spec
from parallel.checkpoint.async_save import AsyncCheckpointer
from parallel.checkpoint.format import read_manifest, resume_path
from parallel.checkpoint.load import load_checkpoint
from parallel.checkpoint.preflight import check_root
from parallel.checkpoint.save import CheckpointMeta, save_checkpoint
from parallel.checkpoint.storage import Location, as_location
from parallel.init import InitialValues
from parallel.parallelize import ParallelModel

ADAMW_MOMENTS = 2  # exp_avg and exp_avg_sq: each the size of its parameter


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def checkpoint_root(cfg: Config, run_dir: Path | None) -> Location | None:
    """`checkpoint.dir` (a path, or an fsspec URL), else `<run dir>/checkpoints`; None when
    neither is known (no saving)."""
    if cfg.checkpoint.dir:
        return replica_root(cfg, as_location(cfg.checkpoint.dir))
    return replica_root(cfg, run_dir / "checkpoints") if run_dir is not None else None


def checkpoint_layout(cfg: Config) -> dict[str, Any]:
    """The (dp, pp, tp, v, schedule) a run uses, as the manifest records it (cp and
    dp_replicate too, where not 1)."""
    par = cfg.parallel
    # a load compares this with the saved one (per-rank RNG only in the same layout): keep the
    # keys as format 1 wrote them, or every old checkpoint reads as another layout; keys added
    # since appear only when used
    later = {k: getattr(par, k) for k in ("cp", "dp_replicate") if getattr(par, k) != 1}
    return later | {
        "world_size": dist.get_world_size(),
        "dp": par.dp,
        "pp": par.pp,
        "tp": par.tp,
        "virtual_stages": par.virtual_stages,
        "schedule": par.schedule,
        "dp_shard": par.dp_shard,
    }


def trainer_states(trainer: Trainer) -> dict[str, Stateful]:
    """The trainer's non-tensor state, by the names the manifest keeps it under."""
    return {"sampler": trainer.sampler, "lr_scheduler": trainer.lr_scheduler}


def trainer_meta(trainer: Trainer, extra: dict[str, Any] | None = None) -> CheckpointMeta:
    """What the manifest records of a trainer beside its tensors."""
    cfg = trainer.cfg
    return CheckpointMeta(
        model=model_args(cfg),
        layout=checkpoint_layout(cfg),
        config=dataclasses.asdict(cfg),
        tokens_seen=trainer.sampler.samples_consumed * trainer.sampler.seq_len,
        extra=extra or {},
    )


def _save_parts(
    trainer: Trainer, extra: dict[str, Any] | None
) -> tuple[int, ParallelModel, torch.optim.Optimizer, dict[str, Stateful], CheckpointMeta]:
    """(step, model, optimizer, states, meta): what save_checkpoint and its async twin take."""
    return (
        trainer.step,
        trainer.model,
        trainer.optimizer,
        trainer_states(trainer),
        trainer_meta(trainer, extra),
    )


def save_trainer(
    root: Location, trainer: Trainer, extra: dict[str, Any] | None = None, keep: int | None = None
) -> Location:
    """save_checkpoint of the trainer's current step; every rank must call it."""
    return save_checkpoint(root, *_save_parts(trainer, extra), keep)


def save_trainer_async(
    checkpointer: AsyncCheckpointer,
    root: Location,
    trainer: Trainer,
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
) -> float:
    """Start an async save of the trainer's current step; the seconds the caller was blocked."""
    return checkpointer.save(root, *_save_parts(trainer, extra), keep)


def load_trainer(path: Location, trainer: Trainer, verify: bool = True) -> dict[str, Any]:
    """load_checkpoint into the trainer, which then stands at the saved step; the manifest."""
    manifest = load_checkpoint(
        path,
        trainer.model,
        trainer.optimizer,
        trainer_states(trainer),
        checkpoint_layout(trainer.cfg),
        verify=verify,
    )
    trainer.step = manifest["step"]
    return manifest


class RunCheckpoints:
    """Resume (or start from Hugging Face weights), then save every interval, at the end and on stop."""

    def __init__(self, cfg: Config, run_dir: Path | None) -> None:
        self.cfg = cfg
        self.root = checkpoint_root(cfg, run_dir)
        self._async: AsyncCheckpointer | None = None  # made at the first save: it needs the group

    @property
    def blocked_s(self) -> float:
        """How long the step loop has waited for background saves (in save and for the copies)."""
        return self._async.blocked_s if self._async is not None else 0.0

    def resume_from(self) -> Location | None:
        """The checkpoint `train.resume` names (auto: the newest under the root), or None."""
        return resume_path(self.cfg.train.resume, self.root)

    def initial_values(self, resuming: bool) -> InitialValues | None:
        """Where weights start when not resuming: `model.init_from` (Hugging Face) or the seed."""
        if resuming or not self.cfg.model.init_from:
            return None
        layout = model_spec(self.cfg.model.family).hf
        return HFWeights(Path(self.cfg.model.init_from), self.cfg.model, layout)

    def load(self, path: Location, trainer: Trainer) -> None:
        """Restore model, optimizer, schedule, data position, RNG and step from `path` (any layout)."""
        load_trainer(path, trainer, verify=self.cfg.checkpoint.verify)

    def preflight(self, trainer: Trainer) -> None:
        """Before the first step, on every rank: refuse a checkpoint root some rank cannot write
        or without room for one checkpoint (a ConfigError); warn when it cannot hold as many as
        the run keeps at once. Nothing to check without a root."""
        if self.root is None:
            return
        check = check_root(self.root, trainer.model, moments=ADAMW_MOMENTS)
        if check.problems:
            raise ConfigError(
                "checkpoint.dir",
                str(self.root),
                "; ".join(check.problems) + "; choose a folder every rank can create and write",
            )
        one, free = check.checkpoint_bytes, check.free_bytes
        if free is None:  # an object store: no free space to check
            return
        if free < one:
            raise ConfigError(
                "checkpoint.dir",
                str(self.root),
                f"{_size(free)} free there, one checkpoint of this run takes about "
                f"{_size(one)}; free some space or choose another folder",
            )
        at_once = self._most_on_disk(trainer.step)
        if free < one * at_once and dist.get_rank() == 0:
            keep = self.cfg.checkpoint.keep
            print(
                f"warning: checkpoint.dir={str(self.root)!r}: {_size(free)} free holds "
                f"{free // one} checkpoints of about {_size(one)}, but this run may hold "
                f"{at_once} at once (checkpoint.keep={keep}, plus the one being written); "
                "a save that finds the disk full stops the run",
                flush=True,
            )

    def _most_on_disk(self, step: int) -> int:
        """How many checkpoints this run may write and hold at once from `step` on (at least 1):
        the saves still due, at most keep + 1 (the one being written) when keep > 0."""
        steps, interval, keep = (
            self.cfg.train.steps,
            self.cfg.checkpoint.interval,
            self.cfg.checkpoint.keep,
        )
        saves = steps // interval - step // interval if interval > 0 else 0
        if interval <= 0 or steps % interval:
            saves += 1  # the save at the end
        return max(1, min(saves, keep + 1) if keep > 0 else saves)

    def raise_if_failed(self) -> None:
        """Raise, as a CheckpointError, the error of a background save that finished with one.

        Cheap (a Future check, no collective, never blocks): meant for every step, so a failed
        async save stops the run at the next step, not at the next save.
        """
        if self._async is not None:
            self._async.raise_if_failed()

    def due(self, step: int, done: bool) -> bool:
        """A save is due after this step: every `checkpoint.interval` steps, and at the end
        unless `checkpoint.final=false`."""
        c = self.cfg.checkpoint
        return self.root is not None and (
            (done and c.final) or (c.interval > 0 and step % c.interval == 0)
        )

    def save(self, trainer: Trainer) -> str:
        """Save the current step (in the background when async); every rank must call it.
        Returns what was done, for the user: the folder and its size, or that it is in flight."""
        if self.root is None:
            return "no checkpoint folder"
        keep = self.cfg.checkpoint.keep
        if self.cfg.checkpoint.async_save:
            self._async = self._async or AsyncCheckpointer()
            save_trainer_async(self._async, self.root, trainer, keep=keep)
            return f"writing step {trainer.step} in the background to {self.root}"
        path = save_trainer(self.root, trainer, keep=keep)
        size = sum(info["bytes"] for info in read_manifest(path)["files"].values())
        return f"saved {path} ({size / 2**20:,.1f} MiB; newest {keep} kept)"

    def close(self) -> None:
        """Wait for a save still in flight, so the process never exits before it is committed;
        raises its error as a CheckpointError."""
        if self._async is not None:
            self._async.close()
        if dist.is_initialized() and self.root is not None:
            dist.barrier()  # every rank's part is written before any rank moves on
