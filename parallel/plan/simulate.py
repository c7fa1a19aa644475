"""Replay torch's own action order for a schedule at fixed costs, to see the bubble it leaves.

The literature's formulas (parallel/schedules.py) describe each schedule as its paper draws it;
torch's implementation may order the same actions differently. This replays the order torch
lists for every rank (its schedule visualizer builds it from mock stages: no process group)
with free communication and per chunk F = I = W = 1 (B = 2), each action waiting for the ones
it depends on, and reports the idle share of the step. Written by hand: torch lists the order
but does not replay it.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops  # private API

from parallel.schedules import bubble_fraction, schedule_spec, stages_per_rank

COST = {"F": 1, "I": 1, "W": 1, "B": 2}  # compute only, per chunk: communication is free here


Done = tuple[str, int, int | None]  # (F or B, stage, microbatch) of a finished action


def _prerequisites(action: Any, n_stages: int) -> list[Done]:
    """(F or B, stage, microbatch) that must finish before `action` starts."""
    kind, s, mb = action.computation_type.value, action.stage_index, action.microbatch_index
    if kind == "F":
        return [("F", s - 1, mb)] * (s > 0)
    if kind == "W":
        return [("B", s, mb)]
    return [("F", s, mb)] + [("B", s + 1, mb)] * (s < n_stages - 1)  # B or I


def simulated_bubble(schedule: str, pp: int, microbatches: int, virtual_stages: int) -> float:
    """The bubble of torch's own action order for the schedule, as a fraction of the step.

    gpipe and 1f1b return their formula, which is exact for them (and torch's action listing
    of single-stage schedules is not the order their runtime executes).
    """
    spec, p, m = schedule_spec(schedule), pp, microbatches
    v = stages_per_rank(schedule, virtual_stages)
    if v == 1:
        return bubble_fraction(schedule, p, m, v)
    if spec.torch_class is None:
        raise NotImplementedError(f"{schedule}: replaying a tridist-made order is not wired in yet")
    n_stages = p * v
    ops = [
        [
            a.sub_actions or [a]
            for a in rank  # an OVERLAP_F_B runs its two actions in turn
            if a is not None and (a.sub_actions or a.computation_type.value in COST)
        ]
        for rank in get_schedule_ops(spec.torch_class, p, m, v)
    ]
    done: dict[Done, float] = {}  # -> finish time
    clock, nxt = [0.0] * p, [0] * p
    while any(nxt[r] < len(ops[r]) for r in range(p)):
        before = sum(nxt)
        for r in range(p):
            while nxt[r] < len(ops[r]) and all(
                d in done for a in ops[r][nxt[r]] for d in _prerequisites(a, n_stages)
            ):
                for a in ops[r][nxt[r]]:
                    clock[r] = max([clock[r]] + [done[d] for d in _prerequisites(a, n_stages)])
                    clock[r] += COST[a.computation_type.value]
                for a in ops[r][nxt[r]]:  # torch sends an overlap's outputs after both actions
                    kind = a.computation_type.value
                    done["B" if kind == "I" else kind, a.stage_index, a.microbatch_index] = clock[r]
                nxt[r] += 1
        if sum(nxt) == before:
            raise RuntimeError(f"{schedule}: its action order deadlocks in the replay")
    return 1 - 3 * v * m / max(clock)  # each rank computes F + I + W of m microbatches per chunk
