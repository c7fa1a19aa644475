"""What the user sees of a run: progress, the throughput fields of each logged step (step time,
data wait, tokens/s, MFU, peak memory), the metrics sinks, and the one-step pipeline timeline.

The training loop (launcher/run/loop.py) calls `record_timeline` (at `timeline_step`),
`throughput` and `log`; nothing here
adds a host-device sync to a normal step: times are host wall clock between logged steps,
which the loss's `.item()` at a log step already synchronizes.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launcher.config import Config
from launcher.run.metrics import MetricsLogger
from launcher.run.progress import Progress
from launcher.run.trainer import StepResult, Trainer
from parallel.pipeline.timeline import TimelineInfo, record_step
from parallel.plan.flops import flops_per_token, peak_tflops

TIMELINE_AFTER = 3  # record the third step of the run: shapes are inferred and buffers allocated


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak: CUDA allocator's max allocated on GPU, max resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


class _DataWait:
    """Seconds spent inside the sampler's next_batch, by wrapping it on the instance."""

    def __init__(self, sampler: Any) -> None:
        self.seconds = 0.0
        inner = sampler.next_batch

        def next_batch() -> Any:
            start = time.perf_counter()
            try:
                return inner()
            finally:
                self.seconds += time.perf_counter() - start

        sampler.next_batch = next_batch


class RunMonitor:
    """Progress, metrics and timeline for one training run; prints and writes on rank 0 only.

    With run_dir None (training called as a library) it shows and records nothing.
    """

    def __init__(
        self,
        cfg: Config,
        trainer: Trainer,
        run_dir: Path | None,
        record: Callable[[str], None] | None = None,
    ) -> None:
        """record: also keeps each console line (e.g. in train.log)."""
        self.cfg, self.run_dir, self._record = cfg, run_dir, record
        self.active = run_dir is not None
        self.is_rank0 = dist.get_rank() == 0
        self.world = dist.get_world_size()
        self.device = trainer.device
        t, log = cfg.train, cfg.logging
        self.progress = Progress(
            t.steps, log.progress, self.active and self.is_rank0, start=trainer.step
        )
        self.logger = None
        if run_dir is not None:
            wandb = None
            if log.wandb.enabled:
                wandb = {
                    "project": log.wandb.project,
                    "entity": log.wandb.entity,
                    "name": log.wandb.name,
                    "config": dataclasses.asdict(cfg),
                }
            self.logger = MetricsLogger(
                run_dir,
                self.is_rank0,
                wandb=wandb,
                tensorboard=log.tensorboard,
                console=self._console_line,
            )
        self.tokens_per_step = t.global_batch_size * t.seq_len
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)  # ModelConfig is a ModelArgs
        self.peak_tflops = peak_tflops(
            cfg.hardware.peak_tflops, self.device
        )  # validated: > 0 or None
        self.data_wait = _DataWait(trainer.sampler)
        self._pending: dict[str, Any] = {}
        self.timeline_step = None
        if cfg.parallel.timeline and self.active:
            if trainer.model.schedule is None:
                self.progress.write(
                    "parallel.timeline: no pipeline (parallel.pp=1), nothing to record",
                    with_eta=False,
                )
            else:
                self.timeline_step = min(trainer.step + TIMELINE_AFTER, t.steps)
        self._restart(trainer.step)

    def _restart(self, step: int) -> None:
        self._window = (step, time.perf_counter(), self.data_wait.seconds)

    def say(self, line: str) -> None:
        """One line on rank 0's console (above the progress bar) and in train.log."""
        if self.active and self.is_rank0:
            self._console_line(line)

    def _console_line(self, line: str) -> None:
        self.progress.write(line)
        if self._record is not None:
            self._record(line)

    def record_timeline(self, trainer: Trainer) -> StepResult:
        """Run the next training step with every rank's pipeline actions timed; rank 0 writes
        timeline.json and timeline.png into the run folder."""
        result, events = record_step(trainer.train_step, trainer.model.schedule, self.device)
        if events is not None and self.run_dir is not None:  # rank 0 of a run with a folder
            info = TimelineInfo(trainer.model.pipeline, trainer.step)
            from launcher.timeline_plot import write_timeline  # matplotlib: only when drawing

            for line in write_timeline(events, info, self.run_dir):
                self.progress.write(line, with_eta=False)
        return result

    def throughput(self, step: int) -> dict[str, float]:
        """Step time, data wait, tokens/s (global, per device), FLOPs/token, MFU, peak memory,
        over the steps since the last log. Collective (max memory over ranks): call on all."""
        first, start, waited = self._window
        steps, elapsed = max(1, step - first), time.perf_counter() - start
        tokens_per_s = self.tokens_per_step * steps / elapsed
        per_device = tokens_per_s / self.world
        out = {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": per_device,
            "step_time_s": elapsed / steps,
            "data_wait_s": (self.data_wait.seconds - waited) / steps,
            "flops_per_token": self.flops_per_token,
        }
        if self.peak_tflops is not None:
            out["mfu"] = self.flops_per_token * per_device / (self.peak_tflops * 1e12)
        memory = torch.tensor(peak_memory_gib(self.device), dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(
                memory, op=dist.ReduceOp.MAX
            )  # the fullest device is the one that matters
        out["peak_memory_gib"] = memory.item()
        return out

    def add_fields(self, fields: dict[str, Any]) -> None:
        """Fields for the next logged record (e.g. the straggler report's summary)."""
        self._pending.update(fields)

    def log(self, record: dict[str, Any]) -> None:
        """Send a record to the sinks and start the next throughput window (eval time excluded)."""
        record, self._pending = {**record, **self._pending}, {}
        if self.logger is not None:
            self.logger.log(record)
        self._restart(record["step"])

    def close(self) -> None:
        """End the progress bar and close the sinks."""
        self.progress.close()
        if self.logger is not None:
            self.logger.close()
