"""`python -m launcher.bench memory`: the activations each pipeline schedule holds, measured.

On real gloo ranks each schedule trains one warm-up step, then one step under autograd's
saved-tensor hooks (launcher/benchmarks/activation_memory.py, weights left out); a rank's peak
divided by what one microbatch saves on it is the microbatches it held at once, printed beside
the count the registry and the planner use (parallel/pipeline/registry.py `PipelineLayout.in_flight`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.benchmarks.activation_memory import SavedActivationTracker
from launcher.benchmarks.machine import machine
from launcher.run.build import build_trainer, load_data
from launcher.run.compose import compose_config
from launcher.run.ports import free_port, local_rank_env
from parallel.pipeline.registry import pipeline_layout

MODEL, SEQ_LEN = "debug", 64  # small enough for 12 schedules on 2 cores in seconds


@dataclass
class MemoryRow:
    """One schedule: per pipeline rank the microbatches measured and counted in flight."""

    schedule: str
    virtual_stages: int
    measured: list[float]
    counted: list[float]
    peak_mib: float  # the fullest rank's peak saved activations


def _virtual_stages(schedule: str) -> int:
    return pipeline_layout(schedule, 2, 2).stages_per_rank  # looped schedules at v = 2


def _rank(
    rank: int,
    pp: int,
    port: int,
    microbatches: int,
    schedules: tuple[str, ...],
    queue: mp.SimpleQueue,
) -> None:
    os.environ.update(local_rank_env(rank, pp, port))
    torch.set_num_threads(1)
    rows = []
    for schedule in schedules:
        v = _virtual_stages(schedule)
        cfg = compose_config(
            [
                f"model={MODEL}",
                f"train.seq_len={SEQ_LEN}",
                f"train.global_batch_size={microbatches}",
                "train.sample_tokens=0",
                "device=cpu",
                f"parallel.pp={pp}",
                f"parallel.schedule={schedule}",
                f"parallel.virtual_stages={v}",
                f"parallel.microbatches={microbatches}",
            ],
            pp,
        )
        trainer = build_trainer(cfg, load_data(cfg))
        trainer.train_step()  # the first step's shape inference saves a forward of its own
        with SavedActivationTracker(trainer.model.parameters()) as saved:
            trainer.train_step()
        mine = torch.tensor([saved.peak / (saved.total / microbatches), float(saved.peak)])
        every = [torch.zeros(2) for _ in range(pp)]
        dist.all_gather(every, mine)
        counted = [trainer.model.pipeline.in_flight(r) for r in range(pp)]
        measured = [float(t[0]) for t in every]
        rows.append(
            MemoryRow(schedule, v, measured, counted, max(float(t[1]) for t in every) / 2**20)
        )
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def schedule_memory(pp: int, microbatches: int, schedules: tuple[str, ...]) -> list[MemoryRow]:
    """Measured and counted microbatches in flight per rank for each schedule on `pp` ranks."""
    for name in schedules:
        problem = pipeline_layout(name, pp, _virtual_stages(name), microbatches).problem()
        if problem is not None:
            raise SystemExit(f"memory benchmark: {name}: {problem.fix}")
    queue = mp.get_context("spawn").SimpleQueue()
    args = (pp, free_port(), microbatches, schedules, queue)
    mp.spawn(_rank, args=args, nprocs=pp)
    return queue.get()


def format_schedule_memory(rows: list[MemoryRow], pp: int, microbatches: int) -> str:
    """The table under the machine line: measured / counted per rank."""
    ranks = " ".join(f"{f'rank {r}':>11}" for r in range(pp))
    lines = [
        machine(),
        f"microbatches whose activations a pipeline rank holds at its peak, measured / counted "
        f"(pp={pp}, m={microbatches}, model={MODEL}, seq {SEQ_LEN}; looped schedules at v=2)",
        f"{'schedule':>16} {'v':>2} {ranks} {'peak MiB':>9}",
    ]
    for row in rows:
        cells = " ".join(f"{m:>5.2f}/{c:<5.2f}" for m, c in zip(row.measured, row.counted))
        lines.append(f"{row.schedule:>16} {row.virtual_stages:>2} {cells} {row.peak_mib:>9.2f}")
    return "\n".join(lines)
