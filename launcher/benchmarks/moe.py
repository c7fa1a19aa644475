"""`python -m launcher.bench moe`: a Mixture-of-Experts run under expert parallelism on real gloo
ranks: the all-to-all bytes each rank sent per step, measured from the split sizes the dispatch
really used, beside the planner's figure for the same layout, and the expert load (the busiest
expert's tokens over the mean, worst layer) step by step over the run.

Step time at ep=2 against ep=1 is `python -m launcher.bench ab` (alternating on the same ranks).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.config import Config
from launcher.run.build import build_trainer, load_data
from launcher.run.compose import compose_config
from launcher.run.ports import free_port, local_rank_env
from parallel.expert_load import expert_load
from parallel.expert_parallel import ExpertParallelDispatch
from parallel.plan.comm import all_to_all_bytes

# the exchanges one dispatch's rows take: dispatch and combine, in forward and in backward
EXCHANGES = 4


@dataclass
class MoERun:
    """Per step: all-to-all bytes sent by each rank (to other ranks) and the expert load."""

    overrides: list[str]
    world: int
    bytes_sent: list[list[float]]  # [step][rank]
    load: list[float]  # [step] moe/load_max_over_mean
    aux: list[float]  # [step] moe/aux_loss
    planned: float  # the planner's all-to-all bytes per step and rank (uniform routing)


def planned_bytes(cfg: Config) -> float:
    """The planner's all-to-all bytes one rank sends per step for this run's layout."""
    par = cfg.parallel
    return all_to_all_bytes(
        tokens=cfg.train.global_batch_size * cfg.train.seq_len // (par.dp * par.microbatches),
        dim=cfg.model.dim,
        top_k=cfg.model.experts_per_token,
        ep=par.ep,
        moe_layers=cfg.model.n_layers // par.pp,
        microbatches=par.microbatches,
        recompute=cfg.model.activation_checkpointing,
        dtype_bytes=4,  # fp32 rows here
    )


def _moe_rank(
    rank: int, world: int, port: int, overrides: list[str], steps: int, queue: mp.SimpleQueue
) -> None:
    """One rank: train `steps` steps, reading the dispatches' sent rows and the load each step."""
    os.environ.update(local_rank_env(rank, world, port), OMP_NUM_THREADS="1")
    cfg = compose_config(overrides, world)
    trainer = build_trainer(cfg, load_data(cfg))
    dispatches = [
        m
        for c in trainer.model.chunks
        for m in c.modules()
        if isinstance(m, ExpertParallelDispatch)
    ]
    row_bytes = cfg.model.dim * torch.finfo(torch.float32).bits // 8
    sent, load, aux = [], [], []
    for _ in range(steps):
        before = sum(d.rows_sent for d in dispatches)
        trainer.train_step()
        rows = sum(d.rows_sent for d in dispatches) - before
        mine = torch.tensor([float(rows * row_bytes * EXCHANGES)])
        every = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(every, mine)
        sent.append([t.item() for t in every])
        step_load = expert_load(trainer.model.chunks, cfg.model.n_layers, cfg.model.n_experts)
        load.append(step_load["moe/load_max_over_mean"])
        aux.append(step_load["moe/aux_loss"])
    if rank == 0:
        queue.put(MoERun(overrides, world, sent, load, aux, planned_bytes(cfg)))
    dist.destroy_process_group()


def moe_run(overrides: list[str], world: int, steps: int) -> MoERun:
    """Train `overrides` for `steps` steps on `world` spawned gloo ranks, measuring as it goes."""
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_moe_rank, args=(world, free_port(), overrides, steps, queue), nprocs=world)
    return queue.get()


def format_moe(run: MoERun) -> str:
    """A markdown summary: measured a2a bytes per step and rank (median, range) against the plan,
    and the expert load at the first, middle and last steps."""
    per_rank = [b for step in run.bytes_sent for b in step]
    median = statistics.median(per_rank)
    rows = [
        f"`{' '.join(run.overrides)}` on {run.world} ranks, {len(run.load)} steps",
        f"all-to-all sent per step per rank: median {median / 1e6:.3f} MB "
        f"(range {min(per_rank) / 1e6:.3f}–{max(per_rank) / 1e6:.3f} MB)"
        + f"; planned {run.planned / 1e6:.3f} MB (measured / planned {median / run.planned:.3f})",
        "| step | expert load (max / mean, worst layer) | aux loss |",
        "|---:|---:|---:|",
    ]
    n = len(run.load)
    for i in sorted({0, 1, n // 4, n // 2, 3 * n // 4, n - 1}):
        rows.append(f"| {i + 1} | {run.load[i]:.2f} | {run.aux[i]:.4f} |")
    return "\n".join(rows)
