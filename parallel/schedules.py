"""The literature's pipeline bubble for each schedule, as a fraction of the step.

One cost model for all: per pipeline rank and microbatch the forward costs F, the input
gradient B_input = F and the weight gradient W = F (full backward B = 2F); a rank holding v
chunks spends F/v per chunk. Used by the benchmark, the timeline and the planner.
"""

from __future__ import annotations

SCHEDULES_ONE_STAGE_PER_RANK = ("gpipe", "1f1b")
SCHEDULES_LOOPED = ("interleaved_1f1b", "looped_bfs", "interleaved_zb")
SCHEDULES_V_SHAPE = ("zbv", "dualpipev")
SCHEDULES = SCHEDULES_ONE_STAGE_PER_RANK + SCHEDULES_LOOPED + SCHEDULES_V_SHAPE


def bubble_time(schedule: str, pp: int, virtual_stages: int) -> float:
    """Idle time on a rank per step, in units of one rank's forward of one microbatch.

    gpipe, 1f1b: (p-1)(F+B) = 3(p-1) [GPipe; 1F1B has the same bubble, fewer in flight];
    interleaved_1f1b, looped_bfs: the same per chunk, 3(p-1)/v [Megatron interleaving; BFS];
    interleaved_zb: ZB-H1's (p-1)(F+B_input-W) per chunk = (p-1)/v;
    zbv: ~0 once m >= 2p [ZB-V];
    dualpipev: DualPipe's (p-1)(F&B+B-3W) per chunk with v=2 and no F&B overlap = p-1.
    """
    p, v = pp, virtual_stages
    if p == 1:
        return 0.0
    times = {"gpipe": 3 * (p - 1), "1f1b": 3 * (p - 1), "interleaved_1f1b": 3 * (p - 1) / v,
             "looped_bfs": 3 * (p - 1) / v, "interleaved_zb": (p - 1) / v, "zbv": 0.0,
             "dualpipev": float(p - 1)}
    if schedule not in times:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(times)}")
    return float(times[schedule])


def bubble_fraction(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Bubble / step time: t / (3m + t), the rank computing 3m (F + B_input + W per microbatch)."""
    t = bubble_time(schedule, pp, virtual_stages)
    return t / (3 * microbatches + t)


def bubble_over_ideal(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Bubble / ideal (bubble-free) time, the form papers quote: (p-1)/m for GPipe."""
    return bubble_time(schedule, pp, virtual_stages) / (3 * microbatches)
