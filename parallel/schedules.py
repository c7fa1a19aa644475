"""The pipeline schedules tridist runs: one registry entry per schedule, read by config
validation, the pipeline builder, the planner, the benchmark and the timeline.

An entry says how the schedule is built (a torch.distributed.pipelining class, or a tridist-made
action order that torch's runtime runs: parallel/zero_bubble.py), where its
stages sit (one per rank, looped s mod pp, or a V), how many stages a rank holds, which
microbatch counts it accepts, its bubble and the microbatches a rank holds at its peak.
Adding a schedule is one entry here plus its row in tests/parallel/test_schedules.py.

Cost model of the bubbles and in-flight counts: per pipeline rank and microbatch the forward
costs F, the input gradient B_input = F and the weight gradient W = F (full backward B = 2F);
a rank holding v chunks spends F/v per chunk.

The in-flight counts are the papers', and torch's runtime holds what they say: measured per
schedule by tests/parallel/test_activation_memory.py (a zero-bubble microbatch's activations
are freed by its weight-gradient action).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from parallel.plan.replay import StageCosts
from parallel.zero_bubble import zb_1p_order, zb_2p_order, zb_h1_order, zb_h2_order, zbv_order

Placement = Literal["one", "looped", "v"]
# (pp, n_stages, microbatches, per-stage costs or None) -> per pipeline rank, its torch _Actions
ActionOrder = Callable[[int, int, int, StageCosts | None], dict[int, list[Any]]]
# (schedule name, pp, n_stages, microbatches) -> a fix when the microbatch count cannot work
MicrobatchCheck = Callable[[str, int, int, int], str | None]


@dataclass(frozen=True)
class ScheduleProblem:
    """Why a layout cannot run a schedule: the parallel.* setting at fault, its value, a fix."""

    setting: str  # virtual_stages or microbatches
    value: int
    fix: str


@dataclass(frozen=True)
class ScheduleSpec:
    """Everything tridist knows about one pipeline schedule."""

    name: str  # the literature's
    torch_class: str | None  # for torch's get_schedule_class; None when `order` builds it
    placement: Placement  # one stage per rank, looped (stage s on rank s mod pp), or V-shaped
    stages_per_rank: int | Literal["virtual_stages"]  # fixed, or parallel.virtual_stages
    bubble_time: Callable[[int, int], float]  # (pp, v) -> idle time of a rank, in units of F
    in_flight: Callable[[int, int, int, int], float]  # (pp, pp rank, m, v) -> microbatches held
    microbatch_check: MicrobatchCheck | None = None
    order: ActionOrder | None = None  # a tridist-made order, run by torch's runtime
    searched: bool = False  # the order is searched from the run's per-stage costs
    # torch 2.13 runs the schedule with torch.compile'd stages (its zero-bubble schedules split
    # backward into input and weight passes and refuse compiled stages, pytorch#161904)
    compiled_stages: bool = True

    def __post_init__(self) -> None:
        if (self.torch_class is None) == (self.order is None):
            raise ValueError(f"{self.name}: give exactly one of torch_class and order")

    def stages_on_each_rank(self, virtual_stages: int) -> int:
        """How many stages (chunks) one pipeline rank holds, given parallel.virtual_stages."""
        if self.stages_per_rank == "virtual_stages":
            return virtual_stages
        return self.stages_per_rank

    def problem(self, pp: int, virtual_stages: int, microbatches: int) -> ScheduleProblem | None:
        """The first reason (pp > 1, virtual_stages, microbatches) cannot run, or None."""
        v, fixed = virtual_stages, self.stages_per_rank
        if fixed == 1 and v != 1:
            return ScheduleProblem(
                "virtual_stages",
                v,
                f"{self.name} runs one stage per rank; "
                "set virtual_stages=1 or use interleaved_1f1b",
            )
        if fixed == 2 and v != 2:
            return ScheduleProblem(
                "virtual_stages", v, f"{self.name} places exactly two stages per rank; set it to 2"
            )
        if self.microbatch_check is None:
            return None
        fix = self.microbatch_check(self.name, pp, pp * v, microbatches)
        return None if fix is None else ScheduleProblem("microbatches", microbatches, fix)


def _one_microbatch_per_stage(name: str, pp: int, n_stages: int, microbatches: int) -> str | None:
    if microbatches < n_stages:
        return f"{name} needs at least as many microbatches as stages ({n_stages})"
    return None


def _microbatches_in_rounds_of_pp(
    name: str, pp: int, n_stages: int, microbatches: int
) -> str | None:
    rounds = max(1, microbatches // pp)
    if microbatches % rounds:
        return (
            f"{name} runs microbatches in rounds of pp={pp}; use a multiple of {pp}, "
            f"e.g. {rounds * pp}"
        )
    return None


def _megatron_warm_up(p: int, r: int, m: int, v: int) -> float:
    # Megatron's warm-up, 2(p-r-1) + (v-1)p + 1 chunks of 1/v [Narayanan et al. 2021]
    return min(m * v, 2 * (p - r - 1) + (v - 1) * p + 1) / v


def _tridist_zero_bubble(
    name: str,
    in_flight: Callable[[int, int, int, int], float],
    order: ActionOrder,
    searched: bool = False,
) -> ScheduleSpec:
    """A one-stage-per-rank zero-bubble order made by tridist: the floor bubble (p-1) F, and
    no compiled stages (the I/W split needs a block backward of many autograd nodes)."""
    return ScheduleSpec(
        name,
        None,
        "one",
        1,
        lambda p, v: p - 1,
        in_flight,
        _one_microbatch_per_stage,
        order=order,
        searched=searched,
        compiled_stages=False,
    )


_SPECS = (
    # GPipe: (p-1)(F+B) = 3(p-1); every forward before any backward holds all m
    ScheduleSpec("gpipe", "GPipe", "one", 1, lambda p, v: 3 * (p - 1), lambda p, r, m, v: m),
    # PipeDream-Flush: GPipe's bubble; r's warm-up forwards plus one, p - r
    ScheduleSpec(
        "1f1b",
        "1F1B",
        "one",
        1,
        lambda p, v: 3 * (p - 1),
        lambda p, r, m, v: p - r,
        _one_microbatch_per_stage,
    ),
    # Megatron interleaving: the same bubble per chunk, 3(p-1)/v
    ScheduleSpec(
        "interleaved_1f1b",
        "Interleaved1F1B",
        "looped",
        "virtual_stages",
        lambda p, v: 3 * (p - 1) / v,
        _megatron_warm_up,
        _microbatches_in_rounds_of_pp,
    ),
    # breadth-first: 3(p-1)/v, and like GPipe all m in flight
    ScheduleSpec(
        "looped_bfs",
        "LoopedBFS",
        "looped",
        "virtual_stages",
        lambda p, v: 3 * (p - 1) / v,
        lambda p, r, m, v: m,
    ),
    # ZB-H1: (p-1)(F+B_input-W) per chunk = (p-1)/v; torch's order holds p microbatches on
    # every rank (pv chunk-microbatches between F and W, at any v and m; measured alike),
    # 1F1B's first-stage peak
    ScheduleSpec(
        "interleaved_zb",
        "InterleavedZeroBubble",
        "looped",
        "virtual_stages",
        lambda p, v: (p - 1) / v,
        lambda p, r, m, v: p,
        _microbatches_in_rounds_of_pp,
        compiled_stages=False,
    ),
    # ZB-V: its paper's ~0 needs optimizer post-validation (steps overlapping); within one
    # synchronous step the middle rank waits (p-1) chunks of F/2 for its first input, which
    # tridist's ZB-V order (parallel/zero_bubble.py, searched at the run's costs) reaches at
    # F = I = W when m >= 2p: (p-1)/2. 2p chunk-microbatches = p microbatches on every rank,
    # 1F1B's first-stage peak
    ScheduleSpec(
        "zbv",
        None,
        "v",
        2,
        lambda p, v: (p - 1) / 2,
        lambda p, r, m, v: p,
        order=zbv_order,
        searched=True,
        compiled_stages=False,
    ),
    # torch's ScheduleZBVZeroBubble order, kept to compare: the same floor at F = I = W when
    # m >= 2p (above it at smaller m), p on every rank
    ScheduleSpec(
        "zbv_torch",
        "ZBVZeroBubble",
        "v",
        2,
        lambda p, v: (p - 1) / 2,
        lambda p, r, m, v: p,
        compiled_stages=False,
    ),
    # DualPipe's (p-1)(F&B+B-3W) per chunk with v=2 and no F&B overlap = p-1; its
    # activation column, p + 1
    ScheduleSpec(
        "dualpipev",
        "DualPipeV",
        "v",
        2,
        lambda p, v: p - 1,
        lambda p, r, m, v: p + 1,
        _one_microbatch_per_stage,
        compiled_stages=False,
    ),
    # tridist's zero-bubble orders, one stage per rank (parallel/zero_bubble.py). In a
    # synchronous step the last rank waits (p-1) F for its first input whatever the order: ZB-H1
    # reaches that floor, (p-1)(F+I-W), at F = I = W; ZB-H2's paper zero needs post-validation
    # ZB-H1: p in flight on every rank (W r microbatches late on rank r), 1F1B's peak
    _tridist_zero_bubble("zb_h1", lambda p, r, m, v: p, zb_h1_order),
    # ZB-H2: 2p-1 in flight; the same floor at F = I = W, below ZB-H1's (p-1)(F+I-W) when W < I
    _tridist_zero_bubble("zb_h2", lambda p, r, m, v: 2 * p - 1, zb_h2_order),
    # ZB-1p / ZB-2p: searched from per-stage costs under p / 2p in flight; at equal costs
    # they find the floor, (p-1)
    _tridist_zero_bubble("zb_1p", lambda p, r, m, v: p, zb_1p_order, searched=True),
    _tridist_zero_bubble("zb_2p", lambda p, r, m, v: 2 * p, zb_2p_order, searched=True),
)
SCHEDULE_SPECS: dict[str, ScheduleSpec] = {s.name: s for s in _SPECS}
SCHEDULES: tuple[str, ...] = tuple(SCHEDULE_SPECS)


def schedule_spec(schedule: str) -> ScheduleSpec:
    """The registry entry of `schedule`; ValueError naming the known ones otherwise."""
    if schedule not in SCHEDULE_SPECS:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULE_SPECS[schedule]


def stages_per_rank(schedule: str, virtual_stages: int) -> int:
    """Stages one pipeline rank holds: 1 (gpipe, 1f1b), 2 (V shapes) or virtual_stages."""
    return schedule_spec(schedule).stages_on_each_rank(virtual_stages)


def n_pipeline_stages(pp: int, virtual_stages: int, schedule: str) -> int:
    """Total pipeline stages: pp times the stages per rank (one stage without pipelining)."""
    return 1 if pp == 1 else pp * stages_per_rank(schedule, virtual_stages)


def stage_ids_for_rank(pp_rank: int, pp: int, virtual_stages: int, schedule: str) -> list[int]:
    """The stages pipeline rank `pp_rank` runs: looped (s mod pp) or V-shaped (r and 2pp-1-r)."""
    spec = schedule_spec(schedule)
    if spec.placement == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(spec.stages_on_each_rank(virtual_stages))]


def bubble_time(schedule: str, pp: int, virtual_stages: int) -> float:
    """Idle time on a rank per step, in units of one rank's forward of one microbatch."""
    spec = schedule_spec(schedule)
    return 0.0 if pp == 1 else float(spec.bubble_time(pp, virtual_stages))


def bubble_fraction(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Bubble / step time: t / (3m + t), the rank computing 3m (F + B_input + W per microbatch)."""
    t = bubble_time(schedule, pp, virtual_stages)
    return t / (3 * microbatches + t)


def bubble_over_ideal(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Bubble / ideal (bubble-free) time, the form papers quote: (p-1)/m for GPipe."""
    return bubble_time(schedule, pp, virtual_stages) / (3 * microbatches)


def microbatches_in_flight(
    schedule: str, pp: int, pp_rank: int, microbatches: int, virtual_stages: int
) -> float:
    """Microbatches whose activations a pipeline rank holds at its peak, in units of one
    microbatch through all of the rank's layers (never more than there are)."""
    spec = schedule_spec(schedule)
    if pp == 1:
        return 1.0
    return min(
        float(spec.in_flight(pp, pp_rank, microbatches, virtual_stages)), float(microbatches)
    )
