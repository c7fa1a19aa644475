"""`python -m launcher.bench {overhead,pipeline}`: measure what tridist adds, and pipeline bubbles.

overhead: tridist's real training step against a bare PyTorch loop of the same model, data,
optimizer and schedule, interleaved in one process so machine noise hits both alike.
pipeline: every schedule on real gloo ranks whose stages sleep a fixed time, so the measured
bubble can be compared, even on 2 cores, with the literature's formula and with torch's own
action order for the schedule replayed at the same costs. Results: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn
from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops  # private API

from data import DistributedBatchSampler
from launcher.benchmarks.checkpoint import checkpoint_io, drop_page_cache, format_checkpoint_io
from launcher.config import Config, load_config
from launcher.run.build import build_trainer, load_data, model_args
from launcher.run.compose import CONF_DIR
from launcher.run.trainer import lr_multiplier, timed_steps
from launcher.validate import validate
from models.llama import Transformer
from parallel.pipeline import SCHEDULE_CLASS_NAMES, build_schedule, stage_ids_for_rank
from parallel.schedules import SCHEDULES, SCHEDULES_ONE_STAGE_PER_RANK, bubble_fraction


def machine() -> str:
    """CPU model, cores, torch version and intra-op threads, on one line."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


# ---------------------------------------------------------------------------------- overhead

def compose_config(overrides: list[str]) -> Config:
    """The validated one-process config `python -m launcher.train *overrides` would use."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = load_config(compose("config", overrides=overrides))
    validate(cfg, 1)
    return cfg


class BareLoop:
    """The same training step written as plain PyTorch, as a user would without tridist."""

    def __init__(self, cfg: Config, model: nn.Module, tokens: torch.Tensor) -> None:
        o, t = cfg.optim, cfg.train
        self.model, self.clip = model, o.grad_clip
        self.sampler = DistributedBatchSampler(tokens, t.seq_len, t.global_batch_size, 0, 1, t.seed)
        params = list(model.parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, o.warmup_steps, t.steps, o.min_lr_ratio))

    def train_step(self) -> torch.Tensor:
        """One step: forward, loss, backward, clip, update; returns the loss."""
        x, y = self.sampler.next_batch()
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten(0, 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


@dataclass
class OverheadResult:
    """Tokens/s of tridist's step and of the bare loop, measured side by side."""

    tridist_tokens_per_s: float  # over the summed step times
    bare_tokens_per_s: float
    pair_ratios: list[float]  # bare step time / tridist step time, for each adjacent pair
    loss_diff: float  # |tridist - bare| loss on one batch after training: 0 if same work
    machine: str

    @property
    def ratio(self) -> float:
        """tridist / bare tokens/s over all timed steps; 1.0 means no overhead."""
        return self.tridist_tokens_per_s / self.bare_tokens_per_s

    @property
    def median_ratio(self) -> float:
        """The median of the pair ratios: robust to bursts of load from other processes."""
        return statistics.median(self.pair_ratios)


