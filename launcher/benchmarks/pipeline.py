"""`python -m launcher.bench pipeline`: every schedule on real gloo ranks whose stages sleep a
fixed time, so the measured bubble can be compared, even on 2 cores, with the literature's
formula (parallel/schedules.py) and with torch's own action order for the schedule replayed at
the same costs (parallel/plan/simulate.py).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from launcher.benchmarks.machine import machine
from launcher.run.ports import free_port
from parallel.pipeline import build_schedule
from parallel.plan.simulate import simulated_bubble
from parallel.schedules import (
    SCHEDULES,
    bubble_fraction,
    n_pipeline_stages,
    stage_ids_for_rank,
    stages_per_rank,
)

VIRTUAL_STAGES = 2  # stages per rank of the schedules that take any number


class _Sleep(torch.autograd.Function):
    """Identity whose forward sleeps `fwd_ms` and whose backward sleeps `bwd_ms`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fwd_ms: float, bwd_ms: float) -> torch.Tensor:
        ctx.bwd_ms = bwd_ms
        if fwd_ms:  # even sleep(0) is a syscall that can yield the core
            time.sleep(fwd_ms / 1000)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.bwd_ms:
            time.sleep(ctx.bwd_ms / 1000)
        return grad, None, None


class SleepStage(nn.Module):
    """A stage of known cost: F = ms, input-grad = ms, weight-grad = ms (full backward 2ms).

    The two backward halves are separate autograd nodes meeting at the add, so the zero-bubble
    schedules' stage_backward_input (autograd.grad to the inputs) runs only the input half and
    stage_backward_weight (autograd.grad from the add to the weights) only the weight half.
    """

    def __init__(self, width: int, ms: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.ms = ms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + weight, at a fixed cost."""
        if not x.requires_grad:
            # the first stage's input needs no grad, but a real first stage still back-propagates
            # through its own layers: keep the input half so its full backward also costs 2ms
            x = x.detach().requires_grad_()
        return _Sleep.apply(x, self.ms, self.ms) + _Sleep.apply(self.weight, 0, self.ms)


def benchmarked_stages_per_rank(schedule: str) -> int:
    """This benchmark's v: the schedule's own (1 for gpipe and 1f1b, 2 for the V shapes), else
    VIRTUAL_STAGES."""
    return stages_per_rank(schedule, VIRTUAL_STAGES)


def formula_bubble(schedule: str, p: int, m: int) -> float:
    """The literature's bubble (parallel/schedules.py) at this benchmark's v per schedule."""
    return bubble_fraction(schedule, p, m, benchmarked_stages_per_rank(schedule))


@dataclass
class PipelineRow:
    """One schedule's measured step against its ideal, its formula and its simulated order."""

    schedule: str
    step_ms: float  # median over the timed steps (slowest rank)
    ideal_ms: float  # m * (F + B) per rank: no bubble at all
    formula: float  # the literature's bubble, fraction of the step
    simulated: float  # torch's action order replayed with free communication, fraction of step
    runtime_ms: float  # the same schedule's step with zero-cost stages: comm + Python

    @property
    def bubble(self) -> float:
        """Measured bubble as a fraction of the step: 1 - ideal / measured."""
        return 1 - self.ideal_ms / self.step_ms

    @property
    def off_simulated(self) -> float:
        """Measured against the simulated order plus the runtime's own cost, minus 1."""
        return self.step_ms / (self.ideal_ms / (1 - self.simulated) + self.runtime_ms) - 1


def _pipeline_rank(
    rank: int,
    pp: int,
    port: int,
    schedules: list[str],
    m: int,
    stage_ms: float,
    repeats: int,
    queue: mp.SimpleQueue,
) -> None:
    """One rank: per schedule, median of `repeats` steps after a warm-up step, at the stage cost
    and again at zero cost (what the runtime itself takes: p2p, Python, autograd book-keeping)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=pp)
    group, width = dist.group.WORLD, 8
    assert group is not None  # started above
    x, target = torch.randn(2 * m, width), torch.randn(2 * m, width)
    out = {}
    for name in schedules:
        v = benchmarked_stages_per_rank(name)
        ids = stage_ids_for_rank(rank, pp, v, name)
        modules = [SleepStage(width, stage_ms / v) for _ in ids]
        n_stages = n_pipeline_stages(pp, v, name)
        sched = build_schedule(
            modules, ids, n_stages, name, m, F.mse_loss, torch.device("cpu"), group
        )
        for cost in (stage_ms, 0.0):
            for mod in modules:
                mod.ms = cost / v
            times = []
            for _ in range(1 + (repeats if cost else 5 * repeats)):  # zero-cost steps are short
                dist.barrier()  # start every rank together
                start = time.perf_counter()
                sched.step(
                    *((x,) if 0 in ids else ()), target=target if n_stages - 1 in ids else None
                )
                elapsed = torch.tensor(time.perf_counter() - start)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends with its slowest rank
                times.append(elapsed.item())
            out[name, cost] = statistics.median(times[1:])  # a first step also infers shapes
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def pipeline(
    pp: int = 4,
    microbatches: int = 8,
    stage_ms: float = 20.0,
    schedules: tuple[str, ...] = SCHEDULES,
    repeats: int = 3,
) -> list[PipelineRow]:
    """Run each schedule on `pp` spawned gloo ranks with fixed-cost stages; one row each."""
    if stage_ms <= 0 or pp < 2 or microbatches < 1 or repeats < 1:
        raise ValueError(
            f"need stage_ms > 0, pp >= 2, microbatches >= 1, repeats >= 1; got "
            f"{stage_ms}, {pp}, {microbatches}, {repeats}"
        )
    if unknown := set(schedules) - set(SCHEDULES):
        raise ValueError(f"unknown schedules {sorted(unknown)}; choose from {', '.join(SCHEDULES)}")
    port = free_port()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(
        _pipeline_rank,
        args=(pp, port, list(schedules), microbatches, stage_ms, repeats, queue),
        nprocs=pp,
        join=True,
    )
    times = queue.get()
    ideal = microbatches * 3 * stage_ms  # F + B_input + W per microbatch, on every rank
    return [
        PipelineRow(
            name,
            times[name, stage_ms] * 1000,
            ideal,
            formula_bubble(name, pp, microbatches),
            simulated_bubble(name, pp, microbatches, VIRTUAL_STAGES),
            times[name, 0.0] * 1000,
        )
        for name in schedules
    ]


def format_pipeline(rows: list[PipelineRow], pp: int, m: int, stage_ms: float) -> str:
    """The pipeline rows as a Markdown table, both bubble conventions shown."""
    lines = [
        f"machine: {machine()}",
        f"pp={pp}, microbatches={m}, per rank and microbatch F={stage_ms:g} ms, "
        f"B_input={stage_ms:g} ms, W={stage_ms:g} ms (halved per stage when v=2)",
        "| schedule | v | step ms measured | ideal ms | measured bubble (of step / of ideal) "
        "| formula bubble (of step / of ideal) | expected ms | measured vs expected "
        "| simulated bubble (torch's order) | runtime ms (zero-cost stages) "
        "| measured vs simulated + runtime |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        expected_ms = r.ideal_ms / (1 - r.formula)  # the compute plus the formula's bubble
        lines.append(
            f"| {r.schedule} | {benchmarked_stages_per_rank(r.schedule)} | {r.step_ms:.1f} | "
            f"{r.ideal_ms:.1f} | {r.bubble:.3f} / {r.step_ms / r.ideal_ms - 1:.3f} | "
            f"{r.formula:.3f} / {r.formula / (1 - r.formula):.3f} | "
            f"{expected_ms:.1f} | {r.step_ms / expected_ms - 1:+.1%} | "
            f"{r.simulated:.3f} | {r.runtime_ms:.1f} | {r.off_simulated:+.1%} |"
        )
    return "\n".join(lines)
