"""A run's checkpoints: where they live, resuming at start, and when to save during the loop."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from launcher.config import Config
from launcher.run.trainer import Trainer
from models.hf_llama import HFLlamaWeights
from parallel.checkpoint.load import load_checkpoint
from parallel.checkpoint.save import AsyncCheckpointer, resume_path, save_checkpoint
from parallel.init import InitialValues


def checkpoint_root(cfg: Config, run_dir: Path | None) -> Path | None:
    """`checkpoint.dir`, else `<run dir>/checkpoints`; None when neither is known (no saving)."""
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir)
    return run_dir / "checkpoints" if run_dir is not None else None


class RunCheckpoints:
    """Resume (or start from Hugging Face weights), then save every interval, at the end and on stop."""

    def __init__(self, cfg: Config, run_dir: Path | None) -> None:
        self.cfg = cfg
        self.root = checkpoint_root(cfg, run_dir)
        self._async: AsyncCheckpointer | None = None  # made at the first save: it needs the group
        self.blocked_s = 0.0  # how long the step loop has waited for saves

    def resume_from(self) -> Path | None:
        """The checkpoint `train.resume` names (auto: the newest under the root), or None."""
        return resume_path(self.cfg.train.resume, self.root)

    def initial_values(self, resuming: bool) -> InitialValues | None:
        """Where weights start when not resuming: `model.init_from` (Hugging Face) or the seed."""
        if resuming or not self.cfg.model.init_from:
            return None
        return HFLlamaWeights(Path(self.cfg.model.init_from), self.cfg.model)

    def load(self, path: Path, trainer: Trainer) -> None:
        """Restore model, optimizer, schedule, data position and RNG from `path` (any layout)."""
        load_checkpoint(path, trainer, verify=self.cfg.checkpoint.verify)

    def due(self, step: int, done: bool) -> bool:
        """A save is due after this step: every `checkpoint.interval` steps and at the end."""
        interval = self.cfg.checkpoint.interval
        return self.root is not None and (done or (interval > 0 and step % interval == 0))

    def save(self, trainer: Trainer) -> None:
        """Save the current step (in the background when async); every rank must call it."""
        if self.root is None:
            return
        if self.cfg.checkpoint.async_save:
            self._async = self._async or AsyncCheckpointer()
            self.blocked_s += self._async.save(self.root, trainer, keep=self.cfg.checkpoint.keep)
        else:
            save_checkpoint(self.root, trainer, keep=self.cfg.checkpoint.keep)

    def close(self) -> None:
        """Wait for a save still in flight, so the process never exits before it is committed."""
        if self._async is not None:
            self._async.close()
        if dist.is_initialized() and self.root is not None:
            dist.barrier()  # every rank's part is written before any rank moves on