def overhead(steps: int = 30, model: str = "tiny", warmup: int = 3, seq_len: int = 256,
             batch: int = 8, overrides: tuple[str, ...] = ()) -> OverheadResult:
    """Time tridist's Trainer and a bare loop step by step, alternating A B B A A B ..."""
    if min(steps, warmup) < 1:
        raise ValueError(f"steps and warmup must be >= 1; got {steps}, {warmup}")
    cfg = compose_config([f"model={model}", f"train.seq_len={seq_len}", "device=cpu",
                          f"train.global_batch_size={batch}", "precision=fp32",
                          f"train.steps={warmup + steps}", "train.sample_tokens=0", *overrides])
    tokens = load_data(cfg)
    owns_group = not dist.is_initialized()
    trainer = build_trainer(cfg, tokens)  # a one-rank process group and mesh
    bare_model = Transformer(model_args(cfg))
    bare_model.load_state_dict(trainer.model.chunks[0].state_dict())  # the same initial weights
    bare = BareLoop(cfg, bare_model, tokens.train)

    def timed_bare(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            loss = bare.train_step()
        loss.item()  # one host sync, as timed_steps does
        return time.perf_counter() - start

    timed_steps(trainer, warmup)
    timed_bare(warmup)
    pairs = []
    for i in range(steps):  # neighbours in time share the machine's load; alternate who leads
        if i % 2:
            b = timed_bare(1)
        a = timed_steps(trainer, 1)
        if not i % 2:
            b = timed_bare(1)
        pairs.append((a, b))
    with torch.no_grad():
        x, y = trainer.sampler.next_batch()
        la = F.cross_entropy(trainer.model.chunks[0](x).flatten(0, 1), y.flatten(0, 1))
        lb = F.cross_entropy(bare_model(x).flatten(0, 1), y.flatten(0, 1))
    if owns_group:
        dist.destroy_process_group()
    n_tokens = steps * batch * seq_len
    return OverheadResult(n_tokens / sum(a for a, _ in pairs), n_tokens / sum(b for _, b in pairs),
                          [b / a for a, b in pairs], abs(la.item() - lb.item()), machine())


# ---------------------------------------------------------------------------------- pipeline

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


def stages_per_rank(schedule: str) -> int:
    """v: one stage per rank for gpipe and 1f1b, two for the looped and V-shaped schedules."""
    return 1 if schedule in SCHEDULES_ONE_STAGE_PER_RANK else 2


def formula_bubble(schedule: str, p: int, m: int) -> float:
    """The literature's bubble (parallel/schedules.py) at this benchmark's v per schedule."""
    return bubble_fraction(schedule, p, m, stages_per_rank(schedule))


def simulated_bubble(schedule: str, p: int, m: int) -> float:
    """The bubble of torch's own action order for the schedule, replayed with free communication
    and F = I = W = 1 per chunk (B = 2), as a fraction of the step.

    gpipe and 1f1b return their formula, which is exact for them (and torch's action listing
    of single-stage schedules is not the order their runtime executes).
    """
    if stages_per_rank(schedule) == 1:
        return formula_bubble(schedule, p, m)
    cost = {"F": 1, "I": 1, "W": 1, "B": 2}  # compute only: communication is free here
    ops = [[a.sub_actions or [a] for a in rank  # an OVERLAP_F_B runs its two actions in turn
            if a is not None and (a.sub_actions or a.computation_type.value in cost)]
           for rank in get_schedule_ops(SCHEDULE_CLASS_NAMES[schedule], p, m, 2)]

    def needs(a) -> list[tuple[str, int, int]]:  # (F or B, stage, microbatch) done before `a`
        kind, s, mb = a.computation_type.value, a.stage_index, a.microbatch_index
        return {"F": [("F", s - 1, mb)] * (s > 0), "W": [("B", s, mb)]}.get(
            kind, [("F", s, mb)] + [("B", s + 1, mb)] * (s < 2 * p - 1))

    done: dict[tuple[str, int, int], float] = {}  # -> finish time
    clock, nxt = [0.0] * p, [0] * p
    while any(nxt[r] < len(ops[r]) for r in range(p)):
        before = sum(nxt)
        for r in range(p):
            while nxt[r] < len(ops[r]) and all(d in done for a in ops[r][nxt[r]] for d in needs(a)):
                for a in ops[r][nxt[r]]:
                    clock[r] = max([clock[r]] + [done[d] for d in needs(a)])
                    clock[r] += cost[a.computation_type.value]
                for a in ops[r][nxt[r]]:  # torch sends an overlap's outputs after both actions
                    kind = a.computation_type.value
                    done["B" if kind == "I" else kind, a.stage_index, a.microbatch_index] = clock[r]
                nxt[r] += 1
        if sum(nxt) == before:
            raise RuntimeError(f"{schedule}: its action order deadlocks in the replay")
    return 1 - 6 * m / max(clock)


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


def _pipeline_rank(rank: int, pp: int, port: int, schedules: list[str], m: int, stage_ms: float,
                   repeats: int, queue: mp.SimpleQueue) -> None:
    """One rank: per schedule, median of `repeats` steps after a warm-up step, at the stage cost
    and again at zero cost (what the runtime itself takes: p2p, Python, autograd book-keeping)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=pp)
    group, width = dist.group.WORLD, 8
    x, target = torch.randn(2 * m, width), torch.randn(2 * m, width)
    out = {}
    for name in schedules:
        v = stages_per_rank(name)
        ids = stage_ids_for_rank(rank, pp, v, name)
        modules = [SleepStage(width, stage_ms / v) for _ in ids]
        sched = build_schedule(modules, ids, pp * v, name, m, F.mse_loss, torch.device("cpu"), group)
        for cost in (stage_ms, 0.0):
            for mod in modules:
                mod.ms = cost / v
            times = []
            for _ in range(1 + (repeats if cost else 5 * repeats)):  # zero-cost steps are short
                dist.barrier()  # start every rank together
                start = time.perf_counter()
                sched.step(*((x,) if 0 in ids else ()), target=target if pp * v - 1 in ids else None)
                elapsed = torch.tensor(time.perf_counter() - start)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends with its slowest rank
                times.append(elapsed.item())
            out[name, cost] = statistics.median(times[1:])  # a first step also infers shapes
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def pipeline(pp: int = 4, microbatches: int = 8, stage_ms: float = 20.0,
             schedules: tuple[str, ...] = SCHEDULES, repeats: int = 3) -> list[PipelineRow]:
    """Run each schedule on `pp` spawned gloo ranks with fixed-cost stages; one row each."""
    if stage_ms <= 0 or pp < 2 or microbatches < 1 or repeats < 1:
        raise ValueError(f"need stage_ms > 0, pp >= 2, microbatches >= 1, repeats >= 1; got "
                         f"{stage_ms}, {pp}, {microbatches}, {repeats}")
    if unknown := set(schedules) - set(SCHEDULES):
        raise ValueError(f"unknown schedules {sorted(unknown)}; choose from {', '.join(SCHEDULES)}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_pipeline_rank, args=(pp, port, list(schedules), microbatches, stage_ms, repeats,
                                   queue), nprocs=pp, join=True)
    times = queue.get()
    ideal = microbatches * 3 * stage_ms  # F + B_input + W per microbatch, on every rank
    return [PipelineRow(name, times[name, stage_ms] * 1000, ideal,
                        formula_bubble(name, pp, microbatches),
                        simulated_bubble(name, pp, microbatches), times[name, 0.0] * 1000)
            for name in schedules]


# ---------------------------------------------------------------------------------- command line

# 320M parameters: a 1.28 GB model in fp32, 3.8 GB with AdamW's two moments
CHECKPOINT_MODEL = ["model=llama3_1b", "model.n_layers=4", "model.vocab_size=32000"]

def format_overhead(r: OverheadResult) -> str:
    """The overhead result as a small Markdown table."""
    q = statistics.quantiles(r.pair_ratios, n=4) if len(r.pair_ratios) > 1 else r.pair_ratios * 3
    return "\n".join([
        f"machine: {r.machine}",
        f"{len(r.pair_ratios)} timed steps each, alternating A B B A (warm-up excluded)",
        "| loop | tokens/s |", "|---|---:|",
        f"| tridist Trainer.train_step | {r.tridist_tokens_per_s:,.0f} |",
        f"| bare PyTorch loop | {r.bare_tokens_per_s:,.0f} |",
        f"ratio tridist/bare: {r.ratio:.3f} over all steps; median of step pairs "
        f"{r.median_ratio:.3f} (quartiles {q[0]:.3f}, {q[2]:.3f}); loss difference "
        f"{r.loss_diff:.2e}"])


def format_pipeline(rows: list[PipelineRow], pp: int, m: int, stage_ms: float) -> str:
    """The pipeline rows as a Markdown table, both bubble conventions shown."""
    lines = [f"machine: {machine()}",
             f"pp={pp}, microbatches={m}, per rank and microbatch F={stage_ms:g} ms, "
             f"B_input={stage_ms:g} ms, W={stage_ms:g} ms (halved per stage when v=2)",
             "| schedule | v | step ms measured | ideal ms | measured bubble (of step / of ideal) "
             "| formula bubble (of step / of ideal) | expected ms | measured vs expected "
             "| simulated bubble (torch's order) | runtime ms (zero-cost stages) "
             "| measured vs simulated + runtime |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        expected_ms = r.ideal_ms / (1 - r.formula)  # the compute plus the formula's bubble
        lines.append(f"| {r.schedule} | {stages_per_rank(r.schedule)} | {r.step_ms:.1f} | "
                     f"{r.ideal_ms:.1f} | {r.bubble:.3f} / {r.step_ms / r.ideal_ms - 1:.3f} | "
                     f"{r.formula:.3f} / {r.formula / (1 - r.formula):.3f} | "
                     f"{expected_ms:.1f} | {r.step_ms / expected_ms - 1:+.1%} | "
                     f"{r.simulated:.3f} | {r.runtime_ms:.1f} | {r.off_simulated:+.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse the subcommand and print its table."""
    parser = argparse.ArgumentParser(prog="python -m launcher.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    o = sub.add_parser("overhead", help="tridist's training step vs a bare PyTorch loop")
    o.add_argument("--steps", type=int, default=30, help="timed steps per side")
    o.add_argument("--warmup", type=int, default=3)
    o.add_argument("--model", default="tiny")
    o.add_argument("--seq-len", type=int, default=256)
    o.add_argument("--batch", type=int, default=8)
    p = sub.add_parser("pipeline", help="bubble of each schedule with fixed-cost stages")
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--stage-ms", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    c = sub.add_parser("checkpoint", help="checkpoint save/load vs raw disk I/O (>= 1 GB)")
    c.add_argument("--dir", type=Path, default=Path("bench-checkpoint"),
                   help="scratch folder on the disk to measure (deleted afterwards)")
    c.add_argument("--model", nargs="*", default=CHECKPOINT_MODEL, help="model overrides")
    c.add_argument("--tp", type=int, default=2, help="layout the resharded load uses")
    a = parser.parse_args(argv)
    if a.command == "checkpoint":
        print(machine())
        cold = drop_page_cache()
        print(format_checkpoint_io(checkpoint_io(a.dir, a.model, a.tp), cold))
    elif a.command == "overhead":
        print(format_overhead(overhead(a.steps, a.model, a.warmup, a.seq_len, a.batch)))
    else:
        rows = pipeline(a.pp, a.microbatches, a.stage_ms, tuple(a.schedules.split(",")), a.repeats)
        print(format_pipeline(rows, a.pp, a.microbatches, a.stage_ms))


if __name__ == "__main__":
    main()
