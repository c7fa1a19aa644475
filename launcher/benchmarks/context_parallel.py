"""`python -m launcher.bench cp`: what context parallelism buys on real gloo ranks.

memory: the activations autograd keeps per rank for one long sequence at each cp (the
tracker test_activation_memory uses), with both cp_comm variants, against the planner's share.
speed: tokens/s of the same training step at cp=1 (dp over the ranks) and at cp=2 with each
variant, built side by side in one set of ranks and timed in alternation, so machine noise hits
every layout alike.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.benchmarks.activation_memory import SavedActivationTracker
from launcher.benchmarks.machine import machine
from launcher.run.build import build_trainer, load_data
from launcher.run.compose import compose_config
from launcher.run.ports import free_port, local_rank_env
from launcher.run.trainer import timed_steps
from parallel.context_parallel import CP_COMM
from parallel.plan.memory import block_activation_elements, cp_kv_buffer_elements


@dataclass
class MemoryRow:
    """Peak saved activation bytes of the fullest rank for one (cp, cp_comm)."""

    cp: int
    comm: str
    peak_bytes: int
    planned_share: float  # the planner's blocks-only share of cp=1's activations


def _overrides(model: str, seq_len: int, batch: int, layout: list[str]) -> list[str]:
    return [
        f"model={model}",
        f"model.max_seq_len={seq_len}",
        f"train.seq_len={seq_len}",
        f"train.global_batch_size={batch}",
        "train.sample_tokens=0",
        "device=cpu",
        *layout,
    ]


def _memory_rank(
    rank: int, world: int, port: int, model: str, seq_len: int, queue: mp.SimpleQueue
) -> None:
    """Every layout that fits `world` ranks: cp=world for each variant, cp=1 on rank 0 only."""
    os.environ.update(local_rank_env(rank, world, port))
    torch.set_num_threads(1)
    out = {}
    for comm in CP_COMM:
        cfg = compose_config(
            _overrides(model, seq_len, 1, [f"parallel.cp={world}", f"parallel.cp_comm={comm}"]),
            world,
        )
        trainer = build_trainer(cfg, load_data(cfg))
        with SavedActivationTracker() as saved:
            trainer.train_step()
        peak = torch.tensor(float(saved.peak))
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the fullest rank
        out[comm] = int(peak.item())
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def cp_memory(model: str, seq_len: int, sizes: tuple[int, ...]) -> list[MemoryRow]:
    """Peak saved activations per rank for one sequence of `seq_len` at each cp in `sizes`."""
    rows = []
    for cp in sizes:
        queue = mp.get_context("spawn").SimpleQueue()
        port = free_port()
        if cp == 1:  # one process: no CP at all, so one row
            mp.spawn(_memory_rank_single, args=(port, model, seq_len, queue), nprocs=1)
        else:
            mp.spawn(_memory_rank, args=(cp, port, model, seq_len, queue), nprocs=cp)
        peaks = queue.get()
        cfg = compose_config(_overrides(model, seq_len, 1, []))
        base = block_activation_elements(cfg.model, 1, False, "none")
        for comm, peak in peaks.items():
            extra = cp_kv_buffer_elements(cfg.model, 1, cp, comm, "none")
            rows.append(MemoryRow(cp, comm, peak, (base + extra) / base / cp))
    return rows


def _memory_rank_single(
    rank: int, port: int, model: str, seq_len: int, queue: mp.SimpleQueue
) -> None:
    os.environ.update(local_rank_env(0, 1, port))
    torch.set_num_threads(1)
    cfg = compose_config(_overrides(model, seq_len, 1, []), 1)
    trainer = build_trainer(cfg, load_data(cfg))
    with SavedActivationTracker() as saved:
        trainer.train_step()
    queue.put({"-": saved.peak})
    dist.destroy_process_group()


def _speed_rank(
    rank: int,
    port: int,
    model: str,
    seq_len: int,
    steps: int,
    rounds: int,
    queue: mp.SimpleQueue,
) -> None:
    """On 2 ranks: dp=2, cp=2 all_gather and cp=2 ring, each built once, timed A B C A B C."""
    os.environ.update(local_rank_env(rank, 2, port))
    torch.set_num_threads(1)
    layouts = {
        "cp=1 (dp=2)": ["parallel.dp=2"],
        **{f"cp=2 {c}": ["parallel.cp=2", f"parallel.cp_comm={c}"] for c in CP_COMM},
    }
    trainers = {}
    for name, layout in layouts.items():
        cfg = compose_config(_overrides(model, seq_len, 2, layout), 2)
        trainers[name] = build_trainer(cfg, load_data(cfg))
        timed_steps(trainers[name], 1)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            dist.barrier()
            times[name].append(timed_steps(trainer, steps) / steps)
    if rank == 0:
        queue.put({name: 2 * seq_len / statistics.median(t) for name, t in times.items()})
    dist.barrier()
    dist.destroy_process_group()


def cp_speed(model: str, seq_len: int, steps: int, rounds: int) -> dict[str, float]:
    """Tokens/s of a 2-sequence step on 2 ranks at cp=1 and at cp=2 with each variant."""
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_speed_rank, args=(free_port(), model, seq_len, steps, rounds, queue), nprocs=2)
    return queue.get()


def format_cp(
    memory: list[MemoryRow], speed: dict[str, float], seq_len: int, speed_seq_len: int, model: str
) -> str:
    """Both tables, under the machine line."""
    base = next(r.peak_bytes for r in memory if r.cp == 1)
    lines = [
        machine(),
        f"activations autograd keeps, fullest rank, one {seq_len}-token sequence, model={model}",
        f"{'cp':>3} {'cp_comm':>10} {'peak MiB':>9} {'of cp=1':>8} {'planned':>8}",
    ]
    for r in memory:
        lines.append(
            f"{r.cp:>3} {r.comm:>10} {r.peak_bytes / 2**20:>9.1f} "
            f"{r.peak_bytes / base:>8.3f} {r.planned_share:>8.3f}"
        )
    lines.append(f"tokens/s on 2 ranks, 2 sequences of {speed_seq_len} per step (median of rounds)")
    lines += [f"{name:>20} {tps:>10,.0f}" for name, tps in speed.items()]
    return "\n".join(lines)
