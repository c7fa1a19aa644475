"""`python -m launcher.bench ab`: two configs' real training steps on the same gloo ranks, in
alternating timed blocks so machine noise hits both alike: e.g. compiled against eager at dp=2
or pp=2 (where compile must not slow the pipeline down), or bf16 against fp32.

Both sides train from the same seed on the same data, so their losses show what the change does
to the numerics, next to what it does to the speed.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.run.build import build_trainer, load_data
from launcher.run.compose import compose_config
from launcher.run.monitor import RunMonitor
from launcher.run.observe import RunObserver
from launcher.run.ports import free_port, local_rank_env

SIDES = ("a", "b")


@dataclass
class ABResult:
    """Step times (ms per step of each timed block, alternating) and losses of the two sides."""

    base: list[str]
    sides: dict[str, list[str]]
    world: int
    tokens_per_step: int
    ms: dict[str, list[float]]
    losses: dict[str, list[float]]

    def speedup(self) -> float:
        """Median over the paired blocks of a's step time / b's: above 1, b is faster."""
        return statistics.median(a / b for a, b in zip(self.ms["a"], self.ms["b"]))

    def loss_difference(self) -> float:
        """The largest relative difference of the two sides' per-step losses."""
        return max(abs(a - b) / abs(a) for a, b in zip(self.losses["a"], self.losses["b"]))


def _ab_rank(
    rank: int,
    world: int,
    port: int,
    base: list[str],
    sides: dict[str, list[str]],
    steps: int,
    blocks: int,
    queue: mp.SimpleQueue,
) -> None:
    """One rank: a trainer per side, then blocks+1 rounds of `steps` steps each (round 0 warms
    up, compiling where a side compiles)."""
    os.environ.update(local_rank_env(rank, world, port), OMP_NUM_THREADS="1")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cfgs = {name: compose_config(base + overrides, world) for name, overrides in sides.items()}
    tokens = load_data(cfgs["a"])
    trainers = {name: build_trainer(cfg, tokens) for name, cfg in cfgs.items()}
    # observe.* as the training loop runs it; its wrappers are installed for its side's blocks only
    observers = {
        name: RunObserver(
            cfgs[name],
            t,
            None,
            RunMonitor(cfgs[name], t, None).data_wait,
            print,
            print,
            always=True,
        )
        for name, t in trainers.items()
        if cfgs[name].observe.enabled
    }
    for paused in observers.values():
        paused.pause()
    ms: dict[str, list[float]] = {name: [] for name in trainers}
    losses: dict[str, list[float]] = {name: [] for name in trainers}
    for block in range(blocks + 1):
        for name, trainer in trainers.items():
            dist.barrier()  # every rank starts the block together
            observer = observers.get(name)
            if observer is not None:
                observer.resume()
            start = time.perf_counter()
            step_losses = []
            for _ in range(steps):
                if observer is not None:
                    observer.before_step(trainer.step + 1)
                step_losses.append(trainer.train_step().loss)
                if observer is not None:
                    observer.after_step(trainer.step)
            if observer is not None:
                observer.pause()
            dist.barrier()  # the block ends when the slowest rank is done
            if block:
                ms[name].append((time.perf_counter() - start) / steps * 1000)
            losses[name] += [trainer.global_mean(x).item() for x in step_losses]
    if rank == 0:
        cfg = cfgs["a"]
        tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        queue.put(ABResult(base, sides, world, tokens_per_step, ms, losses))
    dist.destroy_process_group()


def ab_benchmark(
    base: list[str], a: list[str], b: list[str], world: int, steps: int, blocks: int
) -> ABResult:
    """Configs base+a and base+b trained side by side on `world` spawned gloo ranks."""
    queue = mp.get_context("spawn").SimpleQueue()
    sides = {"a": a, "b": b}
    args = (world, free_port(), base, sides, steps, blocks, queue)
    mp.spawn(_ab_rank, args=args, nprocs=world, join=True)
    return queue.get()


def format_ab(result: ABResult) -> str:
    """A markdown table: each side's step ms (fastest block / median) and tokens/s, b's speedup
    over a (median of paired blocks, their range) and the largest loss difference."""
    rows = [
        f"`{' '.join(result.base)}` on {result.world} rank(s), "
        f"{len(result.ms['a'])} timed blocks per side, alternating",
        "| side | overrides | step ms (fastest / median) | tokens/s (median) |",
        "|---|---|---:|---:|",
    ]
    for name in SIDES:
        ms = result.ms[name]
        rows.append(
            f"| {name} | `{' '.join(result.sides[name]) or '(none)'}` | "
            f"{min(ms):.0f} / {statistics.median(ms):.0f} | "
            f"{result.tokens_per_step / statistics.median(ms) * 1000:,.0f} |"
        )
    pairs = [a / b for a, b in zip(result.ms["a"], result.ms["b"])]
    rows.append(
        f"b / a speed: {result.speedup():.3f} (blocks {min(pairs):.3f}–{max(pairs):.3f}); "
        f"largest relative loss difference b vs a: {result.loss_difference():.2e}"
    )
    return "\n".join(rows)
