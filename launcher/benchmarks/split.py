"""`python -m launcher.bench split`: the real training step with the cost model's pipeline split
against the even split, side by side on the same gloo ranks (blocks of steps alternating so
machine noise hits all alike), next to the ratio the cost model predicted; and a third split,
the search rerun on the block's and head's costs refitted to one recorded step of the even
split (parallel/pipeline/timeline.py), to see how much measured stage times help.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.run.build import build_trainer, load_data, model_args, pipeline_of, pipeline_split
from launcher.run.compose import compose_config
from launcher.run.ports import free_port, local_rank_env
from launcher.run.trainer import Trainer
from parallel.pipeline.split import best_split, fit_part_costs, placement, rank_times
from parallel.pipeline.timeline import COMPUTE_KINDS, record_step
from parallel.plan.parts import part_costs

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
    """One model: the even split, the cost model's, and the one refitted to measured stage times,
    with their step times (ms per timed block, alternating) and predicted ratios to the even."""

    model: list[str]
    splits: dict[str, list[int]]  # even, auto, measured
    predicted: dict[str, float]  # auto and measured: even / it, slowest-rank time
    ms: dict[str, list[float]]
    even_stage_ms: list[float]  # compute per stage in the recorded step of the even split

    def ratio(self, name: str) -> float:
        """Median over the alternating blocks of even / `name` step time."""
        return statistics.median(e / x for e, x in zip(self.ms["even"], self.ms[name]))

    def fastest(self, name: str) -> float:
        """even / `name` of each side's fastest block: what other jobs' load disturbs least."""
        return min(self.ms["even"]) / min(self.ms[name])


def _stage_seconds(trainer: Trainer, n_stages: int) -> list[float]:
    """Compute time of each stage in one recorded step (every rank gets rank 0's sums)."""
    model = trainer.model
    _, events = record_step(trainer.train_step, model.schedule, trainer.device)
    seconds = [0.0] * n_stages
    for e in events or []:
        if e.kind in COMPUTE_KINDS:
            seconds[e.stage] += e.end - e.start
    box = [seconds]
    dist.broadcast_object_list(box, src=0)  # rank 0 holds every rank's events
    return box[0]


def _split_rank(
    rank: int, pp: int, port: int, model: list[str], steps: int, blocks: int, queue: mp.SimpleQueue
) -> None:
    """One rank: a trainer per split, warmed up, then `blocks` rounds of `steps` steps each."""
    os.environ.update(local_rank_env(rank, pp, port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    base = model + RUN + [f"parallel.pp={pp}"]
    cfgs = {
        s: compose_config(base + [f"parallel.layers_per_stage={s}"], pp) for s in ("even", "auto")
    }
    tokens = load_data(cfgs["even"])
    trainers = {s: build_trainer(c, tokens) for s, c in cfgs.items()}
    choices = {s: pipeline_split(c) for s, c in cfgs.items()}
    splits = {s: c.counts for s, c in choices.items() if c is not None}
    # refit the block's and the head's cost to the even split's measured stage times
    trainers["even"].train_step()  # warm-up before the recorded step
    args, cfg = model_args(cfgs["even"]), cfgs["even"]
    where = placement(pipeline_of(cfg))
    costs = part_costs(args, cfg.train.seq_len)
    stage_seconds = _stage_seconds(trainers["even"], pp)
    fitted = fit_part_costs(costs, splits["even"], stage_seconds)
    splits["measured"] = best_split(fitted, args.n_layers, where)
    predicted = {
        name: max(rank_times(c, splits["even"], where)) / max(rank_times(c, splits[name], where))
        for name, c in (("auto", costs), ("measured", fitted))
    }
    if splits["measured"] not in (splits["even"], splits["auto"]):
        explicit = f"parallel.layers_per_stage=[{','.join(map(str, splits['measured']))}]"
        trainers["measured"] = build_trainer(compose_config(base + [explicit], pp), tokens)
    times: dict[str, list[float]] = {s: [] for s in trainers}
    for block in range(blocks + 1):  # block 0 warms every trainer up
        for name, trainer in trainers.items():
            dist.barrier()  # every rank starts the block together
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            dist.barrier()  # the block ends when the slowest rank is done
            if block:
                times[name].append((time.perf_counter() - start) / steps * 1000)
    for name, same in (("measured", "auto"), ("measured", "even")):
        if name not in times and splits[name] == splits[same]:
            times[name] = times[same]
    if rank == 0:
        queue.put(SplitRow(model, splits, predicted, times, [x * 1000 for x in stage_seconds]))
    dist.destroy_process_group()


def split_benchmark(model: list[str], pp: int, steps: int, blocks: int) -> SplitRow:
    """The splits of `model` on `pp` spawned gloo ranks (1F1B, 8 microbatches)."""
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_split_rank, args=(pp, free_port(), model, steps, blocks, queue), nprocs=pp, join=True)
    return queue.get()


def format_split(row: SplitRow) -> str:
    """Markdown rows, one per split: step ms (fastest block / median), even/it of the fastest
    blocks and the median of the paired blocks' ratios (their range), and the predicted ratio."""
    lines = []
    for name in ("even", "auto", "measured"):
        ms, ratios = row.ms[name], [e / x for e, x in zip(row.ms["even"], row.ms[name])]
        lines.append(
            f"| `{' '.join(row.model)}` | {name} | {row.splits[name]} | "
            f"{min(ms):.0f} / {statistics.median(ms):.0f} | {row.fastest(name):.3f} | "
            f"{row.ratio(name):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) | "
            f"{row.predicted.get(name, 1.0):.3f} |"
        )
    stages = ", ".join(f"{x:.0f}" for x in row.even_stage_ms)
    return "\n".join(
        lines + [f"(even split, compute per stage in one recorded step: [{stages}] ms)"]
    )
