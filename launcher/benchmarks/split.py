"""`python -m launcher.bench split`: the real training step with the cost model's pipeline split
against the even split, side by side on the same gloo ranks (blocks of steps alternating A/B so
machine noise hits both alike), next to the ratio the cost model predicted.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.run.build import build_trainer, load_data, pipeline_split
from launcher.run.compose import compose_config
from launcher.run.ports import free_port, local_rank_env

# a model whose output head and loss outweigh many blocks (the example shape)
HEAD_HEAVY = ["model=debug", "model.dim=128", "model.vocab_size=32000"]
RUN = [
    "train.seq_len=128",
    "train.global_batch_size=8",
    "train.sample_tokens=0",
    "device=cpu",
    "parallel.schedule=1f1b",
    "parallel.microbatches=8",
]


@dataclass
class SplitRow:
    """One model: both splits, their measured step times and the predicted ratio."""

    model: list[str]
    auto: list[int]
    even: list[int]
    predicted: float  # even / auto slowest-rank time, by the cost model
    auto_ms: list[float]  # per block of steps
    even_ms: list[float]

    @property
    def measured(self) -> float:
        """Median over the alternating blocks of even / auto step time."""
        return statistics.median(e / a for e, a in zip(self.even_ms, self.auto_ms))

    @property
    def fastest(self) -> float:
        """even / auto of each side's fastest block: what a load from other jobs disturbs least."""
        return min(self.even_ms) / min(self.auto_ms)


def _split_rank(
    rank: int, pp: int, port: int, model: list[str], steps: int, blocks: int, queue: mp.SimpleQueue
) -> None:
    """One rank: a trainer per split, warmed up, then `blocks` rounds of `steps` steps each."""
    os.environ.update(local_rank_env(rank, pp, port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    base = model + RUN + [f"parallel.pp={pp}"]
    cfgs = {
        s: compose_config(base + [f"parallel.layers_per_stage={s}"], pp) for s in ("auto", "even")
    }
    tokens = load_data(cfgs["auto"])
    trainers = {s: build_trainer(c, tokens) for s, c in cfgs.items()}
    times: dict[str, list[float]] = {s: [] for s in trainers}
    for block in range(blocks + 1):  # block 0 warms both up
        for name, trainer in trainers.items():
            dist.barrier()  # every rank starts the block together
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            dist.barrier()  # the block ends when the slowest rank is done
            if block:
                times[name].append((time.perf_counter() - start) / steps * 1000)
    if rank == 0:
        auto, even = (pipeline_split(cfgs[s]) for s in ("auto", "even"))
        assert auto is not None and even is not None and auto.even_slowdown is not None
        queue.put(
            SplitRow(
                model, auto.counts, even.counts, auto.even_slowdown, times["auto"], times["even"]
            )
        )
    dist.destroy_process_group()


def split_benchmark(model: list[str], pp: int, steps: int, blocks: int) -> SplitRow:
    """Both splits of `model` on `pp` spawned gloo ranks (1F1B, 8 microbatches)."""
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_split_rank, args=(pp, free_port(), model, steps, blocks, queue), nprocs=pp, join=True)
    return queue.get()


def format_split(row: SplitRow) -> str:
    """One Markdown table row: model, splits, step ms (fastest block / median), the even/auto
    ratio of the fastest blocks and the median of the paired blocks' ratios (their range), and
    the cost model's predicted ratio."""
    ratios = [e / a for e, a in zip(row.even_ms, row.auto_ms)]
    a, e = row.auto_ms, row.even_ms
    return (
        f"| `{' '.join(row.model)}` | {row.even} | {row.auto} | "
        f"{min(e):.0f} / {statistics.median(e):.0f} | {min(a):.0f} / {statistics.median(a):.0f} | "
        f"{row.fastest:.3f} | {row.measured:.3f} ({min(ratios):.3f}–{max(ratios):.3f}) | "
        f"{row.predicted:.3f} |"
    )
