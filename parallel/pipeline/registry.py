"""The pipeline schedules tridist runs: one registry entry per schedule, read by config
validation, the pipeline builder, the planner, the benchmark and the timeline.

An entry says how the schedule is built (a torch.distributed.pipelining class, or a tridist-made
action order that torch's runtime runs: parallel/pipeline/orders.py), where its
stages sit (one per rank, looped s mod pp, or a V), how many stages a rank holds, which
microbatch counts it accepts, its bubble and the microbatches a rank holds at its peak.
Adding a schedule is one entry here plus its row in tests/parallel/pipeline/test_registry.py.

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

from parallel.pipeline.costs import StageCosts
from parallel.pipeline.orders import zb_1p_order, zb_2p_order, zb_h1_order, zb_h2_order, zbv_order

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


@dataclass(frozen=True, kw_only=True)
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
        name=name,
        torch_class=None,
        placement="one",
        stages_per_rank=1,
        bubble_time=lambda p, v: p - 1,
        in_flight=in_flight,
        microbatch_check=_one_microbatch_per_stage,
        order=order,
        searched=searched,
        compiled_stages=False,
    )


_SPECS = (
    # GPipe: (p-1)(F+B) = 3(p-1); every forward before any backward holds all m
    ScheduleSpec(
        name="gpipe",
        torch_class="GPipe",
        placement="one",
        stages_per_rank=1,
        bubble_time=lambda p, v: 3 * (p - 1),
        in_flight=lambda p, r, m, v: m,
    ),
    # PipeDream-Flush: GPipe's bubble; r's warm-up forwards plus one, p - r
    ScheduleSpec(
        name="1f1b",
        torch_class="1F1B",
        placement="one",
        stages_per_rank=1,
        bubble_time=lambda p, v: 3 * (p - 1),
        in_flight=lambda p, r, m, v: p - r,
        microbatch_check=_one_microbatch_per_stage,
    ),
    # Megatron interleaving: the same bubble per chunk, 3(p-1)/v
    ScheduleSpec(
        name="interleaved_1f1b",
        torch_class="Interleaved1F1B",
        placement="looped",
        stages_per_rank="virtual_stages",
        bubble_time=lambda p, v: 3 * (p - 1) / v,
        in_flight=_megatron_warm_up,
        microbatch_check=_microbatches_in_rounds_of_pp,
    ),
    # breadth-first: 3(p-1)/v, and like GPipe all m in flight
    ScheduleSpec(
        name="looped_bfs",
        torch_class="LoopedBFS",
        placement="looped",
        stages_per_rank="virtual_stages",
        bubble_time=lambda p, v: 3 * (p - 1) / v,
        in_flight=lambda p, r, m, v: m,
    ),
    # ZB-H1: (p-1)(F+B_input-W) per chunk = (p-1)/v; torch's order holds p microbatches on
    # every rank (pv chunk-microbatches between F and W, at any v and m; measured alike),
    # 1F1B's first-stage peak
    ScheduleSpec(
        name="interleaved_zb",
        torch_class="InterleavedZeroBubble",
        placement="looped",
        stages_per_rank="virtual_stages",
        bubble_time=lambda p, v: (p - 1) / v,
        in_flight=lambda p, r, m, v: p,
        microbatch_check=_microbatches_in_rounds_of_pp,
        compiled_stages=False,
    ),
    # ZB-V: its paper's ~0 needs optimizer post-validation (steps overlapping); within one
    # synchronous step the middle rank waits (p-1) chunks of F/2 for its first input, which
    # tridist's ZB-V order (parallel/pipeline/orders.py, searched at the run's costs) reaches at
    # F = I = W when m >= 2p: (p-1)/2. 2p chunk-microbatches = p microbatches on every rank,
    # 1F1B's first-stage peak
    ScheduleSpec(
        name="zbv",
        torch_class=None,
        placement="v",
        stages_per_rank=2,
        bubble_time=lambda p, v: (p - 1) / 2,
        in_flight=lambda p, r, m, v: p,
        order=zbv_order,
        searched=True,
        compiled_stages=False,
    ),
    # torch's ScheduleZBVZeroBubble order, kept to compare: the same floor at F = I = W when
    # m >= 2p (above it at smaller m), p on every rank
    ScheduleSpec(
        name="zbv_torch",
        torch_class="ZBVZeroBubble",
        placement="v",
        stages_per_rank=2,
        bubble_time=lambda p, v: (p - 1) / 2,
        in_flight=lambda p, r, m, v: p,
        compiled_stages=False,
    ),
    # DualPipe's (p-1)(F&B+B-3W) per chunk with v=2 and no F&B overlap = p-1; its
    # activation column, p + 1
    ScheduleSpec(
        name="dualpipev",
        torch_class="DualPipeV",
        placement="v",
        stages_per_rank=2,
        bubble_time=lambda p, v: p - 1,
        in_flight=lambda p, r, m, v: p + 1,
        microbatch_check=_one_microbatch_per_stage,
        compiled_stages=False,
    ),
    # tridist's zero-bubble orders, one stage per rank (parallel/pipeline/orders.py). In a
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


@dataclass(frozen=True)
class PipelineLayout:
    """A schedule resolved once on a layout: its registry entry, pp ranks, the virtual stages and
    microbatches. Everything downstream (builder, planner, benchmarks, timeline) reads this."""

    spec: ScheduleSpec
    pp: int
    virtual_stages: int = 1
    microbatches: int = 1

    @property
    def stages_per_rank(self) -> int:
        """Stages one pipeline rank holds: 1 (gpipe, 1f1b), 2 (V shapes) or virtual_stages."""
        return self.spec.stages_on_each_rank(self.virtual_stages)

    @property
    def n_stages(self) -> int:
        """Total pipeline stages: pp times the stages per rank (one stage without pipelining)."""
        return 1 if self.pp == 1 else self.pp * self.stages_per_rank

    @property
    def v_shape(self) -> bool:
        """True for the V placement (rank r holds stages r and 2pp-1-r)."""
        return self.spec.placement == "v"

    def stage_ids(self, pp_rank: int) -> list[int]:
        """The stages pipeline rank `pp_rank` runs: looped (s mod pp) or V-shaped (r, 2pp-1-r)."""
        if self.v_shape:
            return [pp_rank, 2 * self.pp - 1 - pp_rank]
        return [pp_rank + k * self.pp for k in range(self.stages_per_rank)]

    def rank_of_stage(self, stage: int) -> int:
        """The pipeline rank that runs `stage`."""
        return next(r for r in range(self.pp) if stage in self.stage_ids(r))

    @property
    def bubble_time(self) -> float:
        """Idle time on a rank per step, in units of one rank's forward of one microbatch."""
        return 0.0 if self.pp == 1 else float(self.spec.bubble_time(self.pp, self.virtual_stages))

    @property
    def bubble_fraction(self) -> float:
        """Bubble / step time: t / (3m + t), the rank computing 3m (F + B_input + W per
        microbatch)."""
        return self.bubble_time / (3 * self.microbatches + self.bubble_time)

    @property
    def bubble_over_ideal(self) -> float:
        """Bubble / ideal (bubble-free) time, the form papers quote: (p-1)/m for GPipe."""
        return self.bubble_time / (3 * self.microbatches)

    def in_flight(self, pp_rank: int) -> float:
        """Microbatches whose activations pipeline rank `pp_rank` holds at its peak, in units of
        one microbatch through all of the rank's layers (never more than there are)."""
        if self.pp == 1:
            return 1.0
        held = self.spec.in_flight(self.pp, pp_rank, self.microbatches, self.virtual_stages)
        return min(float(held), float(self.microbatches))

    def problem(self) -> ScheduleProblem | None:
        """The first reason this layout cannot run its schedule, or None."""
        return self.spec.problem(self.pp, self.virtual_stages, self.microbatches)


def pipeline_layout(
    schedule: str, pp: int, virtual_stages: int = 1, microbatches: int = 1
) -> PipelineLayout:
    """Resolve the schedule named `schedule` on a layout (the one name lookup of a run)."""
    return PipelineLayout(schedule_spec(schedule), pp, virtual_stages, microbatches)
