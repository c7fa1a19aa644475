"""Record one pipeline step: when each forward, backward and weight-gradient action and each
p2p wait ran on every rank, and the bubble each rank measured.

torch's schedules call three PipelineStage methods per action (`forward_one_chunk`,
`backward_one_chunk`, `backward_weight_one_chunk`) and wait for p2p work through the module
function `schedules._wait_batch_p2p`. For the recorded step only, those are wrapped on this
rank's stage instances and in that module, and restored afterwards: normal steps run torch's
code untouched, with no extra host syncs. torch's profiler could see the same, but only as
nested record_function ranges that would need parsing back into actions; this is the narrow
place. Written by hand because torch records no per-action times of its own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.pipelining import schedules as torch_schedules

from parallel.pipeline.registry import PipelineLayout

T = TypeVar("T")
COMPUTE_KINDS = ("F", "B", "I", "W")  # forward, full backward, input-grad only, weight-grad only
WAIT = "wait"


@dataclass
class Event:
    """One timed action on one rank; times in seconds from the step's common start."""

    rank: int  # global rank
    pp_rank: int
    kind: str  # F, B, I, W or wait
    stage: int  # -1 for waits
    microbatch: int  # -1 for waits
    start: float
    end: float

    @property
    def label(self) -> str:
        """`F3 s1`: kind, microbatch and stage, as torch's schedules print actions."""
        return WAIT if self.kind == WAIT else f"{self.kind}{self.microbatch} s{self.stage}"


def _stages(schedule: Any) -> list[Any]:
    """The PipelineStage objects a schedule drives on this rank."""
    return list(schedule._stages) if hasattr(schedule, "_stages") else [schedule._stage]


@contextlib.contextmanager
def record_actions(schedule: Any, device: torch.device, rank: int) -> Iterator[list[Event]]:
    """While inside, time every stage action and p2p wait `schedule` runs on this rank."""
    events: list[Event] = []
    # only while recording: a CUDA sync around each action so times are the GPU's, not the launch's
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    stages = _stages(schedule)
    pp_rank = stages[0].group_rank

    def timed(fn: Callable[..., T], kind: str | Callable[..., str], stage: int) -> Callable[..., T]:
        def wrapper(mb: int, *args: Any, **kwargs: Any) -> T:
            sync()
            start = time.perf_counter()
            try:
                return fn(mb, *args, **kwargs)
            finally:
                sync()
                name = kind if isinstance(kind, str) else kind(*args, **kwargs)
                events.append(Event(rank, pp_rank, name, stage, mb, start, time.perf_counter()))

        return wrapper

    def backward_kind(loss: Any = None, full_backward: bool = True, *_: Any, **__: Any) -> str:
        return "B" if full_backward else "I"

    original_wait = torch_schedules._wait_batch_p2p

    def timed_wait(work: list[Any]) -> None:
        if not work:
            return
        sync()
        start = time.perf_counter()
        original_wait(work)
        sync()
        events.append(Event(rank, pp_rank, WAIT, -1, -1, start, time.perf_counter()))

    patched = [
        (s, name, s.__dict__.get(name))
        for s in stages
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")
    ]
    for s in stages:
        s.forward_one_chunk = timed(s.forward_one_chunk, "F", s.stage_index)
        s.backward_one_chunk = timed(s.backward_one_chunk, backward_kind, s.stage_index)
        s.backward_weight_one_chunk = timed(s.backward_weight_one_chunk, "W", s.stage_index)
    torch_schedules._wait_batch_p2p = timed_wait
    try:
        yield events
    finally:
        torch_schedules._wait_batch_p2p = original_wait
        for s, name, before in patched:
            if before is None:
                delattr(s, name)
            else:
                setattr(s, name, before)


def record_step(
    step: Callable[[], T], schedule: Any, device: torch.device
) -> tuple[T, list[Event] | None]:
    """Run `step` with every rank's actions timed; rank 0 gets all ranks' events, others None.

    Collective over the world group: every rank must call it for the same step.
    """
    rank = dist.get_rank()
    dist.barrier()  # every rank starts its clock together, so the rows line up
    start = time.perf_counter()
    with record_actions(schedule, device, rank) as events:
        result = step()
    for e in events:
        e.start, e.end = e.start - start, e.end - start
    gathered: list[list[Event]] | None = (
        [[] for _ in range(dist.get_world_size())] if rank == 0 else None
    )
    dist.gather_object(events, gathered, dst=0)  # rank 0 writes the trace
    return result, [e for per_rank in gathered for e in per_rank] if gathered is not None else None


def measured_bubbles(events: list[Event]) -> dict[int, float]:
    """Per rank: 1 - its compute time / the step's span (first action anywhere to last anywhere)."""
    begin, end = min(e.start for e in events), max(e.end for e in events)
    busy: dict[int, float] = {}
    for e in events:
        busy.setdefault(e.rank, 0.0)
        if e.kind in COMPUTE_KINDS:
            busy[e.rank] += e.end - e.start
    return {r: 1 - b / (end - begin) for r, b in sorted(busy.items())}


@dataclass
class TimelineInfo:
    """What was recorded: the schedule and its shape, for titles and the formula's bubble."""

    layout: PipelineLayout
    step: int

    @property
    def formula(self) -> float:
        """The literature's bubble fraction for this schedule (parallel/pipeline/registry.py)."""
        return self.layout.bubble_fraction


def chrome_trace(events: list[Event], info: TimelineInfo) -> dict[str, Any]:
    """Chrome / Perfetto trace events: one process per rank, compute and waits on two threads."""
    bubbles = measured_bubbles(events)
    trace: list[dict[str, Any]] = []
    for rank in sorted(bubbles):
        pp_rank = next(e.pp_rank for e in events if e.rank == rank)
        trace.append(
            {
                "ph": "M",
                "name": "process_name",
                "pid": rank,
                "args": {"name": f"rank {rank} (pp {pp_rank}) bubble {bubbles[rank]:.3f}"},
            }
        )
        for tid, name in ((0, "compute"), (1, "p2p wait")):
            trace.append(
                {"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": name}}
            )
    for e in events:
        trace.append(
            {
                "ph": "X",
                "name": e.label,
                "cat": e.kind,
                "pid": e.rank,
                "tid": int(e.kind == WAIT),
                "ts": e.start * 1e6,
                "dur": (e.end - e.start) * 1e6,
                "args": {"stage": e.stage, "microbatch": e.microbatch, "pp_rank": e.pp_rank},
            }
        )
    return {
        "traceEvents": trace,
        "displayTimeUnit": "ms",
        "otherData": {
            "schedule": info.layout.spec.name,
            "pp": info.layout.pp,
            "microbatches": info.layout.microbatches,
            "virtual_stages": info.layout.stages_per_rank,
            "step": info.step,
            "formula_bubble": info.formula,
            "measured_bubble": {str(r): b for r, b in bubbles.items()},
        },
    }
