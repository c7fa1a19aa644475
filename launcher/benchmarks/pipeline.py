"""`python -m launcher.bench pipeline`: every schedule on real gloo ranks whose stages sleep a
fixed time, so the measured bubble can be compared, even on 2 cores, with the literature's
formula (parallel/pipeline/registry.py) and with the schedule's action order (torch's, or tridist's)
replayed at the same costs (parallel/pipeline/simulate.py). Unequal costs (cheaper weight gradients,
a slower last stage) show what the searched orders (zbv, zb_1p, zb_2p), given those costs, gain.
"""

from __future__ import annotations

import math
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
from parallel.pipeline.costs import StageCosts, busiest_rank_work, stage_to_rank
from parallel.pipeline.registry import SCHEDULES, PipelineLayout, pipeline_layout
from parallel.pipeline.runtime import build_schedule
from parallel.pipeline.simulate import simulated_bubble

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
    """A stage of known cost: F = ms, input-grad = ms, weight-grad = w_ratio * ms.

    The two backward halves are separate autograd nodes meeting at the add, so the zero-bubble
    schedules' stage_backward_input (autograd.grad to the inputs) runs only the input half and
    stage_backward_weight (autograd.grad from the add to the weights) only the weight half.
    """

    def __init__(self, width: int, ms: float, w_ratio: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.ms, self.w_ratio = ms, w_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + weight, at a fixed cost."""
        if not x.requires_grad:
            # the first stage's input needs no grad, but a real first stage still back-propagates
            # through its own layers: keep the input half so its full backward also costs 2ms
            x = x.detach().requires_grad_()
        weight_ms = self.w_ratio * self.ms
        return _Sleep.apply(x, self.ms, self.ms) + _Sleep.apply(self.weight, 0, weight_ms)


def benchmarked(schedule: str, pp: int, microbatches: int = 1) -> PipelineLayout:
    """This benchmark's layout of `schedule`: its own stages per rank (1 for gpipe and 1f1b, 2
    for the V shapes), else VIRTUAL_STAGES."""
    return pipeline_layout(schedule, pp, VIRTUAL_STAGES, microbatches)


def benchmarked_stages_per_rank(schedule: str) -> int:
    """This benchmark's v for `schedule` (see `benchmarked`)."""
    return benchmarked(schedule, 2).stages_per_rank


def formula_bubble(schedule: str, p: int, m: int) -> float:
    """The literature's bubble (parallel/pipeline/registry.py) at this benchmark's v per schedule."""
    return benchmarked(schedule, p, m).bubble_fraction


def stage_costs(
    schedule: str, pp: int, stage_ms: float, w_ratio: float = 1.0, last_stage: float = 1.0
) -> StageCosts:
    """Per stage, in ms: a rank's stage_ms split over its v chunks, the last stage (the output
    head's) `last_stage` times slower, each weight gradient `w_ratio` times its forward."""
    n = benchmarked(schedule, pp).n_stages
    f = tuple(stage_ms / (n // pp) * (last_stage if s == n - 1 else 1) for s in range(n))
    return StageCosts(f, f, tuple(w_ratio * x for x in f))


@dataclass
class PipelineRow:
    """One schedule's measured step against its ideal, its formula and its simulated order."""

    schedule: str
    step_ms: float  # median over the timed steps (slowest rank)
    ideal_ms: float  # m * (F + B) per rank: no bubble at all
    formula: float  # the literature's bubble, fraction of the step
    simulated: float  # the action order replayed, free communication; fraction of step (or nan)
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
    w_ratio: float = 1.0,
    last_stage: float = 1.0,
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
        layout = benchmarked(name, pp, m)
        ids, n_stages = layout.stage_ids(rank), layout.n_stages
        costs = stage_costs(name, pp, stage_ms, w_ratio, last_stage)
        modules = [SleepStage(width, costs.forward[s], w_ratio) for s in ids]
        searched_at = costs if layout.spec.searched else None  # as parallel.stage_costs
        sched = build_schedule(
            modules, ids, layout, F.mse_loss, torch.device("cpu"), group, searched_at
        )
        for cost in (stage_ms, 0.0):
            for mod, s in zip(modules, ids):
                mod.ms = costs.forward[s] * cost / stage_ms
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
    w_ratio: float = 1.0,
    last_stage: float = 1.0,
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
        args=(
            pp,
            port,
            list(schedules),
            microbatches,
            stage_ms,
            repeats,
            queue,
            w_ratio,
            last_stage,
        ),
        nprocs=pp,
        join=True,
    )
    times, rows = queue.get(), []
    for name in schedules:
        costs = stage_costs(name, pp, stage_ms, w_ratio, last_stage)
        layout = benchmarked(name, pp, microbatches)
        placement = stage_to_rank(pp, len(costs.forward), layout.v_shape)
        equal = w_ratio == 1 and last_stage == 1
        try:
            simulated = simulated_bubble(layout, None if equal else costs)
        except ValueError:  # torch lists no order its one-stage runtime runs: nothing to replay
            simulated = math.nan
        rows.append(
            PipelineRow(
                name,
                times[name, stage_ms] * 1000,
                busiest_rank_work(costs, placement, microbatches),  # the busiest rank, no bubble
                formula_bubble(name, pp, microbatches),
                simulated,
                times[name, 0.0] * 1000,
            )
        )
    return rows


def format_pipeline(
    rows: list[PipelineRow],
    pp: int,
    m: int,
    stage_ms: float,
    w_ratio: float = 1.0,
    last_stage: float = 1.0,
) -> str:
    """The pipeline rows as a Markdown table, both bubble conventions shown."""
    lines = [
        f"machine: {machine()}",
        f"pp={pp}, microbatches={m}, per rank and microbatch F={stage_ms:g} ms, "
        f"B_input={stage_ms:g} ms, W={w_ratio * stage_ms:g} ms (halved per stage when v=2)"
        + (f", the last stage {last_stage:g}x" if last_stage != 1 else "")
        + "; formula: at equal costs; ideal: the busiest rank's compute",
        "| schedule | v | step ms measured | ideal ms | measured bubble (of step / of ideal) "
        "| formula bubble (of step / of ideal) | expected ms | measured vs expected "
        "| simulated bubble (the order replayed at these costs) | runtime ms (zero-cost stages) "
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
            f"{_maybe(r.simulated, '.3f')} | {r.runtime_ms:.1f} | {_maybe(r.off_simulated, '+.1%')} |"
        )
    return "\n".join(lines)


def _maybe(x: float, spec: str) -> str:
    return "n/a" if math.isnan(x) else format(x, spec)
